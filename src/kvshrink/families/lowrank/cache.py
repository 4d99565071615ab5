"""ZdcCache: the cache of a ZDC-transformed model (see transform.py).

Per layer and KV head, keys are rotated into their calibrated basis as they
arrive (right after RoPE) and values arrive already rotated (folded v_proj).
Each token keeps only its leading coordinates, for real: the first `sink`
tokens and the `window` most recent ones keep `sink_rank` (float16; these are
the tokens that draw most of the attention), every other token r_k (keys) /
r_v (values) of its head. Each head is its own pair of `TokenStore`s of two
widths (core/store.py: sink and window at `sink_rank`, the rest at the head's
rank), coded by any codec (float16 alone, or int4/int3 on top: `zdc-50+int4`).
Nothing is padded to a common width and nothing is widened back on read:
`update` hands the attention function the segments at their stored widths.

Decode steps (at most `FUSED_QUERIES` tokens) leave their tokens in float16 in
the stores until they fill a block (core/store.py). With `attend="fused"` on the
CPU, such a step gets `LowRankStates` instead of decoded segments: a compiled
kernel reads the float16 or int-coded body in place (families/lowrank/kernel.py).
"""

from __future__ import annotations

import weakref

import torch

from ...codecs.base import Codec, Fp16, tensor_nbytes
from ...codecs.quant import IntQuant
from ...core import hostmem
from ...core.cache import KVCache
from ...core.form import Form
from ...core.layer import ATTENDS, FUSED_QUERIES, StoreLayer, check_layout, stage_for
from ...core.store import TokenStore, half_checked
from ...errors import KvshrinkError
from ...kernels.backend import kernels_on
from .config import ZdcConfig
from .kernel import LowRankStates, supported
from .states import Segment, ZdcStates
from .transform import apply, choose_ranks, load_or_calibrate


