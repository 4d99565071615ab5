"""Importance-aware ZDC (issue 23): a share of each KV head's tokens keeps every coordinate, the rest the head's rank.

FDC (arXiv 2408.04107) sets compression "in a hybrid layer-token manner": tokens attention finds important keep
more dimensions. Here each layer keeps its most recent `window` tokens in float16 at `sink_rank` coordinates, where
the attention they receive is observed (the mean probability a token got from the query rows after it, summed over
a KV head's query heads, from the last `observe` rows of each call). As tokens leave the window (every `gather`
decode steps, or all of a prompt's at once), each head keeps a running quota, round(share * left), of the most
attended ones at `sink_rank` coordinates in float16 (the high class); the rest go to the head's stores at its rank,
as every ZDC token does. With `demote`, the high tokens keep a moving average of the attention they get and compete
with the leaving ones: one that falls behind is cut to the head's rank and joins the body. Cutting coordinates is
exact (the body holds the token's leading coordinates, what it would have held had it gone there at once), and
nothing is ever widened back.

Attention is order-free over the past (positions live in the rotated keys), so the high class is one more dense
segment, between the body and the window on both paths (for the compiled kernel, joined to the window: same width,
float16). The body keeps its tokens' order right after the sink, so a left-padded row's mask still covers its
padding: padding draws no attention and never goes high (with `select=random` it can: then a padded batch's
masks fall on other tokens, as `mix-*`'s do). The kernel hands back each row's log-sum-exp, so a decode step's
window (and, when tokens leave after it, the high class) is scored exactly: exp(logit - lse). With `crop=true` a crop
below the window re-balances the classes as core/importance.py's `crop_plan` says (surplus high tokens cut to the
head's rank). What this layout cannot do: slide (sliding layers free their oldest tokens by position); it refuses in
one line. On CUDA the Triton kernel reads it as the numba one does, and its merge gives the log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.importance import ObservedWindow, lse_probs, rows_of
from ...core.layer import FUSED_QUERIES
from ...core.store import half_checked
from ...errors import KvshrinkError
from .kernel import LowRankStates
from .layer import ZdcLayer
from .states import Segment, ZdcStates


class ImportantLayer(ObservedWindow, ZdcLayer):
    """A ZdcLayer whose stores hold no window of their own: the window (core/importance.py) at `sink_rank`
    coordinates, and `hk` / `hv` the high class (B, H, n, sink_rank) float16."""

    layout = "importance-aware ZDC"
    saved_by_stores = True  # window and high class beside the stores: saved_parts (core/importance.py)

    def __init__(self, *args, share: float, window: int, gather: int, observe: int, demote: bool, memory: int,
                 select: str = "attention", seed: int = 0, places: bool = False, **kwargs):
        super().__init__(*args, window=0, **kwargs)
        self.places = places  # crop=true: the places a crop below the window needs
        self.share, self.window_size, self.leave_gather, self.observe = share, window, gather, observe
        self.demote, self.memory, self.select, self.seed = demote, memory, select, seed
        self.reset_scores()

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.open_window(key_states, self.ks[0].sink.shape[-1], self.vs[0].sink.shape[-1], self.seed)

    # --- transformers layer API -------------------------------------------------
    def update(self, key_states, value_states, *args, rotated: bool = False, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k = key_states if rotated else torch.matmul(key_states, self.uk.to(key_states.dtype))
        v = value_states
        t = k.shape[2]
        room = max(0, self.ks[0].sink_size - self.ks[0].sink.shape[-2])
        short = t <= FUSED_QUERIES
        if short:
            for s in self.ks + self.vs:
                s.thaw()
        if short and not room and self._readable():
            states = ImportantStates(self, None, t, kernel=self._kernel_states(k, v))
        else:
            states = ImportantStates(self, self._segments(k, v), t)
        if room:  # the first tokens: the stores' float16 sinks
            self._append(k[:, :, :room], v[:, :, :room])
        self.window_add(half_checked(k[:, :, room:]), half_checked(v[:, :, room:]))
        return states, states

    def _segments(self, k: torch.Tensor, v: torch.Tensor) -> list:
        """Per head, what the decoded path attends over: sink, body (with its float16 decode tokens), high class,
        window, this call's tokens (exact). The body keeps its tokens' order right after the sink, so a left-padded
        row's mask still falls on its padding (which draws no attention, so never goes high)."""
        dtype = k.dtype
        heads = []
        for h, (ks, vs) in enumerate(zip(self.ks, self.vs)):
            segs = [Segment(ks.sink[:, 0].to(dtype), vs.sink[:, 0].to(dtype))]
            if len(ks) - ks.sink.shape[-2]:
                segs.append(Segment(ks.middle(dtype)[:, 0], vs.middle(dtype)[:, 0]))
            if self.hk is not None:
                segs.append(Segment(self.hk[:, h].to(dtype), self.hv[:, h].to(dtype)))
            segs.append(Segment(self.wk[:, h].to(dtype), self.wv[:, h].to(dtype)))
            segs.append(Segment(k[:, h], v[:, h]))
            heads.append(segs)
        return heads

    def _kernel_states(self, k: torch.Tensor, v: torch.Tensor) -> LowRankStates:
        """The kernel's inputs: the high class joins the window (same width, float16), after the body as on the
        decoded path."""
        pairs = list(zip(self.ks, self.vs))
        wk, wv = self.wk, self.wv
        if self.hk is not None:  # one join for all heads (a head's slice of it is contiguous at batch 1)
            wk, wv = torch.cat([self.hk, wk], 2), torch.cat([self.hv, wv], 2)
        windows = [(wk[:, h], wv[:, h]) for h in range(len(pairs))]
        bodies = [(ks.body, vs.body) for ks, vs in pairs] if self.ks[0].body is not None else None
        return LowRankStates([(ks.sink[:, 0], vs.sink[:, 0]) for ks, vs in pairs], bodies,
                             [(ks.fresh[:, 0], vs.fresh[:, 0]) for ks, vs in pairs], windows, (k, v),
                             self.ks[0].codec, self.vs[0].codec, self.ks[0].block, self.splits, scored=True)

    def commit(self, long: bool = False) -> None:
        """Tokens past the window leave: each head's quota (core/importance.py) stays at every coordinate, the others
        are cut to the head's rank and join its stores, in their order."""
        if not self.commits(FUSED_QUERIES + 1 if long else 1):
            return
        out = self.wk.shape[2] - self.window_size
        picked, rest, _, _ = self.picks(out)
        pools = []
        for hi, win in ((self.hk, self.wk), (self.hv, self.wv)):
            leaving = win[:, :, :out]
            pools.append(leaving if hi is None else torch.cat([hi, leaving], 2))
        if picked.shape[2]:
            self.hk, self.hv = (p.gather(2, rows_of(picked, p.shape[-1])) for p in pools)
        else:
            self.hk = self.hv = None
        if rest.shape[2]:  # cut to each head's rank as the stores take them (defer: a decode step's)
            k, v = (p.gather(2, rows_of(rest, p.shape[-1])) for p in pools)
            for i, (ks, vs) in enumerate(zip(self.ks, self.vs)):
                ks.append(k[:, i:i + 1], defer=not long, checked=True)
                vs.append(v[:, i:i + 1], defer=not long, checked=True)
        self.leave(out)

    def crop_coded(self, keep: int) -> None:
        """Keep the first `keep` tokens, a cut below the window (core/importance.py's `crop_plan`): each head's store
        keeps `first` tokens, then takes its `extra` re-balancing tokens (its store's tokens it keeps past that point,
        and its demoted high tokens, cut to the head's rank: exact)."""
        n_sink = self.ks[0].sink.shape[-2]
        plan = self.crop_plan(max(keep - n_sink, 0))
        if plan is None:
            for s in self.stores():
                s.crop(keep)
            return
        first, extra, pick, down, kept = plan
        for name, stores in (("hk", self.ks), ("hv", self.vs)):
            high = getattr(self, name)
            width = stores[0].dense_width  # the sink's and the high class's: every coordinate
            for i, s in enumerate(stores):
                if extra:
                    body = s.middle(torch.float16)[:, :, first:]
                    pool = F.pad(body, (0, width - body.shape[-1]))  # the store keeps the first coordinates
                    if high is not None:
                        pool = torch.cat([pool, high[:, i:i + 1].gather(2, rows_of(down[:, i:i + 1], width))], 2)
                    s.crop(n_sink + first)
                    s.append(pool.gather(2, rows_of(pick[:, i:i + 1], pool.shape[-1])), checked=True)
                else:
                    s.crop(n_sink + first)
            setattr(self, name, high.gather(2, rows_of(kept, width)) if high is not None and kept.shape[2] else None)

    # --- what the layer holds -------------------------------------------------------
    def high_tokens(self) -> int:
        return self.hk.shape[2] if self.hk is not None else 0

    def held(self) -> int:
        return len(self.ks[0]) + self.high_tokens() + self.wk.shape[2] if self.is_initialized else 0


    def _batch_map(self, on_tensor, on_packed) -> None:
        super()._batch_map(on_tensor, on_packed)
        self.window_map(on_tensor)
        if self.hk is not None:
            self.hk, self.hv = on_tensor(self.hk), on_tensor(self.hv)

    def tensors(self) -> list[torch.Tensor]:
        out = super().tensors()
        if self.is_initialized:
            out += self.window_tensors() + [t for t in (self.hk, self.hv) if t is not None]
        return out

    def fill_reference(self, key_states, value_states, queries: torch.Tensor | None = None) -> None:
        """Store an uncompressed prefill's states, the window scored by its captured last queries (post-RoPE, the
        model's basis) over its keys, as a prefill through this layer would score it."""
        if queries is None:
            raise KvshrinkError("an importance-aware cache is filled from prefill states with captured queries")
        v = torch.einsum("bhtd,hde->bhte", value_states, self.uv.to(value_states))
        self.update(key_states, v)
        self.observe_queries(queries, key_states, key_states.shape[2])


