"""Step times of the serve bench's workload, split into decode-only steps and steps that carry a prompt
chunk: the same drawn requests as `kvshrink bench --sections serve`, all queued at once under one KV
budget, the first `--steps` engine steps timed one by one (no profiler).

    .venv/bin/python scripts/serve_steps.py --method int4 --steps 150
"""

import argparse
import time

import numpy as np

from kvshrink.corpus import load_corpus_ids
from kvshrink.models import load_model
from kvshrink.serve.engine import Request, Sampling
from kvshrink.serve.load import Workload
from kvshrink.serve.server import make_engine


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="int4")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--kv-budget", type=float, default=32e6)
    args = p.parse_args()
    model, tok = load_model()
    items = Workload(requests=args.requests).draw(load_corpus_ids(tok, None, 400_000))
    _, fresh = make_engine(model, tok, args.method, int(args.kv_budget), log=lambda *_: None)
    eng = fresh()
    for prompt, n in items:
        eng.submit(Request(prompt, Sampling(max_tokens=n, temperature=0, ignore_eos=True), lambda k, x: None))
    rows = []  # (running, decode tokens, prompt tokens, seconds)
    batch = eng._batch

    def recorded():
        reqs, counts = batch()
        rows.append([len(eng.running), sum(c == 1 for c in counts), sum(c for c in counts if c > 1)])
        return reqs, counts
    eng._batch = recorded
    start = time.perf_counter()
    for _ in range(args.steps):
        if not (eng.running or eng.waiting):
            break
        t = time.perf_counter()
        eng.step()
        rows[-1].append(time.perf_counter() - t)
    total = time.perf_counter() - start
    r = np.array(rows)
    dec, pre = r[r[:, 2] == 0], r[r[:, 2] > 0]
    print(f"{args.method}: {len(r)} steps in {total:.1f} s, {r[:, 0].mean():.1f} running on average, "
          f"{r[:, 1].sum() / total:.1f} decode tokens/s")
    print(f"  decode-only steps: {len(dec)}, mean {dec[:, 3].mean() * 1000:.0f} ms with {dec[:, 0].mean():.1f} running, "
          f"{dec[:, 3].sum():.1f} s in all")
    if len(pre):
        print(f"  steps with a prompt chunk: {len(pre)}, mean {pre[:, 3].mean() * 1000:.0f} ms for {pre[:, 2].mean():.0f} "
              f"prompt tokens and {pre[:, 1].mean():.1f} decodes, {pre[:, 3].sum():.1f} s in all")


if __name__ == "__main__":
    main()
