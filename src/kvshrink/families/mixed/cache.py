"""MixedCache: importance-aware integer codes, two precision classes of tokens per KV head (issue 23).

Each layer keeps the first `sink` tokens in float16 and the most recent ones in a window (float16, or with
`window_bits` = `high` the high class's codes and a float16 tail of decode tokens: core/importance.py), where the
attention they receive is observed (states.py: the mean probability a token got from the query rows after it,
summed over a KV head's query heads). As tokens leave the window (every `gather` decode steps, or all of a
prompt's at once) each KV head picks, among the leaving ones, those it attended most: a running quota keeps
`share` of every head's tokens in the high class, per-token `high`-bit codes (Hadamard-rotated keys and values, as
a coded window's), and sends the rest, in their order, to a KIVI body of `low`-bit codes (core/store.py's
TokenStore: keys per channel over blocks, values per token). Every head promotes the same number of tokens, so each
class is one packed tensor; which tokens differs per head. Nothing is held twice and every class's bytes are its
tensors' (the scores are float32 for the window's tokens only).

With `crop=true` a crop below the window (`crop_coded`, core/importance.py's `crop_plan`) keeps each head's tokens
from before the cut, re-balanced so that every head again holds as many tokens of each class (surplus high tokens
demoted); without it a crop reaches only into the window.

Attention is order-free over the past (positions live in the rotated keys), so a decode step reads the body, its
stage and the important tokens in place through the int kernel (numba on the CPU, Triton on CUDA), whose
coded-window part takes the high class.
What this layout cannot do: slide (a sliding layer frees its oldest blocks by position); it refuses in one line.
"""

from __future__ import annotations

import weakref

import torch

from ...attention.function import require_kvshrink_attention, use_kvshrink_attention
from ...attention.split import SplitStates
from ...codecs.quant import IntQuant
from ...core.heads import GroupStates
from ...core.importance import ObservedWindow, rows_of
from ...core.layer import FUSED_QUERIES
from ...core.store import half_checked
from ...errors import KvshrinkError
from ..quant.cache import CompressedCache, CompressedLayer
from ..quant.kernel import IntBody, stage_supported
from . import allocate
from .config import MixedConfig
from .states import MixedStates

_CALIBS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {widths: share calibration}


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


