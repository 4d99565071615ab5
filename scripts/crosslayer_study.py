"""Does a layer's cache follow from the layer before (AQUA-KV, arXiv 2501.19392)? If so, coding only the
residual of a prediction from the previous layer's (decoded) states would save bits.

For every layer i >= 1 of the bundled model, a least-squares linear map (with bias, all KV heads at once)
from layer i - 1's values to layer i's values, and from layer i - 1's keys to layer i's keys, fitted on
the calibration tokens (the last 8 x 512 tokens of WikiText-2 test, as `kvshrink calibrate` takes them)
and scored on the first 2 x 2,048 (the bench's evaluation tokens): the share of layer i's variance the
prediction leaves (1 - R^2), and what that would save at high rate, 1/2 log2(1 / share) bits per element
(less at the 2-3 bits where the budget spends them, and before the previous layer's own coding error).

Then the test that counts: every layer's keys (or values) coded at 2 and 3 bits (per-channel groups of
128 tokens for keys, Hadamard-rotated; per token for values, Gaussian levels, as the budget's menu), either
as they are or as the residual of the prediction from the previous layer's *decoded* states (layer 0 as it
is), and the KL per token of the model's predictions (core/sensitivity.Perturbed) on the 2 x 2,048 tokens.
Keys are taken before RoPE (turned back by their absolute positions): a linear map between two layers'
post-RoPE keys would have to commute with every position's rotation. The 4 sink tokens are left out.

    .venv/bin/python scripts/crosslayer_study.py
    .venv/bin/python scripts/crosslayer_study.py --pairs   (values only: the kernel-readable variants at 1, 2, 3 bits)

`--pairs` compares, for values, the odd-from-even prediction with one map over all KV heads (a layer's head reads
every head of the layer below: three times the value work in a kernel) against one map per head (head h from head h
of the layer below: the same value work again once), at 1 bit too (`auto-8x`'s values).
"""

import argparse

import math

import torch

from kvshrink.codecs.levels import GAUSS
from kvshrink.codecs.quant import IntQuant
from kvshrink.codecs.spin import turn
from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed
from kvshrink.corpus import load_corpus_ids
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK = 4


@torch.no_grad()
def states(model, ids, rope):
    """{"key": [(tokens, H * D) per layer], "value": [...]} over the sequences of ids, keys before RoPE."""
    out = {"key": [], "value": []}
    for seq in ids:
        cache = model(seq[None], use_cache=True).past_key_values
        for i, layer in enumerate(cache.layers):
            k = turn(layer.keys.float(), rope, seq.numel(), -1)[0, :, SINK:]
            v = layer.values.float()[0, :, SINK:]
            for name, x in (("key", k), ("value", v)):
                flat = x.permute(1, 0, 2).reshape(x.shape[1], -1)
                if len(out[name]) <= i:
                    out[name].append([])
                out[name][i].append(flat)
    return {n: [torch.cat(p).double() for p in layers] for n, layers in out.items()}


def linear_map(x, y, ridge=1e-3):
    """Least-squares w with [x, 1] @ w ~ y (a small ridge on the inputs' scale)."""
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    reg = ridge * a.pow(2).mean(0).diag()
    return torch.linalg.solve(a.T @ a + reg * len(a), a.T @ y)


def predict(w, x):
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w


def share_left(w, x_test, y_test):
    """1 - R^2 of the map's prediction on the test tokens."""
    return float((y_test - predict(w, x_test)).pow(2).sum() / (y_test - y_test.mean(0)).pow(2).sum())


