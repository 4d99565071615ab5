"""Values in a calibrated basis per KV head at the bytes of the cache's 1- and 2-bit codes: a study of issue 19's
largest remaining term at 8x, before any codec or kernel is written for it.

At 8x, `auto-8x`'s allocation spends two thirds of its proxy on values, 1-bit rotated Gaussian codes in 27 of 30
layers (80 bits a token and head: 64 codes and two 8-bit scales). transform_study.py found that a basis with bits
per axis halves the KL of 1-bit codes at equal bits, with float16 scales then. This study takes the preset's own
allocation and, for each layer whose values take rotated Gaussian levels over the whole head (`Nrg`), codes them in
a calibrated basis at exactly the same bits a token and head:
- the basis: per layer and KV head, the values' principal axes (`pca`), or axes under the output metric (`out`:
  the head's slice of o_proj, W^T W summed over its query heads, since a value's error reaches the model through it);
- each token: an 8-bit log scale (its coordinates' RMS, as codecs/scales.py codes a deviation) and one code per
  axis at the axis's width, widths by greedy reverse water-filling of the remaining bits (falling variance, 0 bits
  for the weakest axes), levels fitted per axis on the calibration tokens (1-D k-means);
- the basis, mean and levels are per layer, shared by every token (a few KB a layer, counted in no row here).
Keys go through their own round trips as in the cache. Scored as vq_study.py scores: the KL per token at every
position of the first 2 x 2,048 WikiText-2 test tokens, each query reading the 32 positions before it unchanged.
Calibration: the budget calibration's tokens (the last 4 x 512 of WikiText-2 test), never the scored ones.

    .venv/bin/python scripts/value_basis_study.py [--ratio 8] [--metrics pca,out]
"""

import argparse

import torch
from importance_study import key_trip  # this folder is on the path
from transform_study import kmeans_1d, water_fill

from kvshrink.codecs.levels import GAUSS
from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed, body_round_trip, collect
from kvshrink.corpus import load_corpus_ids
from kvshrink.families.budget import allocate
from kvshrink.families.budget.cache import calibration_for, joint_for
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK, CONTEXT, WINDOW = 4, 128, 2048, 16
SCALE_BITS = 8


def fit_head(v: torch.Tensor, m: torch.Tensor, total: int):
    """(mean, forward, inverse, bits, levels) for one head's values v (n, D) under the metric m (D, D)."""
    d = v.shape[1]
    v64 = v.double()
    mu = v64.mean(0)
    cov = (v64 - mu).T @ (v64 - mu) / len(v64)
    m = m.double() + 1e-6 * torch.trace(m.double()) / d * torch.eye(d, dtype=torch.float64)
    e, u = torch.linalg.eigh(m)
    root, inv_root = u @ torch.diag(e.sqrt()) @ u.T, u @ torch.diag(1 / e.sqrt()) @ u.T
    lam, axes = torch.linalg.eigh(root @ cov @ root)
    lam, axes = lam.flip(0).clamp_min(1e-20), axes.flip(1)
    bits = water_fill(lam.tolist(), total)
    fwd = root @ axes @ torch.diag(1 / lam.sqrt())
    inv = torch.diag(lam.sqrt()) @ axes.T @ inv_root
    z = ((v64 - mu) @ fwd).float()
    z = z / z.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8)
    levels = [kmeans_1d(z[:, j].contiguous(), 1 << b) if b else None for j, b in enumerate(bits)]
    return mu.float(), fwd.float(), inv.float(), bits, levels


def log_scale(s: torch.Tensor) -> torch.Tensor:
    """An 8-bit logarithmic scale, steps of 2^(1/10), as codecs/scales.py codes a deviation."""
    return torch.exp2(torch.round(torch.log2(s.clamp_min(1e-8)) * 10) / 10)


def basis_trip(heads):
    def trip(x):
        n = (x.shape[2] - SINK) // BLOCK * BLOCK
        y = x.clone()
        for h, (mu, fwd, inv, _, levels) in enumerate(heads):
            z = (x[:, h, SINK:SINK + n].float() - mu) @ fwd
            scale = log_scale(z.pow(2).mean(-1, keepdim=True).sqrt())
            q = torch.zeros_like(z)
            for j, lv in enumerate(levels):
                if lv is not None:
                    q[..., j] = lv[torch.bucketize((z[..., j] / scale[..., 0]).contiguous(), (lv[1:] + lv[:-1]) / 2)]
            y[:, h, SINK:SINK + n] = ((q * scale) @ inv + mu).to(x.dtype)
        return y
    return trip


def output_metric(model, layer: int, spec) -> torch.Tensor:
    """(H, D, D): per KV head, sum over its query heads of W^T W, W the query head's slice of o_proj."""
    w = model.model.layers[layer].self_attn.o_proj.weight.detach().double()
    d, hq, hk = spec.head_dim, spec.num_heads, spec.num_kv_heads
    per = w.reshape(w.shape[0], hq, d)
    return torch.stack([sum(per[:, q].T @ per[:, q] for q in range(h * (hq // hk), (h + 1) * (hq // hk)))
                        for h in range(hk)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=8.0)
    ap.add_argument("--metrics", default="pca,out")
    args = ap.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    calib, path = calibration_for(model, BLOCK, tok)
    found = joint_for(model, BLOCK, path, tok)
    chosen = allocate.choose(calib, spec, args.ratio, CONTEXT, SINK, BLOCK, found[0], WINDOW,
                             allocate.window_codec(8))
    swapped = [i for i, v in enumerate(chosen.values) if v[1:] == (True, None, GAUSS)]
    print(f"{chosen.ratio:.2f}x expected; {len(swapped)} of {spec.num_layers} layers' values take rotated Gaussian "
          "levels over the whole head:", " ".join(f"{i}:{chosen.values[i][0]}" for i in swapped), flush=True)
    vs = {i: [] for i in swapped}
    for layers in collect(model, calibration_ids(tok)[0], SINK):
        for i in swapped:
            vs[i].append(layers[i][3].float())
    vs = {i: torch.cat(p, 1) for i, p in vs.items()}  # (H, n, D)
    ids = load_corpus_ids(tok, None, 2 * CONTEXT).reshape(2, CONTEXT)
    perturbed = Perturbed(model, ids, replay=False, most=CONTEXT, recent=32)
    keys = {i: key_trip(kc, i, found, spec.rope) for i, kc in enumerate(chosen.keys)}
    d = spec.head_dim
    print("| values | KL per token |\n|---|---|", flush=True)
    for metric in ["cache"] + args.metrics.split(","):
        changes = {}
        for i, vc in enumerate(chosen.values):
            if metric == "cache" or i not in swapped:
                vtrip = body_round_trip(allocate.value_codec(vc), SINK, BLOCK)
            else:
                # the cache's bits a token and head: codes plus two 8-bit scales; the basis keeps one 8-bit scale
                total = vc[0] * d + 16 - SCALE_BITS
                ms = output_metric(model, i, spec) if metric == "out" else [torch.eye(d)] * spec.num_kv_heads
                vtrip = basis_trip([fit_head(vs[i][h], ms[h], total) for h in range(spec.num_kv_heads)])
            changes[i] = {"key": keys[i], "value": vtrip}
        print(f"| {metric} | {perturbed.kl_many(changes):.4f} |", flush=True)


if __name__ == "__main__":
    main()
