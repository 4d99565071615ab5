"""Residual vector quantization of head vectors (Kumar, arXiv 2410.15704).

Each key or value vector is divided by its root mean square (stored as one
float16 per vector), its channels are split into groups of `group`, and every
group is coded by the same residual stack of codebooks: level 1 picks the
nearest codeword, level 2 codes what is left, and so on (greedy, by batched
distance matrix products). Codes take log2(codebook size) bits each, packed
densely. The codebooks of a layer are learned offline (`kvshrink.families.rvq.calibrate`).

Grouping: "strided" puts channels g, g + n, g + 2n, ... in group g (n groups),
"contiguous" puts neighbouring channels together. The paper found
non-contiguous groups better for keys. With rotate-half RoPE, a strided group
holds both channels of each rotated pair whenever n divides head_dim / 2.

Attention from the codes (`key_scores`, `value_sums`): q . k is the sum over
groups and levels of q_g . c_level[code], so the query's dot products with
every codeword are computed once per step and gathered; the value sum
accumulates each codeword's total attention weight and multiplies the small
weight table by the codebooks once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import KvshrinkError
from .base import Codec, Packed
from .packing import pack, unpack

GROUPINGS = ("strided", "contiguous")
_ROWS = 1 << 15  # vectors per distance matrix: bounds encode memory
_GATHER = 1 << 24  # gathered elements per step of key_scores


def channel_order(head_dim: int, group: int, grouping: str) -> torch.Tensor:
    """Channel permutation: the first `group` entries are group 0, and so on."""
    if grouping not in GROUPINGS:
        raise KvshrinkError(f"unknown channel grouping {grouping!r}; use one of {', '.join(GROUPINGS)}")
    if not isinstance(group, int) or group < 1 or head_dim % group:
        raise KvshrinkError(f"RVQ group size {group!r} does not divide head_dim {head_dim}")
    ch = torch.arange(head_dim)
    if grouping == "contiguous":
        return ch
    return ch.view(group, head_dim // group).T.reshape(-1)


def grouped(x: torch.Tensor, order: torch.Tensor, group: int) -> torch.Tensor:
    """(..., D) -> (..., D / group, group) in the codec's channel order."""
    return x[..., order.to(x.device)].reshape(*x.shape[:-1], -1, group)


