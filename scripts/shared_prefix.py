"""Many requests that start with one long system prompt: bytes held, sequences admitted and step time.

One cold request prefills the system prompt (its chunk ends are kept, serve/prefix.py); then `--users`
requests, each the system prompt plus its own message, arrive together and decode greedily. Reports
the bytes all caches and prefix entries hold together (every storage counted once) once every request
has decoded `--tokens` tokens, the bytes a cold cache of one request would hold, the most requests
that ran at once under `--kv-budget`, and the mean decode-step time.

    .venv/bin/python scripts/shared_prefix.py --method int4 --system 1024 --users 16 --tokens 64
"""

from __future__ import annotations

import argparse
import time

from kvshrink.codecs.base import tensor_nbytes
from kvshrink.corpus import load_corpus_ids
from kvshrink.models import load_model
from kvshrink.serve.engine import Request, Sampling
from kvshrink.serve.server import make_engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="int4")
    ap.add_argument("--system", type=int, default=1024)
    ap.add_argument("--message", type=int, default=32)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kv-budget", type=float, default=1e9, help="bytes")
    args = ap.parse_args()
    model, tok = load_model()
    ids = load_corpus_ids(tok, None, 20_000).tolist()
    system = ids[:args.system]
    _, fresh = make_engine(model, tok, args.method, int(args.kv_budget), log=lambda *_: None)
    eng = fresh()

    def submit(prompt, n):
        return eng.submit(Request(prompt, Sampling(max_tokens=n, temperature=0, ignore_eos=True), lambda k, q: None))

    first = submit(system + ids[5000:5000 + args.message], args.tokens)
    while first.finish is None:
        eng.step()
    eng.measure()
    one = eng.held
    start = 6000
    reqs = [submit(system + ids[start + i * args.message:start + (i + 1) * args.message], args.tokens)
            for i in range(args.users)]
    steps, t_decode, peak_held, parts = 0, 0.0, 0, 0
    t_all = time.perf_counter()
    while any(r.finish is None for r in reqs):
        decoding = all(r.fed >= len(r.prompt) for r in eng.running) and eng.running
        t0 = time.perf_counter()
        eng.step()
        if decoding:
            t_decode += time.perf_counter() - t0
            steps += 1
        if all(len(r.out) >= args.tokens // 2 for r in reqs) and not peak_held:
            eng.measure()
            peak_held = eng.held
            parts = max(len(s.body_parts()) if hasattr(s, "body_parts") else 1 for r in eng.running for layer in r.cache.layers for s in layer.stores())
    t_all = time.perf_counter() - t_all
    print(f"{args.method}: system {args.system} + message {args.message} tokens, {args.users} users x {args.tokens} "
          f"tokens; one finished request and its entries hold {one / 1e6:.1f} MB; all {args.users} halfway hold "
          f"{peak_held / 1e6:.1f} MB ({peak_held / one:.2f}x one); most running {eng.peak_running}; "
          f"{args.users * args.tokens / t_all:.1f} output tokens/s; preemptions {eng.preemptions}; "
          f"decode step {1000 * t_decode / max(steps, 1):.1f} ms over {steps} steps; reused tokens "
          f"{eng.prefix.reused_tokens}; body parts per store at most {parts}; prefix hits {eng.prefix.hits}; entries {len(eng.prefix)} "
          f"({tensor_nbytes(eng.prefix.payload()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
