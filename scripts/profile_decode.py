"""Where does a decode step go? torch.profiler over greedy steps at a given context.

    .venv/bin/python scripts/profile_decode.py --method int4 --context 4096 --steps 8
    (--method dynamic: transformers' DynamicCache, the reference)
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from kvshrink import from_method, get_method, load_model, prepare
from kvshrink.corpus import load_corpus_ids
from kvshrink.eval.needle import fill, prefill_states


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="int4")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    model, tok = load_model()
    ids = load_corpus_ids(tok, max_tokens=args.context + 1)[None]
    states = prefill_states(model, ids[:, :args.context])
    if args.method == "dynamic":  # the uncompressed reference
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    else:
        method = get_method(args.method)
        model = prepare(model, method, tok)  # ZDC: the transformed copy
        cache = from_method(method, model)
    fill(cache, states)
    x = ids[:, args.context:]
    with torch.no_grad():
        model(x, past_key_values=cache)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                with record_function("decode_step"):
                    logits = model(x, past_key_values=cache).logits
                x = logits[:, -1].argmax(-1, keepdim=True)
            dt = (time.perf_counter() - t0) / args.steps
    print(f"{args.method} @ {args.context}: {1000 * dt:.1f} ms/step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
