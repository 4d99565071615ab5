"""ZdcCache: the cache of a ZDC-transformed model (see transform.py), a ZdcLayer per layer (layer.py).

Each token keeps only its leading coordinates in its head's basis, for real: sink and window tokens `sink_rank`,
every other token its head's rank (r_k keys, r_v values). With `share` (important.py) the window is also where
attention is observed, and each head's most attended tokens keep `sink_rank` coordinates as they leave it.
Decode steps on the CPU read the body in place with a compiled kernel (kernel.py).
"""

from __future__ import annotations

import copy
import weakref

from ...codecs.base import Codec, Fp16, tensor_nbytes
from ...codecs.quant import IntQuant
from ...core import hostmem
from ...core.cache import KVCache
from ...core.form import Form
from ...core.layer import ATTENDS, check_layout
from ...errors import KvshrinkError
from ..mixed.allocate import ShareCalibration, choose, load_or_measure
from . import shares as share_calib
from .config import ZdcConfig
from .important import ImportantLayer
from .kernel import supported
from .layer import ZdcLayer
from .transform import apply, choose_ranks, load_or_calibrate


class ZdcCache(KVCache):
    """A transformers Cache for a model after `transform.apply` (`kvshrink.prepare(model, "zdc-...")`)."""

    def __init__(self, model, ranks, key_codec: Codec, value_codec: Codec | None = None, sink: int = 4,
                 window: int = 0, block: int = 128, method: str | None = None, attend: str = "fused",
                 splits: int = 4, importance: dict | None = None, shares: list[float] | None = None):
        """attend: "fused" (decode steps on the CPU read the body in place with the compiled kernel,
        families/lowrank/kernel.py) or "decode" (every call attends in PyTorch over the decoded segments,
        families/lowrank/states.py: the reference); splits: parallel ranges of blocks per head in the kernel;
        importance: ImportantLayer's options (share, gather, observe, demote, memory; important.py), the window
        then its observation window; shares: importance-aware, one share per layer (else importance's everywhere)."""
        if attend not in ATTENDS:
            raise KvshrinkError(f"unknown attend {attend!r}; use one of {', '.join(ATTENDS)}")
        if not isinstance(splits, int) or splits < 1:
            raise KvshrinkError(f"splits must be a positive integer, got {splits!r}")
        calib = getattr(model, "kvshrink_zdc", None)
        if calib is None:
            raise KvshrinkError(
                "ZDC methods need a ZDC-transformed model: model = kvshrink.prepare(model, 'zdc-50', tokenizer)"
            )
        value_codec = value_codec or key_codec
        check_layout(key_codec, value_codec, sink, window, block)
        if ranks is not None and window and ranks.sink_rank < max(ranks.k.max().item(), ranks.v.max().item()):
            raise KvshrinkError(f"window tokens keep sink_rank coordinates and then join the body: a window needs "
                                f"sink_rank >= every rank (sink_rank {ranks.sink_rank}, ranks up to "
                                f"{max(ranks.k.max().item(), ranks.v.max().item())})")
        self.ranks, self.sink = ranks, sink
        self.key_codec, self.value_codec, self.window, self.block = key_codec, value_codec, window, block
        if importance is not None and not window:
            raise KvshrinkError("importance-aware ZDC observes attention in a float16 window: give it window >= 1")
        self.importance = importance
        count = calib.uk.shape[0]
        if shares is not None and (importance is None or len(shares) != count):
            raise KvshrinkError(f"per-layer shares need importance-aware layers and one share for each of {count}")
        self.layer_shares = None if importance is None else list(shares or [importance["share"]] * count)
        layers = []
        for i in range(count):
            args = (calib.uk[i], calib.uv[i], ranks.k[i], ranks.v[i], sink, ranks.sink_rank, key_codec, value_codec)
            layers.append(ZdcLayer(*args, window, block) if importance is None else
                          ImportantLayer(*args, block=block, window=window, seed=i,
                                         **{**importance, "share": self.layer_shares[i]}))
        self.attend = attend
        for layer in layers:
            layer.fused, layer.splits = attend == "fused", splits
        super().__init__(layers, model.config, method)

    def nbytes(self) -> int:
        """The layers' tensors and the rank table the layout is read with."""
        return super().nbytes() + tensor_nbytes([self.ranks.k, self.ranks.v])

    def head_agnostic(self) -> bool:
        return False  # per-head bases: shard_heads slices them

    def decoding_copy(self) -> ZdcCache:
        """A copy that attends over the decoded segments (attend="decode"): the fused path's reference on the same
        stored tokens."""
        other = copy.deepcopy(self)
        other.attend = "decode"
        for layer in other.layers:
            layer.fused = layer.kernel_reads = False
        return other

    def exchange_form(self, layer_idx: int) -> Form:
        """Keys in their basis, each token at the coordinates this cache would keep of it."""
        if self.importance is not None:
            raise KvshrinkError("importance-aware ZDC picks tokens by the attention one process observes: it does "
                                "not run sequence-parallel")
        layer = self.layers[layer_idx]
        return Form(layer.uk, layer.rk, layer.rv, self.ranks.sink_rank, self.sink, self.window)

    def shard_heads(self, first: int, stop: int) -> None:
        for layer in self.layers:
            layer.keep_heads(first, stop)

    def head_module(self, module, first: int, stop: int):
        return _Heads(module, module.zdc_qk[first:stop])

    def fill_reference(self, states) -> None:
        """Fill from [(keys, values)] per layer of the original model's prefill (importance-aware: with its captured
        last queries, eval/needle.py)."""
        for i, (layer, (k, v)) in enumerate(zip(self.layers, states)):
            if self.importance is None:
                layer.fill_reference(k, v)
            else:
                queries = getattr(states, "queries", None)
                layer.fill_reference(k, v, None if queries is None else queries[i])
            hostmem.after_update(k)  # as `update` does (core/hostmem.py)

    def _describe(self) -> str:
        frac = self.ranks.fraction(self.layers[0].uk.shape[-1])
        imp = self.importance
        if imp is not None:
            again = f", re-ranked over {imp['memory']} rows" if imp["demote"] else ", never demoted"
            how = "drawn at random" if imp["select"] == "random" else "most attended"
            spread = "" if len(set(self.layer_shares)) == 1 else (
                " on average, per layer " + " ".join(f"{x:.0%}" for x in self.layer_shares))
            frac = (f"{100 * frac:.0f}% of dims, and {imp['share']:.0%}{spread} of each head's tokens ({how} in the "
                    f"float16 window of {self.window}{again}) keep {self.ranks.sink_rank}")
        else:
            frac = f"{100 * frac:.0f}% of dims"
        return (f"ZDC ranks keep {frac} (sink tokens {self.ranks.sink_rank}); "
                f"keys {self.key_codec.describe()}, values {self.value_codec.describe()}; {self._how_it_attends()}")

    def _how_it_attends(self) -> str:
        if self.attend == "decode":
            return "attention over the decoded segments (PyTorch)"
        if supported(self.key_codec, self.value_codec, self.block, self.ranks.k.flatten().tolist(),
                     self.ranks.v.flatten().tolist()):
            return "fused decode attention (numba kernel on the CPU, Triton on CUDA)"
        return "attention over the decoded segments (PyTorch): no compiled kernel reads these codes"


