"""EntropyBody: the entropy-coded blocks of one cache layer's keys or values (KVComp).

Blocks of `block` tokens are quantized under an error bound (codecs/errbound.py)
and their symbols coded with a prefix code (codecs/huffman.py) into one byte
stream; each (sequence, head, block) starts at a stored byte offset, so any
block decodes alone. The float16 minimum and step of every group are kept
beside the stream.

Tables, per layer and per keys/values: the first blocks' histogram builds the
first table (as the paper). Each later batch of blocks is coded with the
current table unless that costs more than `drift` (5%) over a table built from
the batch's own histogram; then the new table is added and used from there on.
Every block records its table. `entropy=False` codes the same symbols with one
fixed-width table: packed integers, no entropy coding (the comparison row).

Appending builds new tensors (nothing is changed in place), so a `view()`
taken before an append stays valid: attention reads a consistent snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...codecs import huffman
from ...codecs.base import tensor_nbytes
from ...codecs.errbound import ErrorBound

MAX_TABLES = 255


@dataclass(frozen=True)
class BodyView:
    """What attention needs of a body at one moment (all CPU tensors)."""

    stream: torch.Tensor  # uint8 (bytes + PAD)
    starts: torch.Tensor  # int64 (B, H, blocks) byte offset of each block
    table_of: torch.Tensor  # int64 (blocks,) table of each block column
    lut_sym: torch.Tensor  # uint8 (tables, 2**MAX_LEN, MULTI) symbols of each window
    lut_len: torch.Tensor  # uint8 (tables, 2**MAX_LEN) bits they take
    lut_n: torch.Tensor  # uint8 (tables, 2**MAX_LEN) how many they are
    fixed: torch.Tensor  # uint8 (tables,) bits of a fixed-width table, 0 for a prefix code
    mn: torch.Tensor  # float16 (B, H, blocks, 1, d) per channel or (B, H, blocks, T, 1) per token
    step: torch.Tensor
    block: int
    head_dim: int

    @property
    def num_blocks(self) -> int:
        return self.starts.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block

    def symbols(self) -> torch.Tensor:
        """(B, H, blocks, T, d) uint8: every block decoded (blocks in parallel)."""
        b, h, n = self.starts.shape
        out = huffman.decode(self.stream.numpy(), self.starts.reshape(-1).numpy(),
                             self.table_of.repeat(b * h).numpy(), self.lut_sym.numpy(), self.lut_len.numpy(),
                             self.lut_n.numpy(), self.fixed.numpy(), self.block * self.head_dim)
        return torch.from_numpy(np.ascontiguousarray(out)).view(b, h, n, self.block, self.head_dim)

    def decoded(self, dtype=torch.float32) -> torch.Tensor:
        """(B, H, tokens, d): the whole body dequantized (the decode-then-attend reference)."""
        x = ErrorBound.dequantize(self.symbols(), self.mn, self.step, dtype)
        return x.reshape(*self.starts.shape[:2], -1, self.head_dim)


class EntropyBody:
    def __init__(self, quant: ErrorBound, block: int, entropy: bool = True, drift: float = 0.05):
        self.quant, self.block, self.entropy, self.drift = quant, block, entropy, drift
        self.n_tables = 0
        self.head_dim = None
        self.stream = torch.zeros(huffman.PAD, dtype=torch.uint8)
        self.starts = self.table_of = self.mn = self.step = None
        self.lut_sym = self.lut_len = self.lut_n = self.lengths = self.fixed = self.codes = None
        self.symbols = 0  # symbols coded so far
        self.payload_bits = 0  # bits of the codes themselves, before byte alignment
        self.entropy_total = 0.0  # Shannon bits of each coded batch under its own histogram

    @property
    def num_tokens(self) -> int:
        return 0 if self.starts is None else self.starts.shape[2] * self.block

    # --- tables -------------------------------------------------------------------------
    def _choose_table(self, counts: np.ndarray) -> int:
        if not self.entropy:
            if not self.n_tables:
                self._add(huffman.Table(huffman.fixed_lengths(self.quant.symbols)))
            return 0
        fresh = huffman.code_lengths(counts + 1)  # +1: every symbol keeps a code
        fresh_bits = int(np.dot(counts, fresh.astype(np.int64)))
        if not self.n_tables or (self._bits(-1, counts) > (1 + self.drift) * fresh_bits
                                 and self.n_tables < MAX_TABLES):
            self._add(huffman.Table(fresh))
        return self.n_tables - 1

    def _bits(self, table: int, counts: np.ndarray) -> int:
        """Bits table `table` spends on symbols with histogram `counts`."""
        return int(np.dot(np.asarray(counts, dtype=np.int64), self.lengths[table].numpy().astype(np.int64)))

    def _add(self, table: huffman.Table) -> None:
        """One more table, appended to the stacked arrays the coder and the kernel read: each held once
        (and counted), the Table object itself is not kept."""
        def grow(old, new):
            t = torch.from_numpy(np.ascontiguousarray(new)[None].copy())
            return t if old is None else torch.cat([old, t])

        self.lut_sym, self.lut_len = grow(self.lut_sym, table.lut_sym), grow(self.lut_len, table.lut_len)
        self.lut_n, self.lengths = grow(self.lut_n, table.lut_n), grow(self.lengths, table.lengths)
        self.codes = grow(self.codes, table.codes)  # the encoder's canonical codes
        self.fixed = grow(self.fixed, np.array(table.fixed, dtype=np.uint8))
        self.n_tables += 1

    # --- coding -------------------------------------------------------------------------
    def _encode(self, q: torch.Tensor, table_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, n, T, d) symbols, table_of (n,) -> (stream with PAD, starts (B, H, n))."""
        b, h, n = q.shape[:3]
        stream, starts = huffman.encode(q.reshape(b * h * n, -1).contiguous().numpy(),
                                        table_of.repeat(b * h).numpy(), self.codes.numpy(), self.lengths.numpy())
        return torch.from_numpy(stream), torch.from_numpy(starts).view(b, h, n)

    def append(self, x: torch.Tensor) -> None:
        """Code x (B, H, n * block, d), n >= 1 whole blocks."""
        b, h, t, d = x.shape
        n = t // self.block
        self.head_dim = d
        q, mn, step = self.quant.quantize(x.reshape(b, h, n, self.block, d))
        counts = np.bincount(q.reshape(-1).numpy(), minlength=self.quant.symbols).astype(np.int64)
        table = self._choose_table(counts)
        self.symbols += q.numel()
        self.payload_bits += self._bits(table, counts)
        self.entropy_total += huffman.entropy_bits(counts)
        cols = torch.full((n,), table, dtype=torch.int64)
        stream, starts = self._encode(q, cols)
        base = self.stream.numel() - huffman.PAD
        self.stream = torch.cat([self.stream[:base], stream])
        starts += base
        if self.starts is None:
            self.starts, self.table_of, self.mn, self.step = starts, cols, mn, step
        else:
            self.starts = torch.cat([self.starts, starts], 2)
            self.table_of = torch.cat([self.table_of, cols])
            self.mn, self.step = torch.cat([self.mn, mn], 2), torch.cat([self.step, step], 2)

    def view(self) -> BodyView | None:
        if self.starts is None:
            return None
        return BodyView(self.stream, self.starts, self.table_of, self.lut_sym, self.lut_len, self.lut_n, self.fixed,
                        self.mn, self.step, self.block, self.head_dim)

    def recode(self, symbols: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, table_of: torch.Tensor) -> None:
        """Replace the body by these already-quantized blocks (batch selection, crop, load):
        the symbols are coded again with the tables they had, so nothing changes."""
        self.head_dim = symbols.shape[-1]
        if symbols.shape[2] == 0:
            self.stream = torch.zeros(huffman.PAD, dtype=torch.uint8)
            self.starts = self.table_of = self.mn = self.step = None
            return
        self.stream, self.starts = self._encode(symbols, table_of)
        self.table_of, self.mn, self.step = table_of.clone(), mn.contiguous(), step.contiguous()

    # --- accounting ---------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Everything held: stream, offsets, table ids, minimums, steps, and the tables
        (code lengths and the decoding lookups built from them)."""
        if self.starts is None:
            return []
        return [self.stream, self.starts, self.table_of, self.mn, self.step, self.lut_sym, self.lut_len,
                self.lut_n, self.lengths, self.fixed, self.codes]

    def nbytes(self) -> int:
        return tensor_nbytes(self.tensors())

    def stats(self) -> dict:
        """Symbols coded, bits per symbol of the codes, and the Shannon limit of the same symbols: each
        batch of blocks at the entropy of its own histogram (no symbol-by-symbol coder with tables
        built from histograms does better; the limit for one table per store would be higher)."""
        n = self.symbols
        return {"symbols": n, "tables": self.n_tables,
                "bits_per_symbol": self.payload_bits / n if n else float("nan"),
                "entropy_bits_per_symbol": self.entropy_total / n if n else float("nan")}