def coded(maps, which, codec, rope, residual):
    """{layer: (which, round trip)}: every layer's keys or values after the sink through `codec`, or the residual
    of the prediction from the previous layer's round-tripped states: residual "chain" every layer from the one
    before (itself a residual: reading layer i means reading every layer below), "pairs" odd layers only, from
    the even layer below coded as it is (reading a layer means reading at most two)."""
    held = {}

    def trip_for(i):
        def trip(x):
            b, h, t, d = x.shape
            y = turn(x.float(), rope, t, -1) if which == "key" else x.float()  # before RoPE
            body = y[:, :, SINK:]
            n = (t - SINK) // 128 * 128
            flat = body.permute(0, 2, 1, 3).reshape(b, t - SINK, h * d)
            guess = torch.zeros_like(flat)
            if (residual == "chain" and i > 0) or (residual == "pairs" and i % 2):
                guess = predict(maps[i], held[i - 1].double()).float().reshape(flat.shape)
            elif residual == "pairs-head" and i % 2:  # maps[i]: one map per head, head h from head h below
                prev = held[i - 1].double()
                guess = torch.cat([predict(w, prev[:, j * d:(j + 1) * d]) for j, w in enumerate(maps[i])], 1)
                guess = guess.float().reshape(flat.shape)
            r = (flat - guess).reshape(b, t - SINK, h, d).permute(0, 2, 1, 3)
            out = r.clone()
            out[:, :, :n] = codec.decode(codec.encode(r[:, :, :n].contiguous(), 128))
            rec = out.permute(0, 2, 1, 3).reshape(flat.shape) + guess
            held[i] = rec.reshape(-1, h * d)
            y[:, :, SINK:] = rec.reshape(b, t - SINK, h, d).permute(0, 2, 1, 3)
            return (turn(y, rope, t, 1) if which == "key" else y).to(x.dtype)
        return trip
    return {i: (which, trip_for(i)) for i in range(len(maps))}


def pairs(model, tok, spec, fit):
    """Values only: as they are, odd layers from the even one below (all heads, or per head), at 1 to 3 bits."""
    d = spec.head_dim
    v = fit["value"]
    whole = [None] + [linear_map(v[i - 1], v[i]) for i in range(1, spec.num_layers)]
    per_head = [None] + [[linear_map(v[i - 1][:, h * d:(h + 1) * d], v[i][:, h * d:(h + 1) * d])
                          for h in range(spec.num_kv_heads)] for i in range(1, spec.num_layers)]
    ids = load_corpus_ids(tok, None, 2 * 2048).reshape(2, 2048)
    perturbed = Perturbed(model, ids, replay=False)
    print("| values | as they are (KL) | odd from even, all heads | odd from even, per head |")
    print("|---|---|---|---|")
    for bits in (1, 2, 3):
        codec = IntQuant(bits, "token", None, rotate=True, seed=2, levels=GAUSS)
        kl = [perturbed.kl_many(coded(m, "value", codec, spec.rope, res))
              for m, res in ((whole, None), (whole, "pairs"), (per_head, "pairs-head"))]
        print(f"| {bits} bits | " + " | ".join(f"{x:.5f}" for x in kl) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", action="store_true", help="values only: the kernel-readable variants")
    args = ap.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    fit = states(model, calibration_ids(tok, None, sequences=8)[0], spec.rope)
    if args.pairs:
        return pairs(model, tok, spec, fit)
    test = states(model, load_corpus_ids(tok, None, 2 * 2048).reshape(2, 2048), spec.rope)
    print("| layer | keys: share left | values: share left |")
    print("|---|---|---|")
    totals = {"key": [], "value": []}
    maps = {n: [None] + [linear_map(fit[n][i - 1], fit[n][i]) for i in range(1, spec.num_layers)] for n in fit}
    for i in range(1, spec.num_layers):
        row = []
        for name in ("key", "value"):
            s = share_left(maps[name][i], test[name][i - 1], test[name][i])
            totals[name].append(s)
            row.append(f"{s:.3f}")
        print(f"| {i} | " + " | ".join(row) + " |", flush=True)
    for name, s in totals.items():
        mean = sum(s) / len(s)
        print(f"{name}s: mean share left {mean:.3f}, best {min(s):.3f} (layer {1 + s.index(min(s))}); at high rate "
              f"{0.5 * math.log2(1 / mean):.2f} bits per element saved on average")
    ids = load_corpus_ids(tok, None, 2 * 2048).reshape(2, 2048)
    perturbed = Perturbed(model, ids, replay=False)  # layers run in order: each sees the one before it coded
    print("\n| coded | bits | as they are (KL) | residual, every layer from the one before | residual, odd layers "
          "from the even one below |")
    print("|---|---|---|---|---|")
    for name, make in (("key", lambda b: IntQuant(b, "channel", 128, rotate=True, seed=1)),
                       ("value", lambda b: IntQuant(b, "token", None, rotate=True, seed=2, levels=GAUSS))):
        for bits in (2, 3):
            kl = [perturbed.kl_many(coded(maps[name], name, make(bits), spec.rope, res))
                  for res in (None, "chain", "pairs")]
            print(f"| {name}s | {bits} | " + " | ".join(f"{v:.5f}" for v in kl) + " |", flush=True)


if __name__ == "__main__":
    main()
