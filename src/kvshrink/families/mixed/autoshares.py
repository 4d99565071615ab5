"""Per-layer shares of `mix-auto`'s high class over the budget's codecs (`mix-auto-6x:shares=allocated`; issue 23:
the fraction of important tokens per layer chosen by the one-budget allocator).

The measurement is the `mix-*` one (allocate.py: each layer's attention picks its tokens as the cache does; the KL
per token when that layer alone holds its picks in the high class's codes and its other tokens in its body, at each
share of GRID), with each layer's body in the key and value codecs its allocation chose. The grid is finer than
`mix-int2`'s, in steps of 1%: a 6x body affords about 1% of the tokens at 8 bits in all.

The body is allocated first with the uniform share priced (budgeted.py); the shares are then spread with no more
high-class bytes than the uniform share's. A high token costs its codes and score less what the body spends on a
token of its layer (the allocation's `body`), so each layer's count is weighted by that (allocate.choose). The file
is keyed by the weights, the corpus range and a digest of the body's choices, the high class's width and the
calibrations beside the budget's, so another ratio or option set is measured again, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from ...codecs.quant import IntQuant
from ..budget.allocate import Allocation, codec_bytes
from .allocate import ShareCalibration, header, keyed_path, measure, newest_keyed, round_trip

GRID = (0.0, 0.01, 0.02, 0.04, 0.08)
STEP = 0.01  # every share a whole number of these: the allocation's unit
FORMAT_VERSION = 1


def digest(chosen, high: int, block: int, sink: int) -> str:
    """16 hex digits naming what a calibration is measured for: the body's choices per layer, the calibrations they
    read (file names: weights, corpus range, format), the high class's width, the block and the sink."""
    beside = [os.path.basename(p[1]) for p in (chosen.found, chosen.tables, chosen.vectors) if p is not None]
    key = [chosen.allocation.keys, chosen.allocation.values, os.path.basename(chosen.path), beside, high, block, sink]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def extra(allocation: Allocation, high: IntQuant, spec) -> list[int]:
    """Per layer, the bytes a high token (keys and values in `high`'s codes, a float32 score a head) holds over a
    body token of that layer (at least 1)."""
    heads = spec.num_kv_heads
    per_high = 2 * codec_bytes(high, heads, spec.head_dim) + 4 * heads
    return [max(round(per_high - b), 1) for b in allocation.body]


def trips(pairs: list, high: IntQuant, sink: int, block: int):
    """trips(layer, picked) for allocate.measure: the picks through `high`, the rest through the layer's body codecs
    (pairs: per layer (key codec, value codec), budget/cache.layer_codecs)."""
    def at(i: int, picked):
        k, v = pairs[i]
        return {"key": round_trip(k, high, picked, sink, block), "value": round_trip(v, high, picked, sink, block)}
    return at


def calibrate(model, ids, pairs: list, high: IntQuant, sink: int, block: int, key: str, data: dict | None = None,
              progress=None) -> ShareCalibration:
    """The KL per token of every (layer, share of GRID) on `ids` read as one sequence, over the allocation's body."""
    t0 = time.time()
    proxy = measure(model, ids, trips(pairs, high, sink, block), sink, progress, GRID)
    return ShareCalibration(proxy, header(model, ids, data, sink, t0, GRID, STEP, body=key, high=high.bits,
                                          block=block))


def default_path(model, data: dict, key: str, tag: str | None = None) -> str:
    """Keyed by the weights, the corpus range (`tag`: its digest), the body and high class (`key`: digest), format."""
    return keyed_path("mix-auto", model, data, key, FORMAT_VERSION, tag)


def found(model, key: str) -> str | None:
    """A share calibration of these weights, body and high class from any corpus range (the newest), or None."""
    return newest_keyed("mix-auto", model, key, FORMAT_VERSION)
