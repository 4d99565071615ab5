"""The codec interface: how the compressed body of a cache layer stores tokens.

A codec turns a slab of head vectors (batch, kv_heads, tokens, head_dim) into a
`Packed` record and back. Every tensor of a `Packed` is indexed
(batch, kv_heads, block, ...), so blocks compressed at different times are
joined by concatenating along dim 2 and decoded in one call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..errors import KvshrinkError


def storage_bytes(tensors) -> dict:
    """{address: bytes} of the storages behind `tensors`, each once (unions of these count shared
    storages once across groups of tensors)."""
    out = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        n = storage.nbytes()
        if n:  # an empty storage may share its address with a real one (loaded files)
            out[storage.data_ptr()] = n
    return out


def tensor_nbytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once."""
    return sum(storage_bytes(tensors).values())


@dataclass
class Packed:
    """Compressed blocks: named tensors indexed (batch, kv_heads, block, ...)."""

    tensors: dict[str, torch.Tensor]
    block: int  # tokens per block
    head_dim: int
    meta: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return next(iter(self.tensors.values())).shape[2]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block

    def nbytes(self) -> int:
        return tensor_nbytes(self.tensors.values())

    def __getstate__(self) -> dict:
        # a kernel's numpy views of the tensors (quant/kernel.py) are rebuilt, never written to a file
        return {k: v for k, v in self.__dict__.items() if k != "_views"}

    def _map(self, fn) -> "Packed":
        return Packed({k: fn(v) for k, v in self.tensors.items()}, self.block, self.head_dim, self.meta)

    def cat(self, other: "Packed") -> "Packed":
        return Packed(
            {k: torch.cat([v, other.tensors[k]], dim=2) for k, v in self.tensors.items()},
            self.block,
            self.head_dim,
            self.meta,
        )

    def first_blocks(self, n: int) -> "Packed":
        return self.blocks(0, n)

    def drop_first(self, tokens: int) -> "Packed":
        """Without its first `tokens` (whole blocks)."""
        return self.blocks(tokens // self.block, self.num_blocks)

    def blocks(self, start: int, stop: int) -> "Packed":
        # clone: a view would keep the dropped blocks' storage alive
        return self._map(lambda v: v[:, :, start:stop].clone())

    def take(self, index: torch.Tensor) -> "Packed":
        """The blocks at index (batch, kv_heads, n), which differ per head: one token each for per-token codes."""
        def gather(v):
            at = index.to(v.device).view(*index.shape, *([1] * (v.dim() - 3)))
            return v.gather(2, at.expand(*index.shape, *v.shape[3:]))
        return self._map(gather)

    def select_batch(self, index: torch.Tensor) -> "Packed":
        return self._map(lambda v: v.index_select(0, index.to(v.device)))

    def repeat_batch(self, repeats: int) -> "Packed":
        return self._map(lambda v: v.repeat_interleave(repeats, dim=0))


class Codec(ABC):
    """Encode/decode head vectors. Subclasses document their paper and layout.

    `block_tokens` is the token count the codec needs per block (the cache's
    block size must be a multiple of it).
    """

    name: str = "codec"
    block_tokens: int = 1
    same_per_head = False  # codes every KV head alike (no per-head basis or codebook)

    @abstractmethod
    def encode(self, x: torch.Tensor, block: int) -> Packed:
        """x: (batch, kv_heads, tokens, head_dim) float, tokens a multiple of `block`."""

    @abstractmethod
    def decode(self, packed: Packed, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, kv_heads, packed.num_tokens, head_dim) in `dtype`; written into `out` when given
        (a slice of a larger tensor: the cache decodes its history into one buffer, not piece by piece)."""

    def nbytes(self, packed: Packed) -> int:
        return packed.nbytes()

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors the codec itself holds for decoding (codebooks): counted by every cache that uses it."""
        return []

    def describe(self) -> str:
        return self.name

    def heads(self, first: int, stop: int) -> Codec:
        """The codec of KV heads first..stop-1 alone, for a layer whose heads are coded apart (core/heads.py)."""
        if self.same_per_head:
            return self
        raise KvshrinkError(f"{self.describe()} cannot code a layer's KV heads apart")

    def calibrated(self) -> list[torch.Tensor]:
        """What a calibration gave the codec and its codes mean nothing without (bases, codebooks, code tables,
        widths): a saved cache is read back only by a codec with the same (core/saved.py)."""
        return self.shared_tensors()


class Fp16(Codec):
    """Uncompressed reference: stores head vectors as float16, nothing else."""

    name = "fp16"
    same_per_head = True

    def encode(self, x: torch.Tensor, block: int) -> Packed:
        b, h, t, d = x.shape
        return Packed({"x": x.to(torch.float16).reshape(b, h, t // block, block, d)}, block, d)

    def decode(self, packed: Packed, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        x = self.flat(packed)
        return x.to(dtype) if out is None else out.copy_(x)

    @staticmethod
    def flat(packed: Packed) -> torch.Tensor:
        """The stored float16 tokens, (batch, kv_heads, tokens, head_dim), a view."""
        x = packed.tensors["x"]
        return x.reshape(*x.shape[:2], -1, packed.head_dim)