class MixedLayer(ObservedWindow, CompressedLayer):
    """One layer: `k` / `v` the low class (sink and body; no window of their own), `hk` / `hv` the high class, the
    float16 window and the scores of core/importance.py (`hscore` updated by the calls after which tokens leave: a
    decode step's query stands for the `gather` steps since the last; with random picks, its draw)."""

    layout = "importance-aware int"
    gather = None  # the low stores take whole runs of tokens, coded at once (no float16 decode tokens)
    saved_by_stores = True  # the high class and the window beside the stores: saved_parts (core/importance.py)

    def setup(self, high: IntQuant, mixed, share: float, seed: int):
        """mixed: a MixedConfig or MixedBudgetConfig (its window and how it picks and re-ranks)."""
        self.high, self.share, self.select = high, share, mixed.select
        self.places = mixed.crop  # the places a crop below the window needs (crop_coded)
        self.coded_window = mixed.window_bits != 16  # the window in the high class's codes (config checks the width)
        self.window_size, self.leave_gather, self.observe = mixed.window, mixed.gather, mixed.observe
        # random picks keep their draws as scores, so demotion stays random too
        self.demote, self.memory, self.seed = mixed.demote, mixed.memory, seed
        self.reset_scores()
        self.mass = Mass()  # the observed attention of the tokens that went high, and of all that left

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        d = key_states.shape[-1]
        self.open_window(key_states, d, d, self.seed, self.high if self.coded_window else None)
        # the kernel reads the high class as its coded-window part, after the stage
        self.kernel_reads = self.kernel_reads and stage_supported(self.high, d)

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
        self.window_add(k, v, defer=t <= FUSED_QUERIES)
        if t <= FUSED_QUERIES and new == t and self._readable() and self.k.body_tokens():
            return (MixedStates(self, self._split_states(), t),) * 2
        return (MixedStates(self, None, t, *self.dense()),) * 2

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token held, decoded to float32, in the kernel's order: sink, body, stage, high class, window."""
        out = []
        for store, hi, win in zip((self.k, self.v), (self.hk, self.hv), self.window_states(torch.float32)):
            parts = [store.decoded(torch.float32)]
            if hi is not None:
                parts.append(self.high.decode(hi, torch.float32))
            out.append(torch.cat(parts + [win.float()], 2))
        return out[0], out[1]

    def _split_states(self) -> SplitStates:
        """Sink and float16 window (a coded window's tail) dense; body, stage, high class and a coded window's codes
        read in place by the int kernel (the last two as one run of per-token codes: no token of this call is
        among them, so every query row sees all)."""
        stage = (self.k.stage, self.v.stage, self.k.stage_codec) if self.k.stage is not None else None
        runs = [(self.hk, self.hv)] + ([(self.wk, self.wv)] if self.coded_window else [])
        runs = [r for r in runs if r[0] is not None]
        high = None
        if runs:
            k, v = runs[0] if len(runs) == 1 else (runs[0][0].cat(runs[1][0]), runs[0][1].cat(runs[1][1]))
            high = (k, v, self.high)
        wk, wv = self.tail if self.coded_window else (self.wk, self.wv)
        body = IntBody(self.k.body_parts(), self.v.body_parts(), self.k.codec, self.v.codec, self.block, stage, high,
                       scored=True)
        return SplitStates((self.k.sink, self.v.sink), body, ([self.k.fresh, wk], [self.v.fresh, wv]),
                           splits=self.splits)

    def _readable(self) -> bool:
        return super()._readable() and self.body_reads_stage

    # --- importance ---------------------------------------------------------------
    def commit(self, long: bool = False) -> None:
        """Tokens past the window leave (a decode step's only once `gather` of them wait). A running quota keeps
        round(share * left) high tokens per head: the most attended of the high tokens held and the leaving ones
        (the held ones always, without demotion). Those not kept go to the body: leaving tokens from float16, demoted
        ones from their high-bit codes (re-coded down, never up). A coded window's leaving tokens move to the high
        class as the codes they are (no second coding); those to the body are decoded from them."""
        if not self.commits(FUSED_QUERIES + 1 if long else 1):
            return
        if self.coded_window:
            self.code_tail()
        out = self.window_count() - self.window_size
        held = self.high_tokens()
        picked, rest, chosen, score = self.picks(out)
        keep = picked.shape[2]
        self.mass += (float(score[chosen[..., held:]].sum()), float(score.sum()))
        dropped = int((~chosen[..., :held]).sum())
        for name, store, win in (("hk", self.k, self.wk), ("hv", self.v, self.wv)):
            mine = getattr(self, name)
            if self.coded_window:
                codes = win.blocks(0, out)
                leaving = self.high.decode(codes, torch.float32).half() if keep < held + out else None
            else:
                leaving = win[:, :, :out]
                codes = self.high.encode(leaving.float(), 1) if keep else None  # every leaving token at high bits
            if keep:  # each head's picks taken from all candidates
                setattr(self, name, (codes if mine is None else mine.cat(codes)).take(picked))
            if keep < held + out:
                if dropped:  # demoted tokens decoded from their high-bit codes (only they), beside the leaving ones
                    pool, at = self._demoted(mine, rest, held, leaving)
                else:
                    pool, at = leaving, rest - held
                store.append(pool.gather(2, rows_of(at, pool.shape[-1])), checked=True)
        self.leave(out)

    def _demoted(self, mine, rest: torch.Tensor, held: int, leaving: torch.Tensor):
        """(pool, at): the demoted high tokens decoded (each head's, padded to the most any head demotes) then the
        leaving ones, and `rest` as indices into that pool. rest is sorted, so a head's demoted tokens (< held) lead
        it; decoding only them, not the whole high class, keeps a leaving step's cost off the high class's size."""
        demoted = rest < held
        most = int(demoted.sum(2).max())
        codes = mine.take(rest[..., :most].clamp(max=held - 1))
        pool = torch.cat([self.high.decode(codes, torch.float32).half(), leaving], 2)
        order = torch.arange(rest.shape[2], device=rest.device).expand_as(rest)
        return pool, torch.where(demoted, order, most + rest - held)

    def crop_coded(self, keep: int) -> None:
        """Keep the first `keep` tokens, a cut below the window (core/importance.py's `crop_plan`): the body keeps
        `first` tokens on every head, then takes each head's `extra` re-balancing tokens (its body tokens it keeps
        past that point, decoded; its demoted high tokens, decoded from their high-bit codes), re-coded at `low`
        bits."""
        n_sink = self.k.sink.shape[2]
        plan = self.crop_plan(max(keep - n_sink, 0))
        if plan is None:
            self.k.crop(keep)
            self.v.crop(keep)
            return
        first, extra, pick, down, kept = plan
        for name, store in (("hk", self.k), ("hv", self.v)):
            high = getattr(self, name)
            if extra:
                pool = store.decoded(torch.float32)[:, :, n_sink + first:]
                if high is not None:
                    pool = torch.cat([pool, self.high.decode(high.take(down), torch.float32)], 2)
                store.crop(n_sink + first)
                store.append(pool.gather(2, rows_of(pick, pool.shape[-1])).half(), checked=True)
            else:
                store.crop(n_sink + first)
            setattr(self, name, high.take(kept) if high is not None and kept.shape[2] else None)

    # --- what the layer holds -------------------------------------------------------
    def high_tokens(self) -> int:
        return self.hk.num_tokens if self.hk is not None else 0

    def held(self) -> int:
        return len(self.k) + self.high_tokens() + self.window_count() if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self.mass = Mass()

    def saved_parts(self) -> tuple[dict, dict]:
        parts, numbers = super().saved_parts()
        return parts, {**numbers, "mass": [self.mass.high, self.mass.all]}

    def restore_parts(self, parts: dict, numbers: dict) -> None:
        super().restore_parts(parts, numbers)
        self.mass.high, self.mass.all = numbers["mass"]

    def _batch_map(self, on_tensor, on_packed) -> None:
        super()._batch_map(on_tensor, on_packed)
        self.window_map(on_tensor, on_packed)
        if self.hk is not None:
            self.hk, self.hv = on_packed(self.hk), on_packed(self.hv)

    def tensors(self) -> list[torch.Tensor]:
        out = super().tensors()
        if not self.is_initialized:
            return out
        out += self.window_tensors()
        for p in (self.hk, self.hv):
            if p is not None:
                out.extend(p.tensors.values())
        return out


