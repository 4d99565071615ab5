"""Per-layer shares of the high class under one budget (issue 23: FDC's hybrid layer-token ratios), for `mix-*`
here and for importance-aware ZDC (families/lowrank/shares.py: the same measurement over other round trips).

Calibration (once per model, corpus range, widths and block): on the budget calibration's tokens (families/budget,
the corpus's last 2,048, read as one sequence), each layer's attention picks its important tokens as the cache does,
by the mean attention a token gets from the `OBSERVED` queries after it (summed over a KV head's query heads); then,
for every share of `SHARES`, the KL per token of the model's predictions when that layer's keys and values go through
the round trip of both classes (each head's picks at `high` bits per token, the rest in their order as whole KIVI
blocks at `low` bits; core/sensitivity.Perturbed, every query reading its `RECENT` positions before it unchanged, as
the budget's measured choices are). One forward pass per layer and share.

Allocation: one share per layer minimizing the summed KL with no more bytes in all than a uniform share holds (the
budget family's multiple-choice knapsack, families/budget/allocate.allocate): a coded token's bytes are affine in
its class, so where a high token costs the same extra bytes in every layer the budget is the count of high tokens,
and where it does not (ZDC's ranks per layer) each layer's count is weighted by its extra bytes. Uniform shares are one feasible point, so the
allocation is never worse on the proxy.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ...codecs.quant import IntQuant
from ...core.calibfile import (
    calibration_dir,
    calibration_ids,
    check_header,
    load_tensors,
    model_fingerprint,
    model_header,
    save_tensors,
)
from ...core.sensitivity import Perturbed, collect
from ...errors import KvshrinkError
from ...spec import spec_from_config
from ..budget.allocate import allocate, calibration_shape, data_tag, with_progress
from ..budget.config import RECENT

FORMAT = "kvshrink-mixed-shares-1"
SHARES = (0.0, 0.05, 0.1, 0.2, 0.4)
QUANTUM = 0.05  # every share a whole number of these: the allocation's unit
OBSERVED = 32  # query rows after a token that score it: the window (16) and the decode tokens leaving with it (16)


def _items(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


@dataclass(eq=False)
class ShareCalibration:
    """proxy (L, len(SHARES)): each layer's KL per token at each share; header: model, data, widths."""

    proxy: torch.Tensor
    header: dict

    def check(self, model, method: str, **want) -> None:
        """Refuse a calibration of other weights, or of other settings (`want`: header keys and their values)."""
        check_header(self.header, model, method, what="share calibration")
        have = {k: self.header.get(k) for k in want}
        if have != want:
            raise KvshrinkError(f"share calibration is for {_items(have)}, not {_items(want)}")

    def save(self, path: str) -> None:
        save_tensors(path, {"proxy": self.proxy}, FORMAT, self.header)

    @classmethod
    def load(cls, path: str) -> ShareCalibration:
        tensors, header = load_tensors(path, FORMAT, ("proxy",), "a share calibration")
        return cls(tensors["proxy"], header)


def codecs(low: int, high: int, block: int, rotate: bool) -> tuple[IntQuant, IntQuant, IntQuant]:
    """(body keys, body values, high class): the codecs a MixedCache of these widths holds (the high class's rotation
    apart from the body's and the stage's, seed 3)."""
    return (IntQuant(low, "channel", block, rotate=rotate, seed=1), IntQuant(low, "token", rotate=rotate, seed=2),
            IntQuant(high, "token", rotate=True, seed=4))


