"""Where a serve step's time goes: N running sequences of a method, each with a `--prompt`-token
prompt already prefilled, then `--steps` decode steps under cProfile, split into the model's
weights (linear layers), the per-sequence cache updates, the per-sequence attention (kernel and
its Python around it) and the rest.

    .venv/bin/python scripts/serve_profile.py --method int4 --running 5,15
"""

import argparse
import cProfile
import pstats
import time

from kvshrink.corpus import load_corpus_ids
from kvshrink.models import load_model
from kvshrink.serve.engine import Request, Sampling
from kvshrink.serve.server import make_engine


def cumulative(stats: pstats.Stats, match) -> float:
    return sum(v[3] for k, v in stats.stats.items() if match(k))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="int4")
    p.add_argument("--running", default="1,5,15")
    p.add_argument("--prompt", type=int, default=260)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    model, tok = load_model()
    ids = load_corpus_ids(tok, None, 50_000)
    _, fresh = make_engine(model, tok, args.method, 10**12, log=lambda *_: None)
    print("| running | step ms | tokens/s | linear ms | cache update ms | attention ms (kernel) | rest ms | "
          "update + attention per sequence-layer (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.running.split(",")):
        eng = fresh()
        for i in range(n):
            eng.submit(Request(ids[i * 400:i * 400 + args.prompt].tolist(),
                               Sampling(max_tokens=args.steps + 5, temperature=0, ignore_eos=True), lambda k, p: None))
        while not eng.running or any(len(r.tokens()) - r.fed > 1 for r in eng.running):
            eng.step()
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for _ in range(args.steps):
            eng.step()
        prof.disable()
        step = (time.perf_counter() - t) / args.steps * 1000
        st = pstats.Stats(prof)
        per = lambda x: x / args.steps * 1000  # noqa: E731
        linear = per(cumulative(st, lambda k: k[2] == "<built-in method torch._C._nn.linear>"))
        update = per(cumulative(st, lambda k: k[0].endswith("serve/ragged.py") and k[2] == "update"))
        attend = per(cumulative(st, lambda k: k[0].endswith("serve/ragged.py") and k[2] == "attend"))
        kernel = per(cumulative(st, lambda k: k[2] == "_fused"))
        layers = model.config.num_hidden_layers
        print(f"| {n} | {step:.0f} | {n / step * 1000:.1f} | {linear:.0f} | {update:.0f} | {attend:.0f} ({kernel:.0f}) | "
              f"{step - linear - update - attend:.0f} | {(update + attend) / (n * layers):.2f} |", flush=True)


if __name__ == "__main__":
    main()
