"""Does the budget calibration's one measured sequence steer the allocation, and can a whole-cache pass over the
calibration tokens tell the better of two allocations? (issue 19)

The budget calibration takes first-order proxies on its 4 x 512 tokens, but measures each choice's KL on the first
sequence alone (allocate._measured, ids[:1]). This measures the second sequence as well (a whole calibration with the
sequences turned by one, about 12 minutes), then allocates at each ratio from the shipped file, from the second
sequence's and from their mean, and scores each allocation as scripts/importance_study.py scores its rows: every
layer through its round trip at once, KL per token at every position of the first 2 x 2,048 WikiText-2 test tokens,
each query reading the 32 positions before it unchanged. Each allocation is also scored on the calibration's own
4 x 512 tokens (every position, the same 32 unchanged): what a calibration could measure to choose among
allocations. --noisy N adds N allocations from the shipped proxies times exp(0.15 z), z ~ N(0, 1) (seeds 0..N-1):
neighbours the knapsack cannot tell apart.

    .venv/bin/python scripts/calibration_sequence_study.py [--ratios 6,8] [--noisy 6] [--keep /tmp/calib-seq2.pt]
"""

import argparse
import os
from dataclasses import replace

import torch
from importance_study import BLOCK, CONTEXT, SINK, WINDOW, key_trip

from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed, body_round_trip
from kvshrink.corpus import load_corpus_ids
from kvshrink.families.budget import allocate
from kvshrink.families.budget.cache import calibration_for, joint_for
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="6,8")
    ap.add_argument("--noisy", type=int, default=0)
    ap.add_argument("--keep", default="/tmp/calib-seq2.pt", help="the second sequence's calibration, reused if there")
    args = ap.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    calib, path = calibration_for(model, BLOCK, tok)
    found = joint_for(model, BLOCK, path, tok)
    cids, desc = calibration_ids(tok, None, *allocate.calibration_shape(spec))
    if os.path.isfile(args.keep):
        second = torch.load(args.keep, weights_only=False)
    else:
        second = allocate.calibrate(model, cids.roll(-1, 0), desc, SINK, BLOCK)
        torch.save(second, args.keep)
    mean = replace(calib, proxy_k=(calib.proxy_k + second.proxy_k) / 2, proxy_v=(calib.proxy_v + second.proxy_v) / 2)
    ids = load_corpus_ids(tok, None, 2 * CONTEXT).reshape(2, CONTEXT)
    on_calibration = Perturbed(model, cids, replay=False, most=cids.shape[1], recent=32)
    perturbed = Perturbed(model, ids, replay=False, most=CONTEXT, recent=32)
    recent = allocate.window_codec(8)
    cands = [("sequence 1 (shipped)", calib), ("sequence 2", second), ("the mean of both", mean)]
    for seed in range(args.noisy):
        g = torch.Generator().manual_seed(seed)
        noisy = [t * torch.exp(0.15 * torch.randn(t.shape, generator=g, dtype=t.dtype))
                 for t in (calib.proxy_k, calib.proxy_v)]  # keys' draws first, as the figures in docs/budget.md
        cands.append((f"shipped, noise seed {seed}", replace(calib, proxy_k=noisy[0], proxy_v=noisy[1])))
    print("| ratio | proxies | expected ratio | KL, calibration tokens | KL per token |\n|---|---|---|---|---|")
    for ratio in (float(r) for r in args.ratios.split(",")):
        for name, c in cands:
            chosen = allocate.choose(c, spec, ratio, CONTEXT, SINK, BLOCK, found[0], WINDOW, recent)
            changes = {i: {"key": key_trip(kc, i, found, spec.rope),
                           "value": body_round_trip(allocate.value_codec(vc), SINK, BLOCK)}
                       for i, (kc, vc) in enumerate(zip(chosen.keys, chosen.values))}
            print(f"| {ratio:g}x | {name} | {chosen.ratio:.3f} | {on_calibration.kl_many(changes):.4f} | "
                  f"{perturbed.kl_many(changes):.4f} |", flush=True)


if __name__ == "__main__":
    main()
