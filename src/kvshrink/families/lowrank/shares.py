"""Per-layer shares of importance-aware ZDC's high class under one budget (`zdc-mix-50:shares=allocated`).

The measurement is the `mix-*` one (families/mixed/allocate.py: each layer's attention picks its tokens as the cache
does; the KL per token when that layer alone holds its picks at `sink_rank` coordinates and the rest at the head's
rank, at every share of SHARES), with ZDC's round trips: a token cut to r coordinates is (k @ uk)[:r] mapped back
(by uk^-1 = qk^T), a value's coordinates past r are zero (the transformed model emits values in their basis). The
transformed model attends exactly as the original under the measuring attention (its queries are turned into the
key basis only inside the kvshrink attention), so it is measured as it is.

The file is keyed by the weights, the corpus range and a digest of the bases and ranks it was measured for, so a
calibration made for other ranks (another `pct` or `alloc`) or another ZDC calibration is measured again, never
reused. A high token costs (sink_rank - r) coordinates more than a low one per head, so layers whose ranks differ
are weighted by that in the allocation (families/mixed/allocate.choose).
"""

from __future__ import annotations

import hashlib
import time

import torch

from ...errors import KvshrinkError
from ..mixed.allocate import ShareCalibration, header, keyed_path, measure, newest_keyed

FORMAT_VERSION = 1


def digest(calib, ranks) -> str:
    """16 hex digits naming the key bases and the ranks (keys, values, sink tokens') a calibration is measured for."""
    h = hashlib.sha256()
    for t in (calib.uk, calib.uv, ranks.k, ranks.v, torch.tensor([ranks.sink_rank])):
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def extra(ranks) -> list[int]:
    """Per layer, the coordinates a high token holds over a low one, summed over heads, keys and values."""
    return ((ranks.sink_rank - ranks.k) + (ranks.sink_rank - ranks.v)).sum(1).tolist()


def cut(x: torch.Tensor, keep: torch.Tensor, rank: torch.Tensor, into=None, back=None) -> torch.Tensor:
    """x (1, H, n, D) with every token that `keep` (H, n) does not hold cut to its head's `rank` (H,) leading
    coordinates: in the basis `into` (H, D, D) and back by `back` (its inverse), or in place where x already is
    in basis coordinates (into None)."""
    c = x[0].float() if into is None else x[0].float() @ into.to(torch.float32)
    d = c.shape[-1]
    tail = torch.arange(d)[None, None, :] >= rank.to(torch.long)[:, None, None]  # (H, 1, D)
    c = c.masked_fill(tail & ~keep[:, :, None], 0.0)
    y = c if back is None else c @ back.to(torch.float32)
    return y[None].to(x.dtype)


def trips(calib, ranks, sink: int):
    """trips(layer, picked) for mixed/allocate.measure: the sink tokens and the picks keep every coordinate."""
    def at(i: int, picked: torch.Tensor) -> dict:
        keep = picked.clone()
        keep[:, :sink] = True
        uk, back = calib.uk[i], calib.qk[i].transpose(-1, -2)  # uk^-1 = qk^T (qk = uk^-T)
        return {"key": lambda k: cut(k, keep, ranks.k[i], uk, back),
                "value": lambda v: cut(v, keep, ranks.v[i])}
    return at


def calibrate(model, ids: torch.Tensor, ranks, sink: int = 4, data: dict | None = None,
              progress=None) -> ShareCalibration:
    """On a ZDC-transformed model: the KL per token of every (layer, share)."""
    calib = getattr(model, "kvshrink_zdc", None)
    if calib is None:
        raise KvshrinkError("a ZDC share calibration is measured on the ZDC-transformed model (kvshrink.prepare)")
    if ranks.sink_rank != calib.shape[-1]:
        raise KvshrinkError("allocated shares are measured with high tokens at every coordinate (sink_rank None)")
    t0 = time.time()
    proxy = measure(model, ids, trips(calib, ranks, sink), sink, progress)
    return ShareCalibration(proxy, header(model, ids, data, sink, t0, zdc=digest(calib, ranks)))


def default_path(model, data: dict, key: str, tag: str | None = None) -> str:
    """Keyed by the weights, the corpus range (`tag`: its digest), the bases and ranks (`key`: digest) and format."""
    return keyed_path("zdc-mix", model, data, key, FORMAT_VERSION, tag)


def found(model, key: str) -> str | None:
    """A share calibration of these weights, bases and ranks from any corpus range (the newest), or None."""
    return newest_keyed("zdc-mix", model, key, FORMAT_VERSION)