class ImportantStates:
    """What an ImportantLayer hands the attention: it attends (the kernel, or the decoded segments), scores the
    window's tokens, and the high class's where it is re-ranked, then lets the layer commit."""

    def __init__(self, layer: ImportantLayer, heads: list | None, t: int, kernel: LowRankStates | None = None):
        self.layer, self.t, self.kernel = layer, t, kernel
        self.decoded = None if heads is None else _Watched(heads)

    @property
    def length(self) -> int:
        return (self.kernel or self.decoded).length

    def attend(self, module, query, mask, scaling=None, softcap=None):
        layer = self.layer
        b, hq, t, d = query.shape
        h = len(layer.ks)
        g = hq // h
        n_high, rows = layer.rescored(t), min(t, layer.observe)
        if self.kernel is not None:
            out, _ = self.kernel.attend(module, query, mask, scaling, softcap)
            q = self.kernel.q.view(b, h, g, t, d)[:, :, :, t - rows:]  # the kernel's: dual coordinates, scaled
            lse = self.kernel.lse.view(b, h, g, t, 1)[:, :, :, t - rows:]
            probs = lse_probs(q, layer.wk, lse, softcap, t)
            high = lse_probs(q, layer.hk, lse, softcap) if n_high else None
        else:
            w = self.decoded
            w.watch(t - rows, layer.wk.shape[2], n_high)
            out, _ = w.attend(module, query, mask, scaling, softcap)
            probs, high = w.window, w.high
        layer.observe_rows(probs, t, high)
        return out, None


class _Watched(ZdcStates):
    """ZdcStates that keep the probabilities of the last rows over the window's columns (the last n_win) and the
    high class's (just before them): `window` (B, H, G, rows, n_win), `high` (B, H, G, rows, n_high) or None."""

    def watch(self, first: int, n_win: int, n_high: int) -> None:
        self.first, self.n_win, self.n_high = first, n_win, n_high
        self.window = self.high = None

    def observe(self, head: int, t0: int, t: int, probs: torch.Tensor) -> None:
        b, g, tc, s = probs.shape
        if self.window is None:
            rows = t - self.first
            self.window = probs.new_zeros(b, len(self.heads), g, rows, self.n_win)
            self.high = probs.new_zeros(b, len(self.heads), g, rows, self.n_high) if self.n_high else None
        a = max(t0, self.first)
        if a >= t0 + tc:
            return
        self.window[:, head, :, a - self.first:t0 + tc - self.first] = probs[:, :, a - t0:, s - self.n_win:]
        if self.high is not None:
            lo = s - self.n_win - self.n_high
            self.high[:, head, :, a - self.first:t0 + tc - self.first] = probs[:, :, a - t0:, lo:lo + self.n_high]