class _Heads:
    """An attention module as the states of some of its KV heads read it: their query maps only."""

    def __init__(self, module, zdc_qk):
        self.module, self.zdc_qk = module, zdc_qk

    def __getattr__(self, name):
        return getattr(self.module, name)


# memos held weakly by the object they derive from (ids can be reused once it is freed)
_RANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SHARES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformed model -> {(digest, sink): calibration}


def prepare(config: ZdcConfig, model, tokenizer=None, corpus=None):
    """The ZDC-transformed copy of `model` (one per model, shared by every zdc method): its
    calibration loaded, or made first (about a minute on the bundled model)."""
    if getattr(model, "kvshrink_zdc", None) is not None:
        return model
    if model not in _MODELS:
        _MODELS[model] = apply(model, load_or_calibrate(model, tokenizer, corpus))
    out = _MODELS[model]
    if config.shares == "allocated":
        shares_for(out, config, tokenizer, corpus)
    return out


def shares_for(model, config: ZdcConfig, tokenizer=None, corpus=None) -> ShareCalibration:
    """The share calibration for this transformed model's bases and these ranks: memo; else, with a tokenizer, the
    file for the budget's calibration tokens (measured first if missing); else any file for these weights, bases and
    ranks; else a clear error."""
    ranks = _ranks(model.kvshrink_zdc, config.kept, config.alloc, config.sink_rank)
    key = share_calib.digest(model.kvshrink_zdc, ranks)
    memo = _SHARES.setdefault(model, {})
    if (key, config.sink) not in memo:
        calib = load_or_measure(
            model, tokenizer, corpus, lambda data: share_calib.default_path(model, data, key),
            lambda: share_calib.found(model, key),
            lambda ids, data, go: share_calib.calibrate(model, ids, ranks, config.sink, data, progress=go), "zdc-mix-50")
        calib.check(model, "zdc-mix-50", zdc=key, sink=config.sink)
        memo[key, config.sink] = calib
    return memo[key, config.sink]


def _ranks(calib, budget: float, alloc: str, sink_rank):
    memo = _RANKS.setdefault(calib, {})
    key = (budget, alloc, sink_rank)
    if key not in memo:
        memo[key] = choose_ranks(calib, budget, alloc, sink_rank)
    return memo[key]


def build(config: ZdcConfig, model, method: str) -> ZdcCache:
    """The cache of a zdc method; `model` is the ZDC-transformed one (`kvshrink.prepare`)."""
    calib = getattr(model, "kvshrink_zdc", None)
    ranks = _ranks(calib, config.kept, config.alloc, config.sink_rank) if calib is not None else None
    if config.bits:
        keys, values = IntQuant(config.bits, "channel", config.block), IntQuant(config.bits, "token")
    else:
        keys = values = Fp16()
    importance = None
    if config.share:
        importance = {"share": config.share, "gather": config.gather, "observe": config.observe,
                      "demote": config.demote, "memory": config.memory, "select": config.select, "places": config.crop}
    shares = None
    if config.shares == "allocated" and calib is not None:
        shares = choose(shares_for(model, config), config.share, share_calib.extra(ranks))
    return ZdcCache(model, ranks, keys, values, sink=config.sink, window=config.window, block=config.block,
                    method=method, attend=config.attend, splits=config.splits, importance=importance, shares=shares)
