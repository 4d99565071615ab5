"""Transform coding of values (KVTC's idea, arXiv 2511.01815): does a calibrated basis with bits per
coordinate beat the budget's Hadamard-rotated integer codes at the same bytes?

Per layer and KV head, from the calibration tokens (the last 4 x 512 of WikiText-2 test): the values'
mean and principal axes (PCA; or, with --metric fisher, axes under the loss gradient's second moment,
the empirical Fisher, as ZDC's ranks use), bits per axis by greedy reverse water-filling (each next bit
to the axis whose variance times the Lloyd-Max distortion drop of N(0, 1) is largest, 0 to 6 bits), and
per axis the Lloyd-Max levels fitted to the calibration coordinates (1-D k-means). Each token stores a
float16 scale (its coordinates' RMS in units of the axes' deviations): 16 bits per token and head, the
same as one of the integer codes' two float16 group parameters. "mixed": the axes of one width turned
by a random orthogonal matrix first (as a Hadamard rotation Gaussianizes a head's coordinates).

Scored as the other studies: the KL per token of the model's predictions (core/sensitivity.Perturbed) on
the first 2 x 2,048 WikiText-2 test tokens with every layer's values after the 4 sink tokens replaced
by their round trip, against the budget menu's rotated Gaussian-level codes at the same bits per value
(codes plus parameters: 1-bit codes are 1.5 bits a value, 2-bit codes 2.5).

    .venv/bin/python scripts/transform_study.py [--metric pca|fisher]
"""

import argparse
import math

import torch

from kvshrink.codecs.levels import GAUSS, gauss
from kvshrink.codecs.quant import IntQuant
from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed, collect
from kvshrink.corpus import load_corpus_ids
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, MAX_BITS = 4, 6


def lloyd_max_distortion(bits: int) -> float:
    """Mean squared error of the Lloyd-Max quantizer of N(0, 1) (numerical integration)."""
    if bits == 0:
        return 1.0
    lv = gauss(bits).double()
    x = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    p = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    idx = torch.bucketize(x, (lv[1:] + lv[:-1]) / 2)
    return float(((x - lv[idx]) ** 2 * p).sum() * (x[1] - x[0]))


DIST = [lloyd_max_distortion(b) for b in range(MAX_BITS + 1)]


def water_fill(variances: list, total: int) -> list:
    """Bits per axis: each of `total` bits in turn to the axis it lowers the distortion most."""
    bits = [0] * len(variances)
    for _ in range(total):
        gain = [v * (DIST[b] - DIST[b + 1]) if b < MAX_BITS else -1.0 for v, b in zip(variances, bits)]
        bits[max(range(len(bits)), key=gain.__getitem__)] += 1
    return bits


def kmeans_1d(z: torch.Tensor, n: int, iters: int = 30) -> torch.Tensor:
    lv = torch.quantile(z, (torch.arange(n) + 0.5) / n)
    for _ in range(iters):
        idx = torch.bucketize(z, (lv[1:] + lv[:-1]) / 2)
        count = torch.bincount(idx, minlength=n)
        lv = torch.where(count > 0, torch.zeros(n).index_add_(0, idx, z) / count.clamp_min(1), lv)
    return lv


def fit_head(v: torch.Tensor, g: torch.Tensor, metric: str, total: int, mixed: bool, seed: int):
    """(mean, forward (D, D), inverse (D, D), bits, level tables) for one head's values v (n, D)."""
    d = v.shape[1]
    v64 = v.double()
    mu = v64.mean(0)
    cov = (v64 - mu).T @ (v64 - mu) / len(v64)
    m = g.double().T @ g.double() / len(g) if metric == "fisher" else torch.eye(d, dtype=torch.float64)
    m = m + 1e-6 * torch.trace(m) / d * torch.eye(d, dtype=torch.float64)
    e, u = torch.linalg.eigh(m)
    root, inv_root = u @ torch.diag(e.sqrt()) @ u.T, u @ torch.diag(1 / e.sqrt()) @ u.T
    lam, axes = torch.linalg.eigh(root @ cov @ root)
    lam, axes = lam.flip(0).clamp_min(1e-20), axes.flip(1)
    bits = water_fill(lam.tolist(), total)
    fwd = root @ axes @ torch.diag(1 / lam.sqrt())  # unit-variance coordinates
    inv = torch.diag(lam.sqrt()) @ axes.T @ inv_root
    if mixed:  # a random orthogonal turn among the axes of each width
        gen = torch.Generator().manual_seed(seed)
        turn = torch.eye(d, dtype=torch.float64)
        for w in set(bits):
            idx = torch.tensor([j for j, b in enumerate(bits) if b == w])
            if len(idx) > 1:
                turn[idx[:, None], idx[None, :]] = torch.linalg.qr(torch.randn(len(idx), len(idx), generator=gen,
                                                                               dtype=torch.float64))[0]
        fwd, inv = fwd @ turn, turn.T @ inv
    z = ((v64 - mu) @ fwd).float()
    z = z / z.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8)
    tables = [kmeans_1d(z[:, j].contiguous(), 1 << b) if b else None for j, b in enumerate(bits)]
    return mu.float(), fwd.float(), inv.float(), bits, tables


def transform_trip(heads):
    def trip(x):
        y = x.clone()
        for h, (mu, fwd, inv, _, tables) in enumerate(heads):
            z = (x[:, h, SINK:].float() - mu) @ fwd
            scale = z.pow(2).mean(-1, keepdim=True).sqrt().to(torch.float16).float().clamp_min(1e-8)
            q = torch.zeros_like(z)
            for j, lv in enumerate(tables):
                if lv is not None:
                    q[..., j] = lv[torch.bucketize((z[..., j] / scale[..., 0]).contiguous(), (lv[1:] + lv[:-1]) / 2)]
            y[:, h, SINK:] = ((q * scale) @ inv + mu).to(x.dtype)
        return y
    return trip


def int_trip(codec):
    def trip(x):
        y = x.clone()
        y[:, :, SINK:] = codec.decode(codec.encode(x[:, :, SINK:].float().contiguous(), 1)).to(x.dtype)
        return y
    return trip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--metric", default="pca", choices=("pca", "fisher"))
    args = ap.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    vs = {i: [] for i in range(spec.num_layers)}
    for layers in collect(model, calibration_ids(tok)[0], SINK):
        for i, (_, _, _, v, gv) in layers.items():
            vs[i].append((v.float(), gv.float()))
    stats = {i: (torch.cat([a for a, _ in p], 1), torch.cat([b for _, b in p], 1)) for i, p in vs.items()}
    perturbed = Perturbed(model, load_corpus_ids(tok, None, 2 * 2048).reshape(2, 2048), replay=False)

    def kl(trips):
        return perturbed.kl_many({i: ("value", t) for i, t in trips.items()})

    d = spec.head_dim
    print(f"| bits per value | rotated int, Gaussian levels | {args.metric}, fitted levels | {args.metric}, mixed |")
    print("|---|---|---|---|")
    for rate in (1.5, 2.0, 2.5):
        base = "–"
        if rate in (1.5, 2.5):
            codec = IntQuant(int(rate), "token", None, rotate=True, seed=2, levels=GAUSS)
            base = f"{kl({i: int_trip(codec) for i in stats}):.4f}"
        row = []
        for mixed in (False, True):
            heads = {i: [fit_head(v[h], g[h], args.metric, int(rate * d) - 16, mixed, seed=h) for h in range(len(v))]
                     for i, (v, g) in stats.items()}
            row.append(f"{kl({i: transform_trip(hs) for i, hs in heads.items()}):.4f}")
        print(f"| {rate} | {base} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
