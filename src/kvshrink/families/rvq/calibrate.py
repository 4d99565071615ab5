"""Learning RVQ codebooks (codecs/rvq.py) for one model: `kvshrink calibrate --method rvq`.

Per layer, separately for keys and values: post-RoPE keys and values of
calibration text (the last tokens of the corpus, disjoint from the evaluation
segments; the first `sink` positions are left out, the cache keeps them in
float16) are divided by their root mean square, split into channel groups, and
a residual stack is learned level by level: k-means (faiss's Lloyd iterations;
the paper's exponential moving average is the online form of the same update)
on what the previous levels left. faiss re-seeds an empty codeword by splitting
a large one. It replaced a PyTorch k-means of the same iterations: on one layer
of the bundled model (depth 8, groups of 16, 256 codewords) it trains in
1.8 s for keys and 2.0 s for values, against 7.2 s and 8.5 s, with the same residual
energy left (0.26% and 0.69% after 8 levels).

A calibration file is safetensors: `keys` and `values` (layers, depth, entries,
group) plus a JSON header naming the model, the grouping and the data.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import faiss
import torch
from transformers import DynamicCache

from ...compat import with_cache
from ...codecs.rvq import GROUPINGS, channel_order, grouped, nearest
from ...core.calibfile import (
    calibration_dir,
    calibration_ids,
    check_header,
    load_tensors,
    model_fingerprint,
    model_header,
    save_tensors,
    spread_offsets,
)
from ...errors import KvshrinkError
from ...spec import spec_from_config

FORMAT = "kvshrink-rvq-2"  # 2: keys collected at positions spread over the context
MAX_DEPTH = 8
FIT_ROWS = 1 << 15  # rows a level is fitted on: k-means time, not quality, grows past this


@dataclass(eq=False)
class RvqCalibration:
    keys: torch.Tensor  # (layers, depth, entries, group)
    values: torch.Tensor
    header: dict

    @property
    def group(self) -> int:
        return self.keys.shape[-1]

    def check(self, model) -> None:
        check_header(self.header, model, "rvq")

    def save(self, path: str) -> None:
        save_tensors(path, {"keys": self.keys, "values": self.values}, FORMAT, self.header)

    @classmethod
    def load(cls, path: str, model=None) -> "RvqCalibration":
        tensors, header = load_tensors(path, FORMAT, ("keys", "values"), "an RVQ calibration")
        calib = cls(tensors["keys"], tensors["values"], header)
        if model is not None:
            calib.check(model)
        return calib


def collect(model, ids: torch.Tensor, sink: int = 4, offsets: list | None = None) -> tuple[list, list]:
    """Post-RoPE keys and values per layer, (vectors, head_dim) each, tokens >= sink of each sequence;
    sequence j at positions offsets[j].. (None: all at 0)."""
    keys, values = None, None
    offsets = offsets or [0] * len(ids)
    with torch.no_grad():
        for row, off in zip(ids, offsets):
            cache = DynamicCache(config=model.config)
            pos = torch.arange(off, off + len(row))[None]
            model(row[None], position_ids=pos, **with_cache(model, cache), use_cache=True)
            ks = [layer.keys[0, :, sink:].reshape(-1, layer.keys.shape[-1]).float() for layer in cache.layers]
            vs = [layer.values[0, :, sink:].reshape(-1, layer.values.shape[-1]).float() for layer in cache.layers]
            keys = ks if keys is None else [torch.cat(p) for p in zip(keys, ks)]
            values = vs if values is None else [torch.cat(p) for p in zip(values, vs)]
    return keys, values


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int, fit_rows: int = FIT_ROWS):
    """(centroids (k, G), assignment of every row): `iters` Lloyd iterations (faiss) fitted on at most about
    `fit_rows` random rows (the rest are only assigned)."""
    n = x.shape[0]
    if n < k:
        raise KvshrinkError(f"{n} calibration vectors cannot seed {k} codewords; use more calibration text")
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=max(1, fit_rows // k),
                      min_points_per_centroid=1, verbose=False)
    km.train(x.float().contiguous().numpy())
    c = torch.from_numpy(km.centroids.copy())
    return c, nearest(x, c, (c * c).sum(-1))


def train(vectors: torch.Tensor, group: int, grouping: str, size: int = 256, depth: int = MAX_DEPTH,
          iters: int = 10, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Codebooks (depth, size, group) for vectors (N, D), and the residual energy left after
    each level as a fraction of the scaled vectors' energy."""
    d = vectors.shape[-1]
    x = vectors.float()
    rms = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    r = grouped(x / rms, channel_order(d, group, grouping), group).reshape(-1, group)
    total = r.pow(2).sum().item()
    books, left = [], []
    for level in range(depth):
        c, a = kmeans(r, size, iters, seed * MAX_DEPTH + level)
        r -= c[a]
        books.append(c)
        left.append(r.pow(2).sum().item() / total)
    return torch.stack(books), left