class Classes:
    """Mixin for a CompressedCache of MixedLayers: what the bench and the needle test read of the two classes."""

    def setup_classes(self, high: IntQuant, mixed, shares: list[float] | None = None) -> None:
        """shares: one per layer (allocate.choose), else `mixed.share` everywhere."""
        self.high, self.mixed = high, mixed
        self.layer_shares = list(shares) if shares is not None else [mixed.share] * len(self.layers)
        for i, layer in enumerate(self.layers):
            for part in layer.layer_parts():  # a layer in KV-head groups (core/heads.py): each part keeps its classes
                part.setup(high, mixed, self.layer_shares[i], seed=i)

    def head_agnostic(self) -> bool:
        return False  # each head keeps its own tokens in each class

    def class_shares(self) -> list[float]:
        """Per layer, the share of the coded tokens (those that left the window) held in the high class."""
        return [_mean([p.high_tokens() / p.left if getattr(p, "left", 0) else 0.0 for p in layer.layer_parts()])
                for layer in self.layers]

    def demotions(self) -> list[float]:
        """Per layer, the tokens re-coded down from the high class so far (per head, the mean over heads)."""
        return [_mean([getattr(p, "demoted", 0.0) for p in layer.layer_parts()]) for layer in self.layers]

    def high_mass(self) -> list[float]:
        """Per layer, the share of the observed attention (summed over heads and the tokens that left the window)
        that went to tokens now in the high class: how much of what attention found the high class holds."""
        return [_mean([p.mass.share() for p in layer.layer_parts()]) for layer in self.layers]

    def fill_reference(self, states) -> None:
        """Fill from an uncompressed prefill's states and its captured last queries (eval/needle.py), as a prefill
        through this cache would: store, score the window by the last `observe` queries, let the rest leave."""
        queries = getattr(states, "queries", None)
        if queries is None:
            raise KvshrinkError("an importance-aware cache is filled from prefill states with captured queries")
        for i, (k, v) in enumerate(states):
            st, _ = self.update(k, v, i)
            # a layer in head groups: each part observes its query heads' rows
            pieces = st.rows(queries[i]) if isinstance(st, GroupStates) else [(st, queries[i])]
            for part, (one, q) in zip(self.layers[i].layer_parts(), pieces):
                part.observe_queries(q, one.keys, one.t)

    def classes_described(self) -> str:
        """The high class: its share (per layer where spread), codes, how it is picked and re-ranked."""
        m = self.mixed
        again = f", re-ranked over {m.memory} rows" if m.demote else ", never demoted"
        spread = "" if getattr(m, "shares", "uniform") == "uniform" else (
            f" on average (per layer {_percents(self.layer_shares)})")
        return f"{100 * m.share:.3g}%{spread} of each head's tokens at {self.high.describe()} by {m.select}{again}"

    def window_described(self) -> str:
        width = "float16" if self.mixed.window_bits == 16 else self.high.describe()
        return f"{width} window {self.mixed.window} (+{self.mixed.gather} leaving together)"


