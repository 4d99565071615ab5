"""Registered ZDC methods: low-rank keys and values (transforms/zdc.py), alone or
with integer codes on top of the kept coordinates.

Names: `zdc-<pct>` keeps pct% of key and value dimensions in every head (only
the 4 sink tokens keep all); `zdc-adaptive-<pct>` spends the same budget per
layer, head and K/V where the calibration's loss proxy says it matters, and
splits by token: the sink tokens and the 64 most recent keep every coordinate
(measured: README); `+int4` / `+int3` quantize the kept coordinates (KIVI
layout). Options: alloc (uniform|energy|fisher), sink_rank, sink, window, block,
attend (fused: decode steps on the CPU read the body with a compiled kernel,
attention/lowrank.py; decode: PyTorch over the decoded segments), splits.
"""

from __future__ import annotations

import weakref

from .codecs.base import Fp16
from .codecs.quant import IntQuant
from .methods import BLOCK, SINK, Method, register

# memos held weakly by the object they derive from (ids can be reused once it is freed)
_RANKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ranks(calib, budget: float, alloc: str, sink_rank):
    from .transforms.zdc import choose_ranks

    memo = _RANKS.setdefault(calib, {})
    key = (budget, alloc, sink_rank)
    if key not in memo:
        memo[key] = choose_ranks(calib, budget, alloc, sink_rank)
    return memo[key]


def zdc_cache(model, pct: int, alloc: str = "fisher", bits: int | None = None, sink: int = SINK,
              sink_rank: int | None = None, window: int = 0, block: int = BLOCK, method: str | None = None,
              attend: str = "fused", splits: int = 4):
    from .zdc_cache import ZdcCache

    calib = getattr(model, "kvshrink_zdc", None)
    ranks = _ranks(calib, pct / 100, alloc, sink_rank) if calib is not None else None
    if bits:
        keys, values = IntQuant(bits, "channel", block), IntQuant(bits, "token")
    else:
        keys = values = Fp16()
    return ZdcCache(model, ranks, keys, values, sink=sink, window=window, block=block, method=method,
                    attend=attend, splits=splits)


def prepare(model, tokenizer, corpus=None, **_):
    """The ZDC-transformed copy of `model` (one per model, shared by every zdc method)."""
    from .transforms import zdc

    if getattr(model, "kvshrink_zdc", None) is not None:
        return model
    if model not in _MODELS:
        _MODELS[model] = zdc.apply(model, zdc.load_or_calibrate(model, tokenizer, corpus))
    return _MODELS[model]


ADAPTIVE_WINDOW = 64
_OPTIONS = ("alloc", "sink", "sink_rank", "window", "block", "attend", "splits")


# a plain `kvshrink bench` runs these; the rest by name (--methods)
_IN_DEFAULT_BENCH = ("zdc-50", "zdc-adaptive-50", "zdc-adaptive-75+int3", "zdc-adaptive-50+int4")


def _register(name: str, description: str, **options) -> None:
    register(Method(name, description, zdc_cache, options={**options, "method": name}, tunable=_OPTIONS,
                    prepare=prepare, default=name in _IN_DEFAULT_BENCH))


for _pct in (75, 50):
    _register(f"zdc-{_pct}", f"ZDC low-rank: {_pct}% of key/value dims in every head, float16", pct=_pct,
              alloc="uniform")
    _register(f"zdc-adaptive-{_pct}", f"ZDC low-rank: {_pct}% of dims, ranks by a Fisher loss proxy, sinks and "
              f"{ADAPTIVE_WINDOW} recent tokens full rank, float16", pct=_pct, window=ADAPTIVE_WINDOW)
_register("zdc-50+int4", "ZDC 50% uniform, kept coordinates int4 (KIVI layout)", pct=50, alloc="uniform", bits=4)
for _pct, _bits in ((75, 4), (50, 4), (75, 3)):
    _register(f"zdc-adaptive-{_pct}+int{_bits}", f"ZDC {_pct}% adaptive, kept coordinates int{_bits} (KIVI layout)",
              pct=_pct, bits=_bits, window=ADAPTIVE_WINDOW)