def nearest(r: torch.Tensor, book: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of `book` (K, G) for every row of r (N, G), in chunks."""
    out = torch.empty(r.shape[0], dtype=torch.long, device=r.device)
    for i in range(0, r.shape[0], _ROWS):
        d = torch.addmm(norms, r[i:i + _ROWS], book.T, alpha=-2.0)  # |c|^2 - 2 r.c
        out[i:i + _ROWS] = d.argmin(-1)
    return out


def residual_codes(y: torch.Tensor, books: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual coding of y (N, G) with books (L, K, G): (codes (N, L), final residual)."""
    r = y.clone()
    codes = torch.empty(y.shape[0], books.shape[0], dtype=torch.long, device=y.device)
    for lvl, book in enumerate(books):
        idx = nearest(r, book, (book * book).sum(-1))
        codes[:, lvl] = idx
        r -= book[idx]
    return codes, r


def _half_up(t: torch.Tensor) -> torch.Tensor:
    h = t.to(torch.float16)
    return torch.where(h.float() < t, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


class RVQ(Codec):
    """Residual vector quantization with learned codebooks (L, K, G): depth L, K entries of
    `group` channels. Per token (block_tokens = 1): codes of every group and level, packed,
    plus one float16 scale. The codebooks are held by the codec and counted by the cache
    (`shared_tensors`)."""

    def __init__(self, codebooks: torch.Tensor, grouping: str = "strided", depth: int | None = None):
        if codebooks.dim() != 3:
            raise KvshrinkError(f"RVQ codebooks must be (depth, entries, group), got shape {tuple(codebooks.shape)}")
        total, k, g = codebooks.shape
        depth = total if depth is None else depth
        if not isinstance(depth, int) or not 1 <= depth <= total:
            raise KvshrinkError(f"RVQ depth {depth!r} is outside 1..{total} (the levels these codebooks have)")
        bits = k.bit_length() - 1
        if k < 2 or k != 1 << bits or bits > 8:
            raise KvshrinkError(f"RVQ codebook size {k} is not a power of two between 2 and 256")
        if not torch.isfinite(codebooks).all():
            raise KvshrinkError("RVQ codebooks contain NaN or infinite entries")
        if grouping not in GROUPINGS:
            raise KvshrinkError(f"unknown channel grouping {grouping!r}; use one of {', '.join(GROUPINGS)}")
        self.books = codebooks[:depth].to(torch.float16).contiguous()  # what the cache holds (and counts)
        self._memo = {}  # channel orders and code offsets, built once per shape and device: every step uses them
        self.depth, self.size, self.group, self.bits, self.grouping = depth, k, g, bits, grouping
        self.name = f"rvq-d{depth}"

    def describe(self) -> str:
        return f"RVQ depth {self.depth}, {self.size} codewords of {self.group} channels ({self.grouping})"

    def shared_tensors(self) -> list[torch.Tensor]:
        """The codebooks and the index tables derived from them (held: every step uses them)."""
        return [self.books, *self._memo.values()]

    def calibrated(self) -> list[torch.Tensor]:
        return [self.books]  # the index tables follow from them (built at first use)

    def books_f32(self, device) -> torch.Tensor:
        """A float32 copy for one call's arithmetic: made each time (16k values a layer, microseconds)
        rather than held beside the float16 codebooks, which would add half again to their bytes."""
        return self.books.to(device, torch.float32)

    def books_on(self, device) -> torch.Tensor:
        """The float16 codebooks held on `device` (the same tensor where they already are; a GPU kernel
        reads them there every step, so a copy is kept, and counted, rather than sent each step)."""
        key = ("books", torch.device(device))
        if key not in self._memo:
            self._memo[key] = self.books.to(device)
        return self._memo[key]

    def order(self, head_dim: int, device=None) -> torch.Tensor:
        key = ("order", head_dim, device)
        if key not in self._memo:
            self._memo[key] = channel_order(head_dim, self.group, self.grouping).to(device)
        return self._memo[key]

    def _offsets(self, n: int, groups: bool, device) -> torch.Tensor:
        """(n * depth,) offset of each code position: its level's rows, and with `groups` its group's table."""
        key = ("offsets", n, groups, device)
        if key not in self._memo:
            per_level = torch.arange(self.depth, device=device) * self.size
            if groups:
                per_group = torch.arange(n, device=device)[:, None] * (self.depth * self.size)
                self._memo[key] = (per_group + per_level).reshape(-1)
            else:
                self._memo[key] = per_level.repeat(n)
        return self._memo[key]

    # --- codec ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, block: int) -> Packed:
        if not torch.isfinite(x).all():
            raise KvshrinkError("cannot quantize NaN or infinite key/value states")
        b, h, t, d = x.shape
        x = x.float()
        scale = _half_up(x.pow(2).mean(-1, keepdim=True).sqrt())
        if not torch.isfinite(scale).all():
            raise KvshrinkError("key/value states exceed the float16 range of the RVQ scales")
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        y = grouped(x / safe, self.order(d, x.device), self.group)  # (B, H, T, n, G)
        n = y.shape[-2]
        codes, _ = residual_codes(y.reshape(-1, self.group), self.books_f32(x.device))
        codes = codes.to(torch.uint8).view(b, h, t // block, block, n * self.depth)  # [group][level]
        packed = pack(codes, self.bits) if self.bits < 8 else codes
        return Packed({"codes": packed, "scale": scale.view(b, h, t // block, block, 1)}, block, d,
                      {"last": n * self.depth})

    def codes(self, packed: Packed, groups: bool = False, batch_heads: bool = False) -> torch.Tensor:
        """(B, H, tokens, groups * depth) codes as int64 indices into the flattened codebooks
        (depth * size rows); with `groups`, into a (groups, depth, size) table; with `batch_heads`,
        into one such table per (sequence, head). One pass: uint8 + int64 offsets."""
        c = packed.tensors["codes"]
        c = unpack(c, self.bits, packed.meta["last"]) if self.bits < 8 else c
        c = c.reshape(*c.shape[:2], -1, c.shape[-1])
        n = c.shape[-1] // self.depth
        off = self._offsets(n, groups, c.device)
        if batch_heads:
            b, h = c.shape[:2]
            off = off + (torch.arange(b * h, device=c.device) * (n * self.depth * self.size)).view(b, h, 1, 1)
        return c + off

    def decode(self, packed: Packed, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        d = packed.head_dim
        idx = self.codes(packed)  # (B, H, T, n * L)
        b, h, t, _ = idx.shape
        flat = self.books_f32(idx.device).reshape(-1, self.group)
        y = F.embedding_bag(idx.view(-1, self.depth), flat, mode="sum")  # one bag per (token, group)
        # straight into the caller's slice: no full-size temporary
        x = torch.empty(b, h, t, d, dtype=dtype, device=idx.device) if out is None else out
        x[..., self.order(d, idx.device)] = y.view(b, h, t, d).to(dtype)
        return x.mul_(packed.tensors["scale"].reshape(b, h, t, 1).to(dtype))

    # --- attention from the codes ----------------------------------------------------------
    def query_table(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, H, M, D) -> (B, H, M, groups * depth, size): every query row's dot product with every
        codeword of each group's levels, (group, level) in the codes' order."""
        b, h, m, d = q.shape
        books = self.books_f32(q.device).reshape(-1, self.group)  # (L * K, G)
        qg = grouped(q.float(), self.order(d, q.device), self.group).reshape(-1, self.group)
        # one (B*H*M*n, G) x (G, L*K) product (an einsum here took a slow batched path: 0.17 ms per layer)
        return (qg @ books.T).view(b, h, m, -1, self.size)

    def key_scores(self, q: torch.Tensor, packed: Packed) -> torch.Tensor:
        """q (B, H, M, D) query rows of each KV head -> (B, H, M, T) q . k for the coded keys."""
        b, h, m, d = q.shape
        n = d // self.group
        table = self.query_table(q).reshape(b, h, m, n * self.depth * self.size)
        idx = self.codes(packed, groups=True)  # (B, H, T, n * L) into the table
        t = idx.shape[2]
        scale = packed.tensors["scale"].reshape(b, h, 1, t).float()
        out = q.new_empty(b, h, m, t, dtype=torch.float32)
        step = max(1, _GATHER // max(1, m * idx.shape[-1]))
        for t0 in range(0, t, step):
            part = idx[:, :, t0:t0 + step].reshape(b, h, 1, -1).expand(b, h, m, -1)
            got = table.gather(3, part).view(b, h, m, -1, idx.shape[-1])
            torch.sum(got, -1, out=out[..., t0:t0 + step])
        return out.mul_(scale)

    def value_sums(self, p: torch.Tensor, packed: Packed) -> torch.Tensor:
        """p (B, H, M, T) attention weights -> (B, H, M, D) the weighted sum of the coded values."""
        b, h, m, t = p.shape
        d = packed.head_dim
        n = d // self.group
        books = self.books_f32(p.device)
        idx = self.codes(packed, groups=True, batch_heads=True)  # (B, H, T, n * L) into one table
        per_group = self.depth * self.size
        w = (p.float() * packed.tensors["scale"].reshape(b, h, 1, t).float()).transpose(2, 3)  # (B, H, T, M)
        src = w[:, :, :, None, :].expand(b, h, t, idx.shape[-1], m).reshape(-1, m)
        weights = torch.zeros(b * h * n * per_group, m, device=p.device)
        weights.index_add_(0, idx.reshape(-1), src)  # each codeword's total weight
        y = torch.einsum("bhnlkm,lkc->bhmnc", weights.view(b, h, n, self.depth, self.size, m), books)
        out = torch.empty(b, h, m, d, device=p.device)
        out[..., self.order(d, p.device)] = y.reshape(b, h, m, d)
        return out