class MixedCache(Classes, CompressedCache):
    """A transformers `Cache` of `MixedLayer`s; build it with `kvshrink.from_method("mix-int2", model)`."""

    layer_cls = MixedLayer

    def __init__(self, config, mixed: MixedConfig, attend: str, method: str | None = None,
                 shares: list[float] | None = None):
        """shares: one per layer (allocate.choose), else `mixed.share` everywhere."""
        low_keys, low_values, high = allocate.codecs(mixed.low, mixed.high, mixed.block, mixed.rotate)
        super().__init__(config, key_codec=low_keys, value_codec=low_values, sink=mixed.sink, window=0,
                         block=mixed.block, method=method, attend=attend, splits=mixed.splits)
        self.setup_classes(high, mixed, shares)

    def _describe(self) -> str:
        return (f"{self.classes_described()}, the rest keys {self.key_codec.describe()}, values "
                f"{self.value_codec.describe()}; sink {self.mixed.sink}, {self.window_described()}, block "
                f"{self.mixed.block}, " + self._how_it_attends())


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _percents(shares: list[float]) -> str:
    return " ".join(f"{s:.0%}" for s in shares)


def build(config: MixedConfig, target, method: str) -> MixedCache:
    """Every call attends through MixedStates (they score the window), so the model must use the kvshrink
    attention; attend="decode" only keeps decode steps off the kernel."""
    model_config = getattr(target, "config", target)
    require_kvshrink_attention(model_config, method)
    attend = "fused" if config.attend == "auto" else config.attend
    shares = None
    if config.shares == "allocated":
        if not hasattr(target, "set_attn_implementation"):
            raise KvshrinkError(f"{method} with allocated shares needs the model, not its config (the shares are "
                                f"calibrated on the weights): kvshrink.from_method({method!r}, model)")
        shares = allocate.choose(calibration_for(target, config), config.share)
    return MixedCache(model_config, config, attend, method, shares)


def calibration_for(model, config: MixedConfig, tokenizer=None, corpus=None) -> allocate.ShareCalibration:
    """The share calibration for this model and these widths: memo; else, with a tokenizer, the file for the budget's
    calibration tokens (measured first if missing); else any file for these weights and widths; else a clear error."""
    key = (config.low, config.high, config.block, config.rotate, config.sink)
    widths = (config.low, config.high, config.block, config.rotate)
    memo = _CALIBS.setdefault(model, {})
    if key not in memo:
        calib = allocate.load_or_measure(
            model, tokenizer, corpus, lambda data: allocate.default_path(model, data, *widths),
            lambda: allocate.found(model, *widths),
            lambda ids, data, go: allocate.calibrate(model, ids, *widths, config.sink, data, progress=go), "mix-int2")
        calib.check(model, "mix-int2", low=config.low, high=config.high, block=config.block)
        memo[key] = calib
    return memo[key]


def prepare(config: MixedConfig, model, tokenizer=None, corpus=None):
    """Every call attends through the mixed states (they score the window): the model uses the kvshrink
    attention whatever `attend` says. Allocated shares: their calibration loaded or measured."""
    use_kvshrink_attention(model)
    if config.shares == "allocated":
        calibration_for(model, config, tokenizer, corpus)
    return model