class ZdcLayer(StoreLayer):
    fused = False  # set by ZdcCache(attend="fused")
    splits = 4
    kernel_reads = False  # fused, on the CPU, and a body the kernel reads: fixed at the first update
    saved_by_stores = True

    def __init__(self, uk: torch.Tensor, uv: torch.Tensor, rk, rv, sink: int, sink_rank: int,
                 key_codec: Codec, value_codec: Codec, window: int, block: int):
        super().__init__()
        self.uk, self.uv = uk, uv  # (H, D, D)
        self.rk, self.rv = [int(r) for r in rk], [int(r) for r in rv]
        # one pair of stores per KV head: sink and window at sink_rank coordinates, the rest at the head's ranks
        self.ks = [TokenStore(key_codec, sink, window, block, stage_for(key_codec), (sink_rank, r)) for r in self.rk]
        self.vs = [TokenStore(value_codec, sink, window, block, stage_for(value_codec), (sink_rank, r))
                   for r in self.rv]

    def calibrated(self) -> list[torch.Tensor]:
        return [self.uk, self.uv]

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        if h != len(self.rk) or d != self.uk.shape[-1]:
            raise KvshrinkError(f"ZDC cache built for {len(self.rk)} KV heads of {self.uk.shape[-1]}, got {h} of {d}")
        self._init_shape(key_states)
        if self.fused:
            self.kernel_reads = kernels_on(self.device, "ZDC") and supported(
                self.ks[0].codec, self.vs[0].codec, self.ks[0].block, self.rk, self.rv)
        self.uk, self.uv = self.uk.to(self.device), self.uv.to(self.device)
        for s in self.ks + self.vs:
            s.init(key_states[:, :1, :0])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, rotated: bool = False, **kwargs):
        """rotated: the keys come already in basis coordinates (a sequence-parallel prefill sends them so)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k = key_states if rotated else torch.matmul(key_states, self.uk.to(key_states.dtype))  # (B, H, t, D) @ (H, D, D)
        v = value_states
        short = k.shape[2] <= FUSED_QUERIES  # a decode step: its tokens wait in float16 (core/store.py)
        if short:
            for s in self.ks + self.vs:
                s.thaw()  # in both attend modes, so they hold the same tokens
        if short and self._readable():
            states = self._lowrank_states(k, v)
            self._append(k, v, defer=True)
            self._slide()
            return states, states
        dtype = key_states.dtype
        heads = []
        for h, (ks, vs) in enumerate(zip(self.ks, self.vs)):
            segs = [Segment(ks.sink[:, 0].to(dtype), vs.sink[:, 0].to(dtype))] if ks.sink.shape[-2] else []
            if len(ks) - ks.sink.shape[-2] - ks.window.shape[-2]:
                segs.append(Segment(ks.middle(dtype)[:, 0], vs.middle(dtype)[:, 0]))
            if ks.window.shape[-2]:
                segs.append(Segment(ks.window[:, 0].to(dtype), vs.window[:, 0].to(dtype)))
            segs.append(Segment(k[:, h], v[:, h]))  # this call's tokens, exact
            heads.append(segs)
        self._append(k, v, defer=short)
        self._slide()
        states = ZdcStates(heads)
        return states, states

    def _readable(self) -> bool:
        """The kernel reads this layer now: `kernel_reads`, and every store's body of the same tokens."""
        if not self.kernel_reads:
            return False
        n = self.ks[0].body_tokens()
        return all(s.body_tokens() == n for s in self.ks + self.vs)

    def _lowrank_states(self, k: torch.Tensor, v: torch.Tensor):
        bodies = None
        if self.ks[0].body is not None:
            bodies = [(ks.body, vs.body) for ks, vs in zip(self.ks, self.vs)]
        pairs = list(zip(self.ks, self.vs))
        # between body and window: the float16 tokens (update thawed the stage into them)
        return LowRankStates([(ks.sink[:, 0], vs.sink[:, 0]) for ks, vs in pairs], bodies,
                             [(ks.fresh[:, 0], vs.fresh[:, 0]) for ks, vs in pairs],
                             [(ks.window[:, 0], vs.window[:, 0]) for ks, vs in pairs], (k, v),
                             self.ks[0].codec, self.vs[0].codec, self.ks[0].block, self.splits)

    def _append(self, k: torch.Tensor, v: torch.Tensor, defer: bool = False) -> None:
        if defer:  # checked once for every head's stores
            k16, v16 = half_checked(k), half_checked(v)
            for h, (ks, vs) in enumerate(zip(self.ks, self.vs)):
                ks.append(k16[:, h:h + 1], defer=True, checked=True)
                vs.append(v16[:, h:h + 1], defer=True, checked=True)
            return
        for h, (ks, vs) in enumerate(zip(self.ks, self.vs)):
            ks.append(k[:, h:h + 1])
            vs.append(v[:, h:h + 1])

    def keep_heads(self, first: int, stop: int) -> None:
        """Only KV heads first..stop-1 from now on (before the first update)."""
        self.uk, self.uv = self.uk[first:stop], self.uv[first:stop]
        self.rk, self.rv = self.rk[first:stop], self.rv[first:stop]
        self.ks, self.vs = self.ks[first:stop], self.vs[first:stop]

    def fill_reference(self, key_states, value_states) -> None:
        """Store prefill states computed by the original model (values not yet rotated)."""
        v = torch.einsum("bhtd,hde->bhte", value_states, self.uv.to(value_states))
        self.update(key_states, v)

    def held(self) -> int:
        return len(self.ks[0]) if self.is_initialized else 0

    def stores(self) -> list:
        return self.ks + self.vs

    def reset(self) -> None:
        self.is_initialized = False
        for s in self.ks + self.vs:
            s.sink = None

    def _keep_first(self, keep: int) -> None:
        for s in self.stores():
            s.crop(keep)

    def _batch_map(self, on_tensor, on_packed) -> None:
        for s in self.ks + self.vs:
            s.map_batch(on_tensor, on_packed)

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.ks + self.vs for t in s.tensors()]


