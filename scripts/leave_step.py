"""Where does an importance-aware cache's leaving step go? cProfile over the decode step after which tokens leave the
window (every `gather` steps), beside the step before it, at a given context (issue 23: `mix-*`'s leaving step).

    .venv/bin/python scripts/leave_step.py [--method mix-auto-6x] [--context 8150] [--steps 48]
"""

import argparse
import cProfile
import pstats
import time

import torch

from kvshrink import from_method, get_method, load_model, prepare
from kvshrink.corpus import load_corpus_ids
from kvshrink.eval.needle import fill, prefill_states


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="mix-auto-6x")
    ap.add_argument("--context", type=int, default=8150)
    ap.add_argument("--steps", type=int, default=48, help="the last step is profiled with the one before it")
    args = ap.parse_args()
    model, tok = load_model()
    ids = load_corpus_ids(tok, max_tokens=args.context + 1)[None]
    states = prefill_states(model, ids[:, :args.context])
    method = get_method(args.method)
    model = prepare(model, method, tok)
    cache = from_method(method, model)
    fill(cache, states)
    x = ids[:, args.context:]
    with torch.no_grad():
        for s in range(args.steps):
            left = cache.layers[0].left
            profiled = s >= args.steps - 2
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            if profiled:
                prof.enable()
            logits = model(x, past_key_values=cache).logits
            if profiled:
                prof.disable()
            ms = 1000 * (time.perf_counter() - t0)
            print(f"step {s}: {ms:.0f} ms{'  (tokens left the window)' if cache.layers[0].left != left else ''}")
            if profiled:
                pstats.Stats(prof).sort_stats("cumtime").print_stats("kvshrink", 24)
            x = logits[:, -1].argmax(-1, keepdim=True)


if __name__ == "__main__":
    main()
