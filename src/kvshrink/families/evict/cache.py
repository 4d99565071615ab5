"""PagedCache: KV-Compress paged per-head eviction (Rehg, arXiv 2410.00161).

Each (layer, sequence, KV head) owns a list of blocks from one `BlockPool`, so
every head keeps its own number of tokens. Tokens arrive after RoPE, so a kept
key keeps its original position and the model's position ids keep following
the true context length (`get_seq_length` counts every token seen, kept or
not). The states it hands the attention (states.py) read each
head's own tokens and adds the attention they receive from the last `obs`
queries of every forward call to their scores; after the last layer of a call
(a prefill, a chunk, or every `interval` decode steps) the cache evicts the
lowest-scoring tokens until each sequence fits its budget (`settle`, run by the cache
before the next call or anything that reads it), rewrites every
head's survivors into as few blocks as they need, frees the rest and lets the
pool shrink.

Budgets are per sequence: `ratio` (real tokens seen x layers x heads / ratio)
or `tokens` (an absolute number of tokens per head on average; an int, or one
per sequence). The first `sink` tokens and the `window` most recent ones are
never evicted. `alloc="variable"` ranks evictions across all layers and heads
(KV-Compress); `alloc="uniform"` gives every head the same share (SnapKV).
Any per-token codec stores the kept rows (float16 by default; `kvc-8x+int4`).
"""

from __future__ import annotations

import torch

from ...attention.function import require_kvshrink_attention, use_kvshrink_attention
from ...codecs.base import Codec, Fp16, tensor_nbytes
from ...codecs.quant import IntQuant
from ...core.cache import KVCache
from ...core.layer import ATTENDS, StoreLayer
from ...core.pool import BlockPool, RowCodec
from ...core.store import half_checked
from ...errors import KvshrinkError
from ...kernels.backend import kernels_on
from ...spec import spec_from_config
from . import budget as budgets
from .config import ALLOCS, NORMS, POOLINGS, SCORES, EvictConfig
from .kernel import supported
from .states import PagedStates, RowStates, observe_window

PAD_SCORE = -1.0  # left-padding tokens: evicted before any real token


