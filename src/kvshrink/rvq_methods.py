"""Registered RVQ methods (codecs/rvq.py): learned residual codebooks per layer.

  rvq-d{1..8}        depth 1 to 8, groups of 16 channels (strided for keys, contiguous for
                     values), 256 codewords (one byte per code), float16 sink of 4 tokens;
                     decode steps attend straight from the codes (a compiled kernel on the
                     CPU, attention/rvq.py)
  rvq-d{2,4}+window  the same with the 64 most recent tokens kept in float16

Options: `:group=32`, `:size=64`, `:key_grouping=contiguous`, `:value_grouping=strided`,
`:attend=codes` (attend from the codes with PyTorch, attention/coded.py), `:attend=decode`
(decode the history, then attend: the reference), `:sink=`, `:window=`.
The codebooks are learned on first use (`kvshrink calibrate --method rvq` does it ahead).
"""

from __future__ import annotations

import os
import weakref

from .codecs.rvq import RVQ
from .errors import KvshrinkError
from .methods import SINK, Method, register

TUNABLE = ("group", "size", "key_grouping", "value_grouping", "attend", "sink", "window")
LAYOUT = dict(group=16, size=256, key_grouping="strided", value_grouping="contiguous")
WINDOW = 64
ATTEND = ("fused", "codes", "decode")
DEFAULT = ("rvq-d4", "rvq-d8")
BLOCK = 64  # tokens per body append: a per-token codec moves staged codes into the body in runs of this

_CALIBS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {layout: calibration}


def calibration_for(model, tokenizer=None, corpus=None, **layout):
    """The model's codebooks for this layout: memo, else the saved file, else learned (needs the tokenizer)."""
    from . import rvq_calib

    layout = {**LAYOUT, **{k: v for k, v in layout.items() if k in LAYOUT}}
    memo = _CALIBS.setdefault(model, {})
    key = tuple(layout[k] for k in LAYOUT)
    if key not in memo:
        path = rvq_calib.default_path(model, **layout)
        if tokenizer is None:
            if not os.path.isfile(path):
                raise KvshrinkError(f"no RVQ codebooks for this model and layout at {path}: run "
                                    f"`kvshrink calibrate --method rvq --group {layout['group']}` first")
            memo[key] = rvq_calib.RvqCalibration.load(path, model)
        else:
            memo[key] = rvq_calib.load_or_calibrate(model, tokenizer, corpus, **layout)
    return memo[key]


def prepare(model, tokenizer=None, corpus=None, **options):
    """Codebooks learned or loaded once per model and layout; the model switched to the
    "kvshrink" attention in place (plain SDPA for every other cache)."""
    from .attention.paged import use_kvshrink_attention

    calibration_for(model, tokenizer, corpus, **options)
    use_kvshrink_attention(model)
    return model


def rvq_cache(model, depth: int, group: int = 16, size: int = 256, key_grouping: str = "strided",
              value_grouping: str = "contiguous", attend: str = "fused", sink: int = SINK, window: int = 0,
              method: str | None = None):
    from .attention.paged import use_kvshrink_attention
    from .coded_cache import CodedCache

    if not hasattr(model, "set_attn_implementation"):
        raise KvshrinkError(f"{method or 'an rvq method'} needs the model, not its config: "
                            f"CompressedCache.from_method({method!r}, model)")
    if attend not in ATTEND:
        raise KvshrinkError(f"unknown attend mode {attend!r}; use one of {', '.join(ATTEND)}")
    calib = calibration_for(model, group=group, size=size, key_grouping=key_grouping, value_grouping=value_grouping)
    if attend != "decode":
        use_kvshrink_attention(model)
    codecs = [(RVQ(k, key_grouping, depth), RVQ(v, value_grouping, depth)) for k, v in zip(calib.keys, calib.values)]
    cache = CodedCache(model.config, layer_codecs=codecs, sink=sink, window=window, block=BLOCK,
                       code_domain=attend != "decode", fused=attend == "fused")
    cache.method = method
    return cache


def _register(name: str, description: str, **options) -> None:
    register(Method(name, description, rvq_cache, options={**options, "method": name}, tunable=TUNABLE,
                    prepare=prepare, default=name in DEFAULT))


for _d in range(1, 9):
    _register(f"rvq-d{_d}", f"RVQ depth {_d}: learned residual codebooks per layer, 16-channel groups "
                            "(keys strided, values contiguous), 256 codewords, attention from the codes", depth=_d)
for _d in (2, 4):
    _register(f"rvq-d{_d}+window", f"rvq-d{_d} with the {WINDOW} most recent tokens in float16",
              depth=_d, window=WINDOW)
