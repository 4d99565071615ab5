"""A pool of fixed-size token blocks shared by every layer and KV head of one cache.

KV-Compress (Rehg, arXiv 2410.00161) stores the cache in blocks that each
belong to one (layer, KV head), so heads keep different numbers of tokens and
an evicted block is memory that the next allocation reuses. Here a block is
`block` token rows in a set of storage tensors (capacity, block, ...): one per
field of the key and value codecs' per-token records, plus each token's
position (int32) and its accumulated attention score (float32).

Freed blocks go on a free list and are handed out again first (LIFO), so
eviction followed by growth reuses memory before the storage grows. Storage
grows by 1/32 (amortized O(1) per block); it shrinks (`compact`, called by
the cache after each eviction) to the used blocks when more than 1/16 of
the blocks are free: the used blocks are
copied to the front of new, smaller tensors and the old storage is released,
so the bytes the cache reports fall.
"""

from __future__ import annotations

import torch

from ..codecs.base import Codec, Packed, tensor_nbytes
from ..errors import KvshrinkError

MIN_BLOCKS = 64  # never shrink below this many blocks (4 MiB of fp16 rows at head_dim 64)


class RowCodec:
    """A per-token codec seen as fixed-width rows: every token's record has the same fields and shapes,
    so a token can live in any slot of any block and be moved without re-coding."""

    def __init__(self, codec: Codec, head_dim: int):
        if codec.block_tokens != 1:
            raise KvshrinkError(f"paged storage needs a per-token codec; {codec.describe()} codes blocks of "
                                f"{codec.block_tokens} tokens")
        self.codec, self.head_dim = codec, head_dim
        probe = codec.encode(torch.zeros(1, 1, 1, head_dim), 1)
        self.meta = probe.meta
        self.fields = {name: (tuple(t.shape[3:]), t.dtype) for name, t in probe.tensors.items()}

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, H, T, d) -> {field: (B, H, T, *shape)}."""
        return self.codec.encode(x, 1).tensors

    def decode(self, rows: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
        """{field: (B, H, S, *shape)} -> (B, H, S, d)."""
        return self.codec.decode(Packed(rows, 1, self.head_dim, self.meta), dtype)


class BlockPool:
    def __init__(self, block: int, fields: dict[str, tuple], device=None):
        if not isinstance(block, int) or block < 1:
            raise KvshrinkError(f"block must be a positive integer, got {block!r}")
        self.block, self.fields, self.device = block, fields, device
        self.storage = {name: torch.empty(0, block, *shape, dtype=dtype, device=device)
                        for name, (shape, dtype) in fields.items()}
        self.free: list[int] = []  # a stack: the most recently released block is reused first
        self.handed_out = 0  # blocks allocated over the pool's life (reuse: this exceeds the capacity)

    @property
    def capacity(self) -> int:
        return next(iter(self.storage.values())).shape[0]

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def reserve(self, n: int) -> None:
        """Make room for `n` more blocks without further growth."""
        short = n - len(self.free)
        if short > 0:
            self._grow(max(self.capacity + short, self.capacity + self.capacity // 32, MIN_BLOCKS))

    def alloc(self, n: int) -> torch.Tensor:
        self.reserve(n)
        ids = self.free[len(self.free) - n:][::-1] if n else []
        del self.free[len(self.free) - n:]
        self.handed_out += n
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def release(self, ids: torch.Tensor) -> None:
        self.free.extend(ids.flatten().tolist())

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for name, t in self.storage.items():
            new = t.new_zeros(capacity, *t.shape[1:])  # zeros: padding rows read from here must be finite
            new[:old] = t
            self.storage[name] = new
        # lowest ids on top of the stack: new blocks are handed out in order
        self.free = list(range(capacity - 1, old - 1, -1)) + self.free

    def compact(self, headroom: int = 0) -> torch.Tensor | None:
        """Shrink the storage to the used blocks + `headroom` when more than 1/16 of it is free.
        Returns the old->new id map (-1 for freed blocks) that every block table must go through,
        or None if nothing moved."""
        cap, used = self.capacity, self.used
        new_cap = max(MIN_BLOCKS, used + headroom)
        if 16 * (cap - used) <= cap or new_cap >= cap:
            return None
        free = torch.zeros(cap, dtype=torch.bool, device=self.device)
        if self.free:
            free[torch.tensor(self.free, device=self.device)] = True
        keep = (~free).nonzero().flatten()
        remap = torch.full((cap + 1,), -1, dtype=torch.long, device=self.device)  # index -1 -> -1
        remap[keep] = torch.arange(used, device=self.device)
        for name, t in self.storage.items():
            new = t.new_zeros(new_cap, *t.shape[1:])
            new[:used] = t.index_select(0, keep)
            self.storage[name] = new
        self.free = list(range(new_cap - 1, used - 1, -1))
        return remap

    # --- slots: block_id * block + offset -----------------------------------------------
    def write(self, slots: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """slots (n,), rows {field: (n, *shape)}."""
        for name, t in self.storage.items():
            if name in rows:
                t.view(-1, *t.shape[2:])[slots] = rows[name].to(t.dtype)

    def gather_blocks(self, ids: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """ids (..., nb) block ids (>= 0) -> {field: (..., nb * block, *shape)}."""
        out = {}
        for name in names:
            t = self.storage[name]
            g = t.index_select(0, ids.flatten())
            out[name] = g.view(*ids.shape[:-1], ids.shape[-1] * self.block, *t.shape[2:])
        return out

    def flat(self, name: str) -> torch.Tensor:
        t = self.storage[name]
        return t.view(-1, *t.shape[2:])

    def nbytes(self) -> int:
        """Bytes of the whole storage, free blocks included: what the process really holds."""
        return tensor_nbytes(self.storage.values())

    def used_nbytes(self) -> int:
        per_block = sum(t[0:1].numel() * t.element_size() for t in self.storage.values()) if self.capacity else 0
        return self.used * per_block