class PagedLayer(StoreLayer):
    def __init__(self, owner: "PagedCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.table = None  # (B, H, W) block ids, -1 = none
        self.length = None  # (B, H) tokens kept per head
        self.seen = 0  # tokens this layer has been given (positions 0..seen-1)
        self._slots = self._valid = None  # (B, H, S + T) slots of the rows last handed to attention
        self._n_new = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        self._init_shape(key_states)
        tokens = self.owner.tokens
        if tokens is not None and len(tokens) not in (1, b):  # refused at the call, not at its eviction
            raise KvshrinkError(f"{len(tokens)} token budgets given for a batch of {b}")
        self.owner._init_pool(d, key_states.device)
        self.table = torch.full((b, h, 0), -1, dtype=torch.long, device=self.device)
        self.length = torch.zeros(b, h, dtype=torch.long, device=self.device)
        self.is_initialized = True

    # --- storage ----------------------------------------------------------------------
    def _slots_of(self, start: torch.Tensor, n: int) -> torch.Tensor:
        """(B, H, n) slots of rows start..start+n-1 of each head (rows must have blocks)."""
        bk = self.owner.block
        idx = start[..., None] + torch.arange(n, device=self.device)
        blk = self.table.gather(2, (idx // bk).clamp(max=max(self.table.shape[2] - 1, 0)))
        return blk * bk + idx % bk

    def _grow(self, new_len: torch.Tensor) -> None:
        """Give every head the blocks it needs to hold `new_len` rows."""
        bk, pool = self.owner.block, self.owner.pool
        have = budgets.blocks_of(self.length, bk)
        want = budgets.blocks_of(new_len, bk)
        count = (want - have).flatten()
        total = int(count.sum())
        if total == 0:
            return
        width = int(want.max())
        if width > self.table.shape[2]:
            pad = self.table.new_full((*self.table.shape[:2], width - self.table.shape[2]), -1)
            self.table = torch.cat([self.table, pad], 2)
        ids = pool.alloc(total)
        units = torch.repeat_interleave(torch.arange(count.numel(), device=self.device), count)
        within = torch.arange(total, device=self.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
        col = have.flatten()[units] + within
        self.table.view(-1, self.table.shape[2])[units, col] = ids

    def _write(self, rows: dict, counts: torch.Tensor, full: bool = False) -> torch.Tensor:
        """Append rows {field: (B, H, T, ...)}, the first counts[b, h] of each head (full: all T of
        every head); returns their slots."""
        t = next(iter(rows.values())).shape[2]
        new_len = self.length + counts
        self._grow(new_len)
        slots = self._slots_of(self.length, t)
        if full:
            self.owner.pool.write(slots.reshape(-1), {k: v.reshape(-1, *v.shape[3:]) for k, v in rows.items()})
        else:
            ok = torch.arange(t, device=self.device) < counts[..., None]
            self.owner.pool.write(slots[ok], {k: v[ok] for k, v in rows.items()})
        self.length = new_len
        return slots

    def gather(self, names) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Every head's rows, padded to the longest head: ({field: (B, H, S, ...)}, valid (B, H, S), slots)."""
        bk = self.owner.block
        nb = int(budgets.blocks_of(self.length, bk).max()) if self.length.numel() else 0
        ids = self.table[:, :, :nb].clamp(min=0)
        rows = self.owner.pool.gather_blocks(ids, names)
        pos = torch.arange(nb * bk, device=self.device)
        valid = pos < self.length[..., None]
        slots = ids.repeat_interleave(bk, 2) * bk + pos % bk
        return rows, valid, slots

    # --- transformers layer API --------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if self.index == 0:
            owner.settle()  # the last call's eviction, before this call reads anything
        b, h, t, d = key_states.shape
        if self.index == 0 and self.seen == 0:
            owner.pool.reserve(owner.num_layers * b * h * -(-t // owner.block))
        if t == 1 and owner.kernel_reads and self.seen:
            return self._fused_update(key_states, value_states)
        rows, valid, slots = self.gather(owner.row_fields)
        s = valid.shape[2]
        keys = key_states.new_empty(b, h, s + t, d)
        values = keys.new_empty(b, h, s + t, d)
        if s:
            keys[:, :, :s] = owner.kc.decode({k: rows["k." + k] for k in owner.kc.fields}, keys.dtype)
            values[:, :, :s] = owner.vc.decode({k: rows["v." + k] for k in owner.vc.fields}, keys.dtype)
        keys[:, :, s:] = key_states
        values[:, :, s:] = value_states
        positions = rows["pos"].long() if s else valid.new_zeros(b, h, 0, dtype=torch.long)
        self._store(key_states, value_states, slots, valid)
        st = PagedStates(self, keys, values, valid, positions, s)
        return st, st  # Cache.update unpacks a pair; the attention function reads both from `st`

    def _write_new(self, key_states, value_states) -> torch.Tensor:
        """Code this call's tokens into rows of every head and write them; returns their slots (B, H, T)."""
        owner = self.owner
        b, h, t, _ = key_states.shape
        new = {"pos": (self.seen + torch.arange(t, device=self.device)).expand(b, h, t).to(torch.int32),
               "score": key_states.new_zeros(b, h, t, dtype=torch.float32)}
        new.update({"k." + k: v for k, v in owner.kc.encode(half_checked(key_states)).items()})
        new.update({"v." + k: v for k, v in owner.vc.encode(half_checked(value_states)).items()})
        return self._write(new, torch.full_like(self.length, t), full=True)

    def _store(self, key_states, value_states, slots, valid) -> None:
        """Write this call's rows; remember the slots and validity of the rows handed to attention."""
        b, h, t, _ = key_states.shape
        new_slots = self._write_new(key_states, value_states)
        self._slots = torch.cat([slots, new_slots], 2)
        self._valid = torch.cat([valid, valid.new_ones(b, h, t)], 2)
        self._n_new = t
        self.seen += t

    def _fused_update(self, key_states, value_states):
        """A decode step the compiled kernel serves (families/evict/kernel.py): no row is gathered or decoded,
        and its scores go to the pool through the block table (RowStates), not through `observe`."""
        n_past = self.length.clone()
        slot = self._write_new(key_states, value_states)
        self._slots = self._valid = None  # `observe` is not called for this step
        self.seen += 1
        st = RowStates(self, key_states[:, :, 0], value_states[:, :, 0], n_past, slot[:, :, 0])
        return st, st

    def observe(self, scores: torch.Tensor, pad: torch.Tensor | None = None) -> None:
        """Add (B, H, S + T) scores to the rows last handed out; `pad` (B, T) marks left padding
        among this call's T tokens (never attended, evicted first)."""
        slots, valid, t = self._slots, self._valid, self._n_new
        flat = self.owner.pool.flat("score")
        flat.index_add_(0, slots[valid], scores[valid].float())
        if pad is not None and pad.any():
            b, h, _ = slots.shape
            flat[slots[:, :, -t:][pad[:, None, :].expand(b, h, t)]] = PAD_SCORE
        self.called(t, pad)

    def called(self, t: int, pad) -> None:
        """The attention of this layer is done; after the last layer's, the call is over and the
        cache evicts before anything reads it again (`PagedCache.settle`)."""
        if self.index == self.owner.num_layers - 1:
            self.owner.pending = (t, pad)

    def held(self) -> int:
        return self.seen

    def reset(self) -> None:
        raise KvshrinkError("PagedCache.reset is not supported: make a new cache")

    def _rewrite(self, keep: torch.Tensor) -> None:
        """Keep the rows marked in `keep` (B, H, S), in order, in as few fresh blocks as they need."""
        owner = self.owner
        rows, valid, _ = self.gather(owner.pool.storage.keys())
        s = keep.shape[2]
        n_keep = keep.sum(-1)
        order = ((~keep).long() * s + torch.arange(s, device=self.device)).argsort(-1)[..., :int(n_keep.max())]
        moved = {}
        for name, r in rows.items():
            idx = order.view(*order.shape, *([1] * (r.dim() - 3))).expand(*order.shape, *r.shape[3:])
            moved[name] = r.gather(2, idx)
        owner.pool.release(self.table[self.table >= 0])
        self.table = self.table.new_full((*self.table.shape[:2], 0), -1)
        self.length = torch.zeros_like(self.length)
        self._write(moved, n_keep)

    def _keep_first(self, keep: int) -> None:
        self.owner.settle()
        rows, valid, _ = self.gather(["pos"])
        gone = valid & (rows["pos"].long() >= keep)
        if gone.any():
            self._rewrite(valid & ~gone)
        if self.index == 0 and self.owner.real is not None:
            self.owner.real -= self.seen - keep
        self.seen = keep

    def _batch_map(self, on_tensor, on_packed) -> None:
        raise KvshrinkError("PagedCache does not support beam search or batch reordering yet")

    # --- accounting --------------------------------------------------------------------
    def nbytes(self) -> int:
        """The block table and lengths; the rows themselves live in the cache's pool."""
        return tensor_nbytes([self.table, self.length]) if self.is_initialized else 0



class PagedCache(KVCache):
    """A transformers `Cache` of `PagedLayer`s over one `BlockPool`; see the module docstring."""

    forkable = False  # rows are written into the pool's storage in place

    def __init__(self, config, ratio: float | None = None, tokens=None, alloc: str = "variable",
                 score: str = "square", pool: int = 0, obs: int = 32, sink: int = 4, window: int = 8,
                 block: int = 16, interval: int | None = None, key_codec: Codec | None = None,
                 value_codec: Codec | None = None, method: str | None = None, defer: int = 0,
                 norm: str = "none", pooling: str = "avg", attend: str = "fused"):
        """defer: the first `defer` multi-token calls store without evicting (their scores still
        count), so a prompt passed as context, then question, is evicted with the question's
        attention in the observation window (SnapKV's setting) rather than before it arrives.
        attend: "fused" (decode steps on the CPU read the kept rows in place with the compiled
        kernel, families/evict/kernel.py, where it reads the row codec) or "decode" (gather and decode
        every kept row, then attend: the reference)."""
        if (ratio is None) == (tokens is None):
            raise KvshrinkError("a paged cache needs exactly one budget: ratio=R (2 to 64...) or tokens=N")
        if ratio is not None and not (isinstance(ratio, (int, float)) and ratio >= 1):
            raise KvshrinkError(f"compression ratio must be a number >= 1, got {ratio!r}")
        tok = [tokens] if isinstance(tokens, int) else list(tokens or [])
        if tokens is not None and not (tok and all(isinstance(n, int) and n >= 1 for n in tok)):
            raise KvshrinkError(f"token budget must be a positive integer (or one per sequence), got {tokens!r}")
        if alloc not in ALLOCS:
            raise KvshrinkError(f"unknown allocation {alloc!r}; use one of {', '.join(ALLOCS)}")
        if pooling not in POOLINGS:
            raise KvshrinkError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        if norm not in NORMS:
            raise KvshrinkError(f"unknown score normalization {norm!r}; use one of {', '.join(NORMS)}")
        if score not in SCORES:
            raise KvshrinkError(f"unknown score {score!r}; use one of {', '.join(SCORES)}")
        for name, val, low in (("obs", obs, 1), ("sink", sink, 0), ("window", window, 0), ("block", block, 1),
                               ("pool", pool, 0), ("defer", defer, 0)):
            if not isinstance(val, int) or val < low:
                raise KvshrinkError(f"{name} must be an integer >= {low}, got {val!r}")
        spec = spec_from_config(config)
        if spec.has_sliding:
            raise KvshrinkError(f"eviction keeps per-head budgets of full-attention layers; {spec.model_type!r} has "
                                "sliding-window layers (bounded already): use an int, kvcomp or zdc method")
        if spec.softcap:
            raise KvshrinkError(f"eviction scores rows from uncapped logits; {spec.model_type!r} soft-caps them")
        require_kvshrink_attention(config, method or "a paged cache")
        n_layers = spec.num_layers
        self.ratio, self.tokens = ratio, (tok if tokens is not None else None)
        self.alloc, self.score, self.pool_kernel, self.obs = alloc, score, pool, obs
        self.sink, self.window, self.block = sink, window, block
        self.interval = interval or block
        self.defer, self.norm, self.pooling = defer, norm, pooling
        self.key_codec = key_codec or Fp16()
        self.value_codec = value_codec or self.key_codec
        if attend not in ATTENDS:
            raise KvshrinkError(f"unknown attend {attend!r}; use one of {', '.join(ATTENDS)}")
        self.attend = attend
        self.kernel_reads = False  # fixed when the pool is made (CPU, rows the kernel reads)
        self.pool = None
        self.real = self.lead = None  # (B,) real tokens seen, leading padding
        self.steps = 0
        self.pending = None  # (tokens, padding) of a forward call whose eviction has not run yet
        self.evictions: list[dict] = []  # one record per eviction: bytes before and after
        self.num_layers = n_layers
        super().__init__([PagedLayer(self, i) for i in range(n_layers)], config, method)

    def _init_pool(self, head_dim: int, device) -> None:
        if self.pool is not None:
            return
        self.head_dim = head_dim
        self.kernel_reads = (self.attend == "fused" and kernels_on(device, "paged-row")
                             and supported(self.key_codec, self.value_codec, head_dim))
        self.kc, self.vc = RowCodec(self.key_codec, head_dim), RowCodec(self.value_codec, head_dim)
        fields = {"k." + n: f for n, f in self.kc.fields.items()}
        fields.update({"v." + n: f for n, f in self.vc.fields.items()})
        self.row_fields = [*fields, "pos"]
        fields.update(pos=((), torch.int32), score=((), torch.float32))
        self.pool = BlockPool(self.block, fields, device)

    # --- eviction ---------------------------------------------------------------------
    def settle(self) -> None:
        """Run the eviction of the last forward call, once its every layer has scored its rows."""
        if self.pending is not None:
            (t, pad), self.pending = self.pending, None
            self._after_forward(t, pad)

    @property
    def history(self) -> list[dict]:
        self.settle()
        return self.evictions

    def _after_forward(self, t: int, pad) -> None:
        b, dev = self.layers[0].length.shape[0], self.layers[0].length.device
        npad = pad.sum(1).to(dev) if pad is not None else torch.zeros(b, dtype=torch.long, device=dev)
        if self.real is None:
            self.real, self.lead = torch.zeros(b, dtype=torch.long, device=dev), npad.clone()
        self.real += t - npad
        self.steps += 1
        if t > 1 and self.defer > 0:
            self.defer -= 1
            return
        if t > 1 or self.steps >= self.interval:
            self._evict()

    def budget_blocks(self) -> list[int]:
        """Blocks each sequence may keep, over all layers and heads."""
        units = self.num_layers * self.layers[0].length.shape[1]
        b = self.layers[0].length.shape[0]
        if self.tokens is not None:
            per = self.tokens if len(self.tokens) == b else self.tokens * b if len(self.tokens) == 1 else None
            if per is None:
                raise KvshrinkError(f"{len(self.tokens)} token budgets given for a batch of {b}")
            return [n * units // self.block for n in per]
        return [int(r * units / (self.ratio * self.block)) for r in self.real.tolist()]

    def compress(self) -> None:
        """Evict until every sequence fits its budget, then let the pool shrink."""
        self.settle()
        self._evict()

    def _evict(self) -> None:
        if self.real is None:
            return
        before = self.nbytes()
        seen = self.layers[0].seen
        per_layer = [layer.gather(["score", "pos"]) for layer in self.layers]
        b, h = self.layers[0].length.shape
        smax = max(v.shape[2] for _, v, _ in per_layer)
        dev = self.layers[0].length.device
        scores = torch.full((b, self.num_layers, h, smax), torch.inf, device=dev)
        for i, (rows, valid, _) in enumerate(per_layer):
            pos = rows["pos"].long()
            lead = self.lead[:, None, None]
            sink = (pos >= lead) & (pos < lead + self.sink)  # the first real tokens, not the padding
            guard = sink | (pos >= seen - self.window) | ~valid
            scores[:, i, :, :valid.shape[2]] = rows["score"].masked_fill(guard, torch.inf)
        if self.norm != "none":  # put heads (or layers) on one scale before ranking across them
            mass = torch.where(torch.isfinite(scores), scores, 0).sum(-1, keepdim=True)
            if self.norm == "layer":
                mass = mass.sum(2, keepdim=True)
            scores = scores / mass.clamp(min=1e-30)
        lengths = torch.stack([layer.length for layer in self.layers], 1)  # (B, L, H)
        policy = budgets.variable if self.alloc == "variable" else budgets.uniform
        srt, order = scores.view(b, -1, smax).sort(dim=-1, stable=True)
        evict = torch.stack([policy(srt[i], lengths[i].flatten(), blocks, self.block)
                             for i, blocks in enumerate(self.budget_blocks())])
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(smax, device=dev).expand_as(order))
        gone = (rank < evict[..., None]).view(b, self.num_layers, h, smax)
        for i, layer in enumerate(self.layers):
            g = gone[:, i, :, :per_layer[i][1].shape[2]]
            if g.any():
                layer._rewrite(per_layer[i][1] & ~g)
        remap = self.pool.compact()
        if remap is not None:
            for layer in self.layers:
                layer.table = remap[layer.table]
        self.steps = 0
        self.evictions.append({"seen": seen, "bytes_before": before, "bytes_after": self.nbytes(),
                             "evicted": int(evict.sum())})

    # --- accounting -------------------------------------------------------------------
    def payload(self) -> list[torch.Tensor]:
        """The pool's storage, the block tables and lengths, the per-sequence counters."""
        self.settle()
        out = list(self.pool.storage.values()) if self.pool is not None else []
        out += [t for layer in self.layers if layer.is_initialized for t in (layer.table, layer.length)]
        return out + ([self.real, self.lead] if self.real is not None else [])

    def nbytes(self) -> int:
        """Pool storage (free blocks included) + block tables + per-sequence counters."""
        self.settle()
        extra = tensor_nbytes([self.real, self.lead]) if self.real is not None else 0
        return (self.pool.nbytes() if self.pool is not None else 0) + super().nbytes() + extra

    def kept_tokens(self) -> torch.Tensor:
        """(B, layers, heads) tokens each head keeps."""
        self.settle()
        return torch.stack([layer.length for layer in self.layers], 1)

    def _describe(self) -> str:
        target = f"ratio {self.ratio}x" if self.ratio is not None else f"{self.tokens} tokens/head"
        return (f"{target}, {self.alloc} per-head budgets, {self.score} scores over {self.obs} queries"
                f"{f', {self.pooling}-pooled over {self.pool_kernel}' if self.pool_kernel > 1 else ''}, sink {self.sink}, "
                f"window {self.window}, blocks of {self.block}, rows {self.key_codec.describe()}/"
                f"{self.value_codec.describe()}, " + self._how_it_attends())

    def _how_it_attends(self) -> str:
        if self.attend == "decode":
            return "decode steps gather and decode the kept rows"
        if supported(self.key_codec, self.value_codec, self.spec.head_dim):
            return "decode steps read the kept rows in place (numba kernel on the CPU, Triton on CUDA)"
        return "decode steps gather and decode the kept rows: no compiled kernel reads these rows"

    def fill_reference(self, states) -> None:
        """Fill from an uncompressed prefill's states and its captured last queries (eval/needle.py), exactly
        as a prefill through this cache would: store, score the observation window, evict."""
        queries = getattr(states, "queries", None)
        if queries is None:
            raise KvshrinkError("a paged cache is filled from prefill states with captured queries")
        for i, (k, v) in enumerate(states):
            st, _ = self.layers[i].update(k, v)
            observe_window(queries[i], st, None, k.shape[-1] ** -0.5)


def build(config: EvictConfig, target, method: str) -> PagedCache:
    model_config = getattr(target, "config", target)
    codecs = {}
    if config.bits is not None:
        codecs = dict(key_codec=IntQuant(config.bits, "token", rotate=True, seed=1),
                      value_codec=IntQuant(config.bits, "token", rotate=True, seed=2))
    ratio = None if config.tokens is not None else config.ratio
    return PagedCache(model_config, ratio=ratio, tokens=config.tokens, alloc=config.alloc, score=config.score,
                      pool=config.pool, obs=config.obs, sink=config.sink, window=config.window, block=config.block,
                      interval=config.interval, method=method, defer=config.defer, norm=config.norm,
                      pooling=config.pooling, attend=config.attend, **codecs)


def prepare(config: EvictConfig, model, tokenizer=None, corpus=None):
    """Paged rows are read by their own states: the model uses the "kvshrink" attention (in place)."""
    use_kvshrink_attention(model)
    return model