def check_layout(size: int, depth: int, key_grouping: str, value_grouping: str) -> None:
    for g in (key_grouping, value_grouping):
        if g not in GROUPINGS:
            raise KvshrinkError(f"unknown channel grouping {g!r}; use one of {', '.join(GROUPINGS)}")
    if not 1 <= depth <= MAX_DEPTH:
        raise KvshrinkError(f"RVQ depth {depth} is outside 1..{MAX_DEPTH}")
    if size < 2 or size & (size - 1) or size > 256:
        raise KvshrinkError(f"RVQ codebook size {size} is not a power of two between 2 and 256")


def calibrate(model, ids: torch.Tensor, data: dict | None = None, group: int = 16, size: int = 256,
              depth: int = MAX_DEPTH, key_grouping: str = "strided", value_grouping: str = "contiguous",
              iters: int = 10, progress=None) -> RvqCalibration:
    check_layout(size, depth, key_grouping, value_grouping)
    spec = spec_from_config(model.config)
    channel_order(spec.head_dim, group, key_grouping)  # refuses a group that does not divide head_dim
    t0 = time.time()
    # post-RoPE keys turn with their position: the sequences are spread over the model's context
    offsets = spread_offsets(ids.shape[0], ids.shape[1], spec.max_context)
    keys, values = collect(model, ids, offsets=offsets)
    kb, vb, kl, vl = [], [], [], []
    for i, (k, v) in enumerate(zip(keys, values)):
        books, left = train(k, group, key_grouping, size, depth, iters, seed=2 * i)
        kb.append(books)
        kl.append(left)
        books, left = train(v, group, value_grouping, size, depth, iters, seed=2 * i + 1)
        vb.append(books)
        vl.append(left)
        if progress:
            progress(i + 1, len(keys))
    header = {**model_header(model), "data": data or {}, "group": group, "size": size, "depth": depth,
              "key_grouping": key_grouping, "value_grouping": value_grouping, "iters": iters,
              "vectors_per_layer": int(keys[0].shape[0]), "positions": offsets, "seconds": round(time.time() - t0, 1),
              "key_residual": kl, "value_residual": vl}
    return RvqCalibration(torch.stack(kb), torch.stack(vb), header)


def default_path(model, group: int, size: int, key_grouping: str, value_grouping: str) -> str:
    name = f"rvq-{model_fingerprint(model)}-g{group}-k{size}-{key_grouping}-{value_grouping}-2.safetensors"
    return os.path.join(calibration_dir(), name)


def load_or_calibrate(model, tokenizer, corpus: str | None = None, group: int = 16, size: int = 256,
                      key_grouping: str = "strided", value_grouping: str = "contiguous", log=print) -> RvqCalibration:
    """The calibration at $KVSHRINK_RVQ_CALIBRATION when it matches the asked layout, else the one
    at the default path for this model and layout (learned first if it is missing)."""
    want = {"group": group, "size": size, "key_grouping": key_grouping, "value_grouping": value_grouping}
    env = os.environ.get("KVSHRINK_RVQ_CALIBRATION")
    if env:
        calib = RvqCalibration.load(env, model)
        if all(calib.header.get(k) == v for k, v in want.items()):
            return calib
    path = default_path(model, group, size, key_grouping, value_grouping)
    if os.path.isfile(path):
        return RvqCalibration.load(path, model)
    log(f"RVQ: no codebooks for this model and layout at {path}; learning them (about 35 seconds on 2 cores "
        "for the bundled 135M model, longer for larger ones)")
    ids, desc = calibration_ids(tokenizer, corpus, sequences=8, length=512)
    calib = calibrate(model, ids, desc, group, size, MAX_DEPTH, key_grouping, value_grouping)
    calib.save(path)
    return calib
