"""MixedCache: importance-aware integer codes, two precision classes of tokens per KV head (issue 23).

Each layer keeps the first `sink` tokens in float16 and the most recent ones in a float16 window, where the
attention they receive is observed (states.py: the mean probability a token got from the query rows after it,
summed over a KV head's query heads). As tokens leave the window (every `gather` decode steps, or all of a
prompt's at once) each KV head picks, among the leaving ones, those it attended most: a running quota keeps
`share` of every head's tokens in the high class, per-token `high`-bit codes (Hadamard-rotated keys and values, as
a coded window's), and sends the rest, in their order, to a KIVI body of `low`-bit codes (core/store.py's
TokenStore: keys per channel over blocks, values per token). Every head promotes the same number of tokens, so each
class is one packed tensor; which tokens differs per head. Nothing is held twice and every class's bytes are its
tensors' (the scores are float32 for the window's tokens only).

Attention is order-free over the past (positions live in the rotated keys), so a decode step reads the body, its
stage and the important tokens in place through the int kernel, whose coded-window part takes the high class.
What this layout cannot do: crop into the coded tokens (each head holds other tokens below a cut) or slide (a
sliding layer frees its oldest blocks by position); both refuse in one line.
"""

from __future__ import annotations

import torch

from ...attention.function import require_kvshrink_attention, use_kvshrink_attention
from ...attention.split import SplitStates
from ...codecs.quant import IntQuant
from ...core.layer import FUSED_QUERIES
from ...core.store import half_checked
from ...errors import KvshrinkError
from ..quant.cache import CompressedCache, CompressedLayer
from ..quant.kernel import IntBody, stage_supported
from .config import MixedConfig
from .states import MixedStates

HIGH_SEED = 4  # the high class's rotation, apart from the body's (1, 2) and the stage's (3)


class Mass:
    """Observed attention summed as tokens leave the window: (of those that went high, of all)."""

    def __init__(self):
        self.high = self.all = 0.0

    def __iadd__(self, pair):
        self.high += pair[0]
        self.all += pair[1]
        return self

    def share(self) -> float:
        return self.high / self.all if self.all else 0.0