def scores(q: torch.Tensor, k: torch.Tensor, scaling: float, rows: int = OBSERVED) -> torch.Tensor:
    """(H, n) each token's mean attention from the `rows` queries from it on (itself included), summed over the KV
    head's query heads: q (Hq, n, D), k (H, n, D), post-RoPE, causal."""
    hq, n, _ = q.shape
    h = k.shape[0]
    s = (q.float() * scaling) @ k.float().repeat_interleave(hq // h, 0).transpose(1, 2)
    p = torch.softmax(s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu_(1), float("-inf")), -1)
    total, seen = torch.zeros(hq, n), torch.zeros(n)
    for o in range(min(rows, n)):
        total[:, :n - o] += p.diagonal(-o, 1, 2)
        seen[:n - o] += 1
    return (total / seen).view(h, hq // h, n).sum(1)


def picks(score: torch.Tensor, share: float, sink: int) -> torch.Tensor:
    """(H, n) bool: each head's round(share * coded tokens) highest-scored tokens after the sink."""
    h, n = score.shape
    out = torch.zeros(h, n, dtype=torch.bool)
    keep = round(share * (n - sink))
    if keep:
        out[:, sink:].scatter_(1, score[:, sink:].topk(keep, dim=1).indices, True)
    return out


def round_trip(body: IntQuant, high: IntQuant, picked: torch.Tensor, sink: int, block: int):
    """x (1, H, n, D) -> x with each head's picked tokens through `high` (per token) and its other tokens after the
    sink, in their order, through `body` in whole blocks (a partial block as it is, as body_round_trip)."""
    h = picked.shape[0]
    keep = int(picked[0].sum())
    rest = picked.clone()
    rest[:, :sink] = True
    low = (~rest).nonzero()[:, 1].view(h, -1)
    top = picked.nonzero()[:, 1].view(h, keep)
    whole = low.shape[1] // block * block

    def trip(x):
        y = x.clone()
        for at, codec, unit in ((top, high, 1), (low[:, :whole], body, block)):
            if at.shape[1]:
                idx = at[None, :, :, None].expand(1, h, at.shape[1], x.shape[-1])
                part = x.gather(2, idx).float().contiguous()
                y.scatter_(2, idx, codec.decode(codec.encode(part, unit)).to(x.dtype))
        return y
    return trip


def measure(model, ids: torch.Tensor, trips, sink: int, progress=None, grid=SHARES) -> torch.Tensor:
    """(L, len(grid)) the KL per token of every (layer, share of `grid`) on `ids` read as one sequence, where
    trips(layer, picked) gives that layer's {"key": f, "value": g} round trips for the picked tokens (H, n) bool."""
    spec = spec_from_config(model.config)
    seq = ids.reshape(1, -1)
    scaling = {m.layer_idx: m.scaling for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")}
    collected = next(collect(model, seq))
    perturbed = Perturbed(model, seq, recent=RECENT)
    proxy = torch.zeros(spec.num_layers, len(grid), dtype=torch.float64)
    for i in range(spec.num_layers):
        q, k = collected[i][0], collected[i][1]
        score = scores(q, k, scaling.get(i, k.shape[-1] ** -0.5))
        for j, share in enumerate(grid):
            proxy[i, j] = max(perturbed.kl_many({i: trips(i, picks(score, share, sink))}), 0.0)
            if progress is not None:
                progress()
    return proxy


def header(model, seq: torch.Tensor, data: dict | None, sink: int, t0: float, grid=SHARES, quantum=QUANTUM,
           **settings) -> dict:
    """A share calibration's header: the model, the corpus range, the settings and shares it was measured for."""
    return {**model_header(model), "data": data or {}, **settings, "sink": sink, "shares": list(grid),
            "quantum": quantum, "observed": OBSERVED, "recent": RECENT, "proxy": "KL per token (measured)",
            "tokens": seq.numel(), "seconds": round(time.time() - t0, 1)}


def calibrate(model, ids: torch.Tensor, low: int, high: int, block: int, rotate: bool, sink: int = 4,
              data: dict | None = None, progress=None) -> ShareCalibration:
    """The KL per token of every (layer, share) on `ids` read as one sequence, through both int classes."""
    t0 = time.time()
    if ids.numel() - sink < 2 * block:
        raise KvshrinkError(f"share calibration needs at least {2 * block + sink} tokens, got {ids.numel()}")
    key_codec, value_codec, high_codec = codecs(low, high, block, rotate)

    def trips(_, picked):
        return {"key": round_trip(key_codec, high_codec, picked, sink, block),
                "value": round_trip(value_codec, high_codec, picked, sink, block)}
    proxy = measure(model, ids, trips, sink, progress)
    return ShareCalibration(proxy, header(model, ids, data, sink, t0, low=low, high=high, block=block,
                                          rotate=rotate))


def choose(calib: ShareCalibration, share: float, extra: list[int] | None = None) -> list[float]:
    """One share per layer, the summed KL least with no more bytes than every layer at `share` would hold. extra:
    per layer, the bytes a high token holds over a low one (a coded token's bytes are affine in its class); None:
    the same in every layer, so the budget is the count of high tokens. Sizes in whole steps of the header's
    `quantum` (QUANTUM in files that have none), exact."""
    shares = np.asarray(calib.header["shares"], dtype=np.float64)
    if not shares.min() <= share <= shares.max():
        raise KvshrinkError(f"allocated shares spend share={share} per layer on average: it must lie within the "
                            f"calibrated {shares.min()} to {shares.max()}")
    layers = calib.proxy.shape[0]
    weight = np.ones(layers, dtype=np.int64) if extra is None else np.asarray(extra, dtype=np.int64)
    weight = weight // np.gcd.reduce(weight) if weight.any() else weight
    quantum = float(calib.header.get("quantum", QUANTUM))
    units = np.round(shares / quantum).astype(np.int64)
    cap = int(np.floor(weight.sum() * share / quantum + 1e-9))
    if cap == 0:
        return [0.0] * layers
    picked, _ = allocate([(calib.proxy[i].numpy(), units * weight[i]) for i in range(layers)], cap, cells=cap)
    return [float(shares[j]) for j in picked]


def load_or_measure(model, tokenizer, corpus, path_of, newest, measure, name: str, grid=SHARES) -> ShareCalibration:
    """A share calibration: with a tokenizer, the file path_of(data) for the budget's calibration tokens (measured
    first by measure(ids, data, progress) if missing); without one, newest() (any corpus range) or a clear error."""
    if tokenizer is not None:
        spec = spec_from_config(model.config)
        ids, data = calibration_ids(tokenizer, corpus, *calibration_shape(spec))
        path = path_of(data)
        if not os.path.isfile(path):
            passes = spec.num_layers * len(grid)
            print(f"{name.split('-')[0]}: no share calibration for this model, corpus range and settings at {path}; "
                  f"measuring it ({passes} forward passes over {ids.numel()} tokens: half an hour on 2 cores for the "
                  "bundled model)", file=sys.stderr)
            with_progress("share calibration", passes, lambda go: measure(ids, data, go)).save(path)
    else:
        path = newest()
        if path is None:
            raise KvshrinkError(f"allocated shares need a share calibration: run kvshrink.prepare(model, "
                                f"'{name}:shares=allocated', tokenizer) first")
    return ShareCalibration.load(path)


def default_path(model, data: dict, low: int, high: int, block: int, rotate: bool, tag: str | None = None) -> str:
    """Keyed by the model's weights, the calibration corpus range (`tag`: its digest), the widths and block, and the
    format."""
    tag = data_tag(data) if tag is None else tag
    rot = "r" if rotate else ""
    return os.path.join(calibration_dir(), f"mix-{model_fingerprint(model)}-{tag}-l{low}{rot}h{high}-b{block}-"
                                           f"v{FORMAT.rsplit('-', 1)[1]}.safetensors")


def found(model, low: int, high: int, block: int, rotate: bool) -> str | None:
    """A share calibration of this model's weights and these widths from any corpus range (the newest), or None."""
    return _newest(default_path(model, {}, low, high, block, rotate, tag="*"))


def keyed_path(prefix: str, model, data: dict, key: str, version: int, tag: str | None = None) -> str:
    """A share calibration's file over another family's round trips: keyed by the weights, the corpus range (`tag`:
    its digest), what it was measured over (`key`: a digest) and the format version."""
    tag = data_tag(data) if tag is None else tag
    return os.path.join(calibration_dir(), f"{prefix}-{model_fingerprint(model)}-{tag}-{key}-v{version}.safetensors")


def newest_keyed(prefix: str, model, key: str, version: int) -> str | None:
    """The newest `keyed_path` file of these weights and key from any corpus range, or None."""
    return _newest(keyed_path(prefix, model, {}, key, version, tag="*"))


def _newest(pattern: str) -> str | None:
    paths = glob.glob(pattern)
    return max(paths, key=os.path.getmtime) if paths else None
