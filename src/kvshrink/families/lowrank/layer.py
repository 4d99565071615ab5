"""ZdcLayer: one layer of a ZdcCache (cache.py), per KV head a pair of TokenStores of two widths.

Keys are rotated into their calibrated basis as they arrive (right after RoPE), values arrive already rotated
(folded v_proj). The first `sink` tokens and the `window` most recent keep `sink_rank` coordinates, float16; every
other token r_k (keys) / r_v (values) of its head, coded by the stores' codec. `update` hands the attention
segments at their stored widths (states.py) or, for a decode step on the CPU, the compiled kernel's inputs
(kernel.py).
"""

from __future__ import annotations

import torch

from ...codecs.base import Codec
from ...core.layer import FUSED_QUERIES, StoreLayer, stage_for
from ...core.store import TokenStore, half_checked
from ...errors import KvshrinkError
from ...kernels.backend import kernels_on
from .kernel import LowRankStates, supported
from .states import Segment, ZdcStates


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
        _, h, _, d = key_states.shape
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
