"""Which KV heads cost the most, and what would one budget spent per head (not per layer) buy?

For every (layer, KV head) of the bundled model, the KL per token (core/sensitivity.Perturbed, the
budget calibration's first 512 tokens) when only that head's keys, or only its values, go through a
round trip, for the choices `auto-6x` picks between: keys at 2 bits (turned, rotated, groups of 64), 3
and 4 bits (turned, rotated); values at 1, 2 and 3 bits (rotated, Gaussian levels, 8-bit scales).
Then the budget allocator (families/budget/allocate.allocate) is run twice on these measurements at 5x,
6x and 8x: one choice per layer for all its heads (what the cache does), or one per head. Both read
the same per-head KLs summed, so the difference is what a head axis in the menu would buy on the
calibration's objective, before any kernel is written for it.

    .venv/bin/python scripts/head_study.py [--out head_study.json]
"""

import argparse
import json
import time

import numpy as np
import torch

from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.layer import stage_codec
from kvshrink.core.sensitivity import Perturbed
from kvshrink.families.budget import allocate as budget
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK, CONTEXT = 4, 128, 2048
KEYS = ((2, True, 64, budget.U, True), (3, True, None, budget.U, True), (4, True, None, budget.U, True))
VALUES = ((1, True, None, budget.G), (2, True, None, budget.G), (3, True, None, budget.G))


def head_trip(codec, heads: slice):
    """x (B, H, n, D) -> x with some heads' whole blocks after the sink through the codec."""
    def run(x):
        n = (x.shape[2] - SINK) // BLOCK * BLOCK
        y = x.clone()
        body = x[:, heads, SINK:SINK + n].float().contiguous()
        y[:, heads, SINK:SINK + n] = codec.decode(codec.encode(body, BLOCK)).to(x.dtype)
        return y
    return run


def head_bytes(codec, stage, d: int) -> float:
    """Bytes one head holds for its coded tokens at CONTEXT after a prefill (whole blocks, and a partial
    block at the stage codec's width where there is one), as budget.layer_bytes counts them."""
    x = torch.randn(1, 1, BLOCK, d)
    per = codec.nbytes(codec.encode(x, BLOCK)) / BLOCK
    coded = (CONTEXT - SINK) // BLOCK * BLOCK
    staged = CONTEXT - SINK - coded
    st = stage.nbytes(stage.encode(x, 1)) / BLOCK if stage is not None else per
    return coded * per + staged * st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="head_study.json")
    args = ap.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    L, H, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    ids, _ = calibration_ids(tok)
    perturbed = Perturbed(model, ids[:1])
    t0 = time.time()
    kl = {"key": np.zeros((L, H, len(KEYS))), "value": np.zeros((L, H, len(VALUES)))}
    size = {"key": np.zeros(len(KEYS)), "value": np.zeros(len(VALUES))}
    makers = {"key": lambda c: budget.key_codec(c, BLOCK, spec.rope), "value": budget.value_codec}
    for which, menu in (("key", KEYS), ("value", VALUES)):
        for j, c in enumerate(menu):
            codec = makers[which](c)
            size[which][j] = head_bytes(codec, stage_codec(codec) if which == "key" else None, d)
            for i in range(L):
                for h in range(H):
                    kl[which][i, h, j] = max(perturbed.kl(i, which, head_trip(codec, slice(h, h + 1))), 0.0)
            print(f"{which} {budget.describe_choice(c)}: {time.time() - t0:.0f} s", flush=True)
    # additivity: one layer's heads all at once against the sum of each alone
    check = []
    for i in (1, 9, 16):
        for which, menu, j in (("key", KEYS, 0), ("value", VALUES, 1)):
            codec = makers[which](menu[j])
            whole = perturbed.kl(i, which, head_trip(codec, slice(None)))
            check.append({"layer": i, "which": which, "choice": budget.describe_choice(menu[j]),
                          "heads_together": whole, "sum_of_heads": float(kl[which][i, :, j].sum())})
    fixed = SINK * 2 * H * d * 2 * L
    full = spec.fp16_bytes(CONTEXT)
    result = {"kl_key": kl["key"].tolist(), "kl_value": kl["value"].tolist(), "bytes_key": size["key"].tolist(),
              "bytes_value": size["value"].tolist(), "keys": [budget.describe_choice(c) for c in KEYS],
              "values": [budget.describe_choice(c) for c in VALUES], "additivity": check, "ratios": {}}
    for ratio in (5.0, 6.0, 8.0):
        room = full / ratio - fixed
        per_layer = []
        for i in range(L):
            per_layer.append((kl["key"][i].sum(0), H * size["key"]))
            per_layer.append((kl["value"][i].sum(0), H * size["value"]))
        per_head = []
        for i in range(L):
            for h in range(H):
                per_head.append((kl["key"][i, h], size["key"]))
                per_head.append((kl["value"][i, h], size["value"]))
        picks_l, total_l = budget.allocate(per_layer, room)
        picks_h, total_h = budget.allocate(per_head, room)
        result["ratios"][str(ratio)] = {"per_layer": total_l, "per_head": total_h, "picks_layer": picks_l,
                                        "picks_head": picks_h}
    json.dump(result, open(args.out, "w"), indent=1)
    print(f"\n{time.time() - t0:.0f} s; written to {args.out}\n")
    print("| ratio | summed KL, one choice per layer | one choice per head | change |")
    print("|---|---|---|---|")
    for r, v in result["ratios"].items():
        print(f"| {float(r):g}x | {v['per_layer']:.4f} | {v['per_head']:.4f} | "
              f"{100 * (v['per_head'] / v['per_layer'] - 1):+.1f}% |")
    print("\nadditivity (one layer, all its heads coded at once, against the sum of each head alone):")
    for c in check:
        print(f"  layer {c['layer']} {c['which']}s {c['choice']}: {c['heads_together']:.4f} together, "
              f"{c['sum_of_heads']:.4f} summed")
    for which, j in (("key", 0), ("value", 1)):
        m = kl[which][:, :, j]
        order = np.argsort(-m, axis=None)[:8]
        print(f"\ncostliest heads, {which}s at {result[which + 's'][j]}: " + ", ".join(
            f"L{i}h{h} {m[i, h]:.4f}" for i, h in (np.unravel_index(o, m.shape) for o in order)))
        spread = m.max(1) / np.maximum(m.min(1), 1e-9)
        print(f"  within a layer, costliest head / cheapest: median {np.median(spread):.1f}x, "
              f"largest {spread.max():.1f}x (layer {int(spread.argmax())})")
        share = m.max(1) / np.maximum(m.sum(1), 1e-12)
        print(f"  the costliest head's share of its layer's sum: median {100 * np.median(share):.0f}%")


if __name__ == "__main__":
    main()
