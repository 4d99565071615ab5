"""Vector levels for values (lattice/VQ codebooks as QuIP#, AQLM and TurboQuant use for weights or caches), measured
for issue 19's targets before any codec or kernel is written for them.

`auto-6x`'s (or `--ratio`'s) allocation as it is, except that each layer whose values take rotated Gaussian levels
over the whole head (the menu's `Nrg`, N = 1 to 3 bits) codes them either way below, with the same rotation, the
same per-token mean and deviation (kept exact in both, so the comparison is of the levels alone) and the same bits:
- scalar: each normalized coordinate to its nearest Lloyd-Max level of N(0, 1) (what the cache stores);
- vector: each run of `dim` normalized coordinates to its nearest of 2^(bits x dim) codewords, a k-means codebook
  of N(0, I) (faiss): 1 bit as 8 coordinates to one of 256, 2 bits as 4 to one of 256, 3 bits as 4 to one of 4,096.
Keys go through their own round trips as in the cache. Scored as importance_study.py scores: the KL per token at
every position of the first 2 x 2,048 WikiText-2 test tokens, each query reading the 32 positions before it
unchanged.

--exact-keys p: with a share p of each head's keys kept in float16 as importance_study.py keeps them (by attention
within their chunk and the next), their bytes taken from the budget: whether the two levers add up.

    .venv/bin/python scripts/vq_study.py [--ratio 6] [--exact-keys 0.0025]
"""

import argparse

import faiss
import numpy as np
import torch
from importance_study import importance, key_trip, top_tokens, with_exact  # this folder is on the path

from kvshrink.codecs.hadamard import rotation
from kvshrink.codecs.levels import GAUSS, gauss
from kvshrink.core.sensitivity import Perturbed, body_round_trip
from kvshrink.corpus import load_corpus_ids
from kvshrink.families.budget import allocate
from kvshrink.families.budget.cache import calibration_for, joint_for
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK, CONTEXT, WINDOW = 4, 128, 2048, 16
SHAPES = {1: (8, 256), 2: (4, 256), 3: (4, 4096)}  # bits -> (coordinates per codeword, codewords)


def codebook(bits: int, dim: int, k: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((400 * k if k < 4096 else 600_000, dim)).astype(np.float32)
    km = faiss.Kmeans(dim, k, niter=40, seed=1, max_points_per_centroid=1_000_000)
    km.train(x)
    gen = np.random.default_rng(1).standard_normal((200_000, dim)).astype(np.float32)
    mse = float(km.index.search(gen, 1)[0].mean()) / dim
    lv = gauss(bits)
    scalar = float(((torch.from_numpy(gen).flatten()[:, None] - lv).abs().min(1).values ** 2).mean())
    print(f"codebook {dim} x {k}: squared error per coordinate of N(0, 1) {mse:.4f} (Lloyd-Max levels {scalar:.4f})",
          flush=True)
    return km.centroids


def value_trip(bits: int, vector: bool, book: dict, d: int):
    r = rotation(d, 2)
    lv = gauss(bits)

    def trip(x):
        n = (x.shape[2] - SINK) // BLOCK * BLOCK
        y = x.clone()
        z = x[:, :, SINK:SINK + n].float() @ r
        mean, dev = z.mean(-1, keepdim=True), z.std(-1, keepdim=True, unbiased=False).clamp_min(1e-8)
        u = (z - mean) / dev
        if vector:
            dim, cb = book[bits]
            index = faiss.IndexFlatL2(dim)
            index.add(cb)
            flat = u.reshape(-1, dim).contiguous().numpy()
            q = torch.from_numpy(cb[index.search(flat, 1)[1][:, 0]]).reshape(u.shape)
        else:
            q = lv[torch.bucketize(u.contiguous(), (lv[1:] + lv[:-1]) / 2)]
        y[:, :, SINK:SINK + n] = ((q * dev + mean) @ r.T).to(x.dtype)
        return y
    return trip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=6.0)
    ap.add_argument("--exact-keys", type=float, default=0.0,
                    help="share of each head's keys kept in float16, by attention in their chunk (importance_study)")
    args = ap.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    calib, path = calibration_for(model, BLOCK, tok)
    found = joint_for(model, BLOCK, path, tok)
    # the exact keys' bytes (float16 keys and a position, importance_study) come out of the budget
    share = args.exact_keys * (2 * spec.head_dim + 2) / (4 * spec.head_dim) * (CONTEXT - SINK - WINDOW) / CONTEXT
    chosen = allocate.choose(calib, spec, 1 / (1 / args.ratio - share), CONTEXT, SINK, BLOCK, found[0], WINDOW,
                             allocate.window_codec(8))
    book = {b: (dim, codebook(b, dim, k)) for b, (dim, k) in SHAPES.items()}
    ids = load_corpus_ids(tok, None, 2 * CONTEXT).reshape(2, CONTEXT)
    perturbed = Perturbed(model, ids, replay=False, most=CONTEXT, recent=32)
    k = round(args.exact_keys * (CONTEXT - SINK - WINDOW))
    score = importance(model, ids, causal=True) if k else {}
    keys = {}
    for i, kc in enumerate(chosen.keys):
        keys[i] = key_trip(kc, i, found, spec.rope)
        if k:
            keys[i] = with_exact(keys[i], top_tokens(score[i], k))
    swapped = [i for i, v in enumerate(chosen.values) if v[1:] == (True, None, GAUSS)]
    print(f"{chosen.ratio:.2f}x expected with {k} exact keys a head; {len(swapped)} of {spec.num_layers} layers' "
          "values take rotated Gaussian levels over the whole head")
    print("| values | KL per token |\n|---|---|")
    rows = [("the cache's codes (8-bit scales)", None), ("scalar, exact scales", False), ("vector, exact scales", True)]
    for name, vector in rows:
        changes = {}
        for i, vc in enumerate(chosen.values):
            if vector is None or i not in swapped:
                vtrip = body_round_trip(allocate.value_codec(vc), SINK, BLOCK)
            else:
                vtrip = value_trip(vc[0], vector, book, spec.head_dim)
            changes[i] = {"key": keys[i], "value": vtrip}
        print(f"| {name} | {perturbed.kl_many(changes):.4f} |", flush=True)


if __name__ == "__main__":
    main()
