"""Three of issue 19's levers measured before any kernel is written for them (docs/budget.md, "Three more levers").

- `basis`: what a calibrated basis could gain for values. Per layer and KV head, the coding gain (arithmetic over
  geometric mean of the variances) of the values' own axes (PCA) and of the axes under the output metric, the
  o_proj columns of the head's query heads (W^T W summed), the metric a value's error reaches the model through.
  At high rate, bits per axis gain 10 log10(gain) dB over equal bits after a rotation (keys: 3 to 8, 26 in two
  layers, which is what joint-basis keys use).
- `levels`: levels fitted per layer (1-D k-means, weighted as the codes' error is, on half of the tokens) against
  the Gaussian Lloyd-Max levels the menu's rotated values use, scored on the other half: squared error per layer at
  1, 2 and 3 bits, and the kurtosis of the normalized rotated coordinates (a Gaussian's is 3).
- `outliers`: dense-and-sparse keys (KVQuant). The KL per token with every layer's keys through the menu's turned,
  rotated per-channel codes (groups of 128), where the given share of each block's numbers furthest from their
  channel's median is kept exactly and the rest coded without them.

    .venv/bin/python scripts/lever_study.py basis|levels|outliers
"""

import argparse

import torch

from kvshrink.codecs.hadamard import rotation_on
from kvshrink.codecs.levels import gauss
from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed, collect
from kvshrink.families.budget import allocate as A
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK = 4, 128


def gain(e: torch.Tensor) -> float:
    e = e.clamp_min(1e-12)
    return float(e.mean() / e.log().mean().exp())


def basis(model, ids, spec) -> None:
    L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
    group = spec.num_heads // H
    S = torch.zeros(L, H, D, D, dtype=torch.float64)
    for layers in collect(model, ids, SINK):
        for i, (_, _, _, v, _) in layers.items():
            t = v.shape[1] // BLOCK * BLOCK  # codes per axis and block remove the block's mean
            vb = v[:, :t].detach().double().reshape(H, -1, BLOCK, D)
            vc = (vb - vb.mean(2, keepdim=True)).reshape(H, -1, D)
            S[i] += vc.transpose(1, 2) @ vc / vc.shape[1]
    for i in range(L):
        wo = model.model.layers[i].self_attn.o_proj.weight.detach().double()
        row = []
        for h in range(H):
            M = sum(wo[:, c * D:(c + 1) * D].T @ wo[:, c * D:(c + 1) * D] for c in range(h * group, (h + 1) * group))
            e, U = torch.linalg.eigh(M)
            half = U @ torch.diag(e.clamp_min(float(e.max()) * 1e-9).sqrt()) @ U.T
            row.append(f"head {h}: pca {gain(torch.linalg.eigvalsh(S[i, h])):.1f}, "
                       f"output metric {gain(torch.linalg.eigvalsh(half @ S[i, h] @ half)):.1f}")
        print(f"layer {i:2d}  " + "; ".join(row), flush=True)


def levels(model, ids, spec) -> None:
    R = rotation_on(spec.head_dim, 2, torch.device("cpu"))  # the value codes' rotation (seed 2)
    vals: dict = {}
    for layers in collect(model, ids, SINK):
        for i, (_, _, _, v, _) in layers.items():
            vals.setdefault(i, []).append(v.detach().float())

    def cut(z, lv):
        return lv[torch.bucketize(z, (lv[1:] + lv[:-1]) / 2)]

    def err(z, w, lv):
        return float((w * (z - cut(z, lv)) ** 2).sum() / w.sum())

    for i in sorted(vals):
        x = torch.cat(vals[i], 1) @ R
        mean, dev = x.mean(-1, keepdim=True), x.std(-1, keepdim=True, unbiased=False)
        z, w = ((x - mean) / dev).flatten(), (dev ** 2).expand_as(x).flatten()  # decoded error = dev * (z - level)
        n = z.numel() // 2
        row = [f"kurtosis {float((z ** 4).mean()):.2f}"]
        for bits in (1, 2, 3):
            lv = gauss(bits).clone()
            for _ in range(60):  # weighted Lloyd iterations on the first half
                idx = torch.bucketize(z[:n], (lv[1:] + lv[:-1]) / 2)
                for j in range(len(lv)):
                    m = idx == j
                    if m.any():
                        lv[j] = (z[:n][m] * w[:n][m]).sum() / w[:n][m].sum()
            row.append(f"{bits} bits: Gaussian {err(z[n:], w[n:], gauss(bits)):.4f}, fitted {err(z[n:], w[n:], lv):.4f}")
        print(f"layer {i:2d}  " + "; ".join(row), flush=True)


def outliers(model, ids, spec) -> None:
    perturbed = Perturbed(model, ids[:1])

    def trip_for(bits, share):
        codec = A.key_codec((bits, True, None, "uniform", True), BLOCK, spec.rope)

        def trip(x):
            n = (x.shape[2] - SINK) // BLOCK * BLOCK
            y, body = x.clone(), x[:, :, SINK:SINK + n].float()
            b, h, t, d = body.shape
            blk = body.reshape(b, h, t // BLOCK, BLOCK, d)
            med = blk.median(3, keepdim=True).values
            far = (blk - med).abs().reshape(b, h, t // BLOCK, -1)
            keep = max(1, int(share * BLOCK * d)) if share else 0
            mask = (far >= far.topk(keep, -1).values[..., -1:]).reshape_as(blk) if keep else torch.zeros_like(blk, dtype=bool)
            rest = torch.where(mask, med.expand_as(blk), blk).reshape(b, h, t, d)
            out = torch.where(mask, blk, codec.decode(codec.encode(rest, BLOCK)).reshape_as(blk))
            y[:, :, SINK:SINK + n] = out.reshape(b, h, t, d).to(x.dtype)
            return y
        return trip

    for bits in (2, 3):
        for share in (0, 0.002, 0.005, 0.01):
            kl = perturbed.kl_many({i: ("key", trip_for(bits, share)) for i in range(spec.num_layers)})
            print(f"{bits}-bit keys, {100 * share:.1f}% kept exactly: KL {kl:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("basis", "levels", "outliers"))
    args = parser.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    ids = calibration_ids(tok)[0]  # the last 4 x 512 tokens of WikiText-2 test, as the calibrations use
    {"basis": basis, "levels": lambda m, i, s: levels(m, i[:2], s), "outliers": outliers}[args.part](model, ids, spec)


if __name__ == "__main__":
    main()