class ZdcCache(KVCache):
    """A transformers Cache for a model after `transform.apply` (`kvshrink.prepare(model, "zdc-...")`)."""

    def __init__(self, model, ranks, key_codec: Codec, value_codec: Codec | None = None, sink: int = 4,
                 window: int = 0, block: int = 128, method: str | None = None, attend: str = "fused",
                 splits: int = 4):
        """attend: "fused" (decode steps on the CPU read the body in place with the compiled kernel,
        families/lowrank/kernel.py) or "decode" (every call attends in PyTorch over the decoded segments,
        families/lowrank/states.py: the reference); splits: parallel ranges of blocks per head in the kernel."""
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
        layers = [
            ZdcLayer(calib.uk[i], calib.uv[i], ranks.k[i], ranks.v[i], sink, ranks.sink_rank,
                     key_codec, value_codec, window, block)
            for i in range(calib.uk.shape[0])
        ]
        self.attend = attend
        for layer in layers:
            layer.fused, layer.splits = attend == "fused", splits
        super().__init__(layers, model.config, method)

    def nbytes(self) -> int:
        """The layers' tensors and the rank table the layout is read with."""
        return super().nbytes() + tensor_nbytes([self.ranks.k, self.ranks.v])

    def head_agnostic(self) -> bool:
        return False  # per-head bases: shard_heads slices them

    def exchange_form(self, layer_idx: int) -> Form:
        """Keys in their basis, each token at the coordinates this cache would keep of it."""
        layer = self.layers[layer_idx]
        return Form(layer.uk, layer.rk, layer.rv, self.ranks.sink_rank, self.sink, self.window)

    def shard_heads(self, first: int, stop: int) -> None:
        for layer in self.layers:
            layer.keep_heads(first, stop)

    def head_module(self, module, first: int, stop: int):
        return _Heads(module, module.zdc_qk[first:stop])

    def fill_reference(self, states) -> None:
        """Fill from [(keys, values)] per layer of the original model's prefill."""
        for layer, (k, v) in zip(self.layers, states):
            layer.fill_reference(k, v)
            hostmem.after_update(k)  # as `update` does (core/hostmem.py)

    def _describe(self) -> str:
        frac = self.ranks.fraction(self.layers[0].uk.shape[-1])
        return (f"ZDC ranks keep {100 * frac:.0f}% of dims (sink tokens {self.ranks.sink_rank}); "
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
_RANKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prepare(config: ZdcConfig, model, tokenizer=None, corpus=None):
    """The ZDC-transformed copy of `model` (one per model, shared by every zdc method): its
    calibration loaded, or made first (about a minute on the bundled model)."""
    if getattr(model, "kvshrink_zdc", None) is not None:
        return model
    if model not in _MODELS:
        _MODELS[model] = apply(model, load_or_calibrate(model, tokenizer, corpus))
    return _MODELS[model]


def _ranks(calib, budget: float, alloc: str, sink_rank):
    memo = _RANKS.setdefault(calib, {})
    key = (budget, alloc, sink_rank)
    if key not in memo:
        memo[key] = choose_ranks(calib, budget, alloc, sink_rank)
    return memo[key]


def build(config: ZdcConfig, model, method: str) -> ZdcCache:
    """The cache of a zdc method; `model` is the ZDC-transformed one (`kvshrink.prepare`)."""
    calib = getattr(model, "kvshrink_zdc", None)
    ranks = _ranks(calib, config.pct / 100, config.alloc, config.sink_rank) if calib is not None else None
    if config.bits:
        keys, values = IntQuant(config.bits, "channel", config.block), IntQuant(config.bits, "token")
    else:
        keys = values = Fp16()
    return ZdcCache(model, ranks, keys, values, sink=config.sink, window=config.window, block=config.block,
                    method=method, attend=config.attend, splits=config.splits)