class MixedLayer(CompressedLayer):
    """One layer: `k` / `v` the low class (sink and body; no window of their own), `hk` / `hv` the high class,
    `wk` / `wv` the float16 window with each token's observed attention (`wsum` over `wseen` query rows)."""

    layout = "importance-aware int"
    gpu_kernel = False  # the Triton kernel reads no coded window: CUDA decodes, then attends (said once)
    gather = None  # the low stores take whole runs of tokens, coded at once (no float16 decode tokens)
    saved_by_stores = False  # the high class and the window are outside the stores

    def setup(self, high: IntQuant, share: float, select: str, window: int, gather: int, observe: int, seed: int):
        self.high, self.share, self.select = high, share, select
        self.window_size, self.leave_gather, self.observe = window, gather, observe
        self.seed = seed
        self.hk = self.hv = None
        self.left = self.promoted = 0  # tokens that left the window, and how many of them went high
        self.mass = Mass()  # the observed attention of the tokens that went high, and of all that left

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.wk = key_states.new_empty(b, h, 0, d, dtype=torch.float16)
        self.wv = torch.empty_like(self.wk)
        self.wsum = key_states.new_zeros(b, h, 0, dtype=torch.float32)
        self.wseen = torch.zeros_like(self.wsum)
        # the kernel reads the high class as its coded-window part, after the stage
        self.kernel_reads = self.kernel_reads and stage_supported(self.high, d)
        self.draws = torch.Generator().manual_seed(self.seed)

    # --- transformers layer API -------------------------------------------------
    def update(self, key_states, value_states, *args, checked=None, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = checked or (half_checked(key_states), half_checked(value_states))
        room = max(0, self.k.sink_size - self.k.sink.shape[2])
        if room:  # the first tokens: float16 sink of the low stores
            self.k.append(k[:, :, :room], checked=True)
            self.v.append(v[:, :, :room], checked=True)
            k, v = k[:, :, room:], v[:, :, room:]
        t, new = key_states.shape[2], k.shape[2]
        self.wk, self.wv = torch.cat([self.wk, k], 2), torch.cat([self.wv, v], 2)
        zeros = self.wsum.new_zeros(*self.wsum.shape[:2], new)
        self.wsum, self.wseen = torch.cat([self.wsum, zeros], 2), torch.cat([self.wseen, zeros], 2)
        if t <= FUSED_QUERIES and new == t and self._readable() and self.k.body_tokens():
            return (MixedStates(self, self._split_states(), t),) * 2
        return (MixedStates(self, None, t, *self.dense()),) * 2

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token held, decoded to float32, in the kernel's order: sink, body, stage, high class, window."""
        out = []
        for store, hi, win in ((self.k, self.hk, self.wk), (self.v, self.hv, self.wv)):
            parts = [store.decoded(torch.float32)]
            if hi is not None:
                parts.append(self.high.decode(hi, torch.float32))
            out.append(torch.cat(parts + [win.float()], 2))
        return out[0], out[1]

    def _split_states(self) -> SplitStates:
        """Sink and window dense; body, stage and high class read in place by the int kernel."""
        stage = (self.k.stage, self.v.stage, self.k.stage_codec) if self.k.stage is not None else None
        high = (self.hk, self.hv, self.high) if self.hk is not None else None
        body = IntBody(self.k.body_parts(), self.v.body_parts(), self.k.codec, self.v.codec, self.block, stage, high,
                       scored=True)
        return SplitStates((self.k.sink, self.v.sink), body, ([self.k.fresh, self.wk], [self.v.fresh, self.wv]),
                           splits=self.splits)

    def _readable(self) -> bool:
        return super()._readable() and self.body_reads_stage

    # --- importance ---------------------------------------------------------------
    def observed(self, probs: torch.Tensor, seen: torch.Tensor, t: int) -> None:
        """probs (B, H, n_win): the attention the observed rows of a call of t tokens gave each window token; seen
        (n_win,) how many rows could see it. Then the tokens past the window leave."""
        self.wsum += probs
        self.wseen += seen
        self.commit(long=t > FUSED_QUERIES)

    def importance(self) -> torch.Tensor:
        """(B, H, n_win) the mean attention each window token has received so far (0 before any query saw it)."""
        return self.wsum / self.wseen.clamp_min(1.0)

    def commit(self, long: bool = False) -> None:
        """Tokens past the window leave (a decode step's only once `gather` of them wait): each head's quota of
        them goes to the high class, most attended first, the rest to the body in their order."""
        out = self.wk.shape[2] - self.window_size
        if out <= 0 or (not long and out < self.leave_gather):
            return
        b, h, _, d = self.wk.shape
        quota = min(out, max(0, round(self.share * (self.left + out)) - self.promoted))
        high = torch.zeros(b, h, out, dtype=torch.bool, device=self.wk.device)
        score = self.importance()[..., :out]
        if quota:
            drawn = self.select == "random"
            rank = torch.rand(score.shape, generator=self.draws).to(score.device) if drawn else score
            high.scatter_(2, rank.topk(quota, dim=2).indices, True)
        self.mass += (float(score[high].sum()), float(score.sum()))
        for name, store in (("hk", self.k), ("hv", self.v)):
            leaving = (self.wk if name == "hk" else self.wv)[:, :, :out]
            if quota:
                codes = self.high.encode(leaving[high].view(b, h, quota, d).float(), 1)
                held = getattr(self, name)
                setattr(self, name, codes if held is None else held.cat(codes))
            if out > quota:
                store.append(leaving[~high].view(b, h, out - quota, d), checked=True)
        self.wk, self.wv = self.wk[:, :, out:].clone(), self.wv[:, :, out:].clone()
        self.wsum, self.wseen = self.wsum[..., out:].clone(), self.wseen[..., out:].clone()
        self.left += out
        self.promoted += quota

    # --- what the layer holds -------------------------------------------------------
    def high_tokens(self) -> int:
        return self.hk.num_tokens if self.hk is not None else 0

    def held(self) -> int:
        return len(self.k) + self.high_tokens() + self.wk.shape[2] if self.is_initialized else 0

    def slide(self, window: int) -> None:
        raise KvshrinkError("importance-aware int keeps each head's own tokens per class and cannot free the oldest "
                            "by position: no sliding-window layers")

    def _keep_first(self, keep: int) -> None:
        coded = self.held() - self.wk.shape[2]
        if keep < coded:
            raise KvshrinkError(f"importance-aware int crops only within its float16 window: it can drop at most "
                                f"{self.held() - coded} of its {self.held()} tokens")
        n = keep - coded
        self.wk, self.wv = self.wk[:, :, :n].clone(), self.wv[:, :, :n].clone()
        self.wsum, self.wseen = self.wsum[..., :n].clone(), self.wseen[..., :n].clone()

    def reset(self) -> None:
        super().reset()
        self.hk = self.hv = None
        self.left = self.promoted = 0
        self.mass = Mass()

    def _batch_map(self, on_tensor, on_packed) -> None:
        super()._batch_map(on_tensor, on_packed)
        self.wk, self.wv = on_tensor(self.wk), on_tensor(self.wv)
        self.wsum, self.wseen = on_tensor(self.wsum), on_tensor(self.wseen)
        if self.hk is not None:
            self.hk, self.hv = on_packed(self.hk), on_packed(self.hv)

    def tensors(self) -> list[torch.Tensor]:
        out = super().tensors()
        if not self.is_initialized:
            return out
        out += [self.wk, self.wv, self.wsum, self.wseen]
        for p in (self.hk, self.hv):
            if p is not None:
                out.extend(p.tensors.values())
        return out


class MixedCache(CompressedCache):
    """A transformers `Cache` of `MixedLayer`s; build it with `kvshrink.from_method("mix-int2", model)`."""

    layer_cls = MixedLayer

    def __init__(self, config, mixed: MixedConfig, attend: str, method: str | None = None):
        low_keys = IntQuant(mixed.low, "channel", mixed.block, rotate=mixed.rotate, seed=1)
        low_values = IntQuant(mixed.low, "token", rotate=mixed.rotate, seed=2)
        super().__init__(config, key_codec=low_keys, value_codec=low_values, sink=mixed.sink, window=0,
                         block=mixed.block, method=method, attend=attend, splits=mixed.splits)
        self.mixed = mixed
        self.high = IntQuant(mixed.high, "token", rotate=True, seed=HIGH_SEED)
        for i, layer in enumerate(self.layers):
            layer.setup(self.high, mixed.share, mixed.select, mixed.window, mixed.gather, mixed.observe, seed=i)

    def head_agnostic(self) -> bool:
        return False  # each head keeps its own tokens in each class

    def class_shares(self) -> list[float]:
        """Per layer, the share of the coded tokens (those that left the window) held in the high class."""
        return [layer.promoted / layer.left if getattr(layer, "left", 0) else 0.0 for layer in self.layers]

    def high_mass(self) -> list[float]:
        """Per layer, the share of the observed attention (summed over heads and the tokens that left the window)
        that went to tokens now in the high class: how much of what attention found the high class holds."""
        return [layer.mass.share() for layer in self.layers]

    def fill_reference(self, states) -> None:
        """Fill from an uncompressed prefill's states and its captured last queries (eval/needle.py), as a prefill
        through this cache would: store, score the window by the last `observe` queries, let the rest leave."""
        queries = getattr(states, "queries", None)
        if queries is None:
            raise KvshrinkError("an importance-aware cache is filled from prefill states with captured queries")
        for i, (k, v) in enumerate(states):
            st, _ = self.update(k, v, i)
            st.observe_last(queries[i], k.shape[-1] ** -0.5)

    def _describe(self) -> str:
        m = self.mixed
        return (f"{m.share:.0%} of each head's tokens at {self.high.describe()} by {m.select}, the rest keys "
                f"{self.key_codec.describe()}, values {self.value_codec.describe()}; sink {m.sink}, float16 window "
                f"{m.window} (+{m.gather} leaving together), block {m.block}, " + self._how_it_attends())


def build(config: MixedConfig, target, method: str) -> MixedCache:
    """Every call attends through MixedStates (they score the window), so the model must use the kvshrink
    attention; attend="decode" only keeps decode steps off the kernel."""
    model_config = getattr(target, "config", target)
    require_kvshrink_attention(model_config, method)
    attend = "fused" if config.attend == "auto" else config.attend
    return MixedCache(model_config, config, attend, method)


def prepare(config: MixedConfig, model, tokenizer=None, corpus=None):
    """Every call attends through the mixed states (they score the window): the model uses the kvshrink
    attention whatever `attend` says."""
    use_kvshrink_attention(model)
    return model
