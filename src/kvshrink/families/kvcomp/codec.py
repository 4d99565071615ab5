"""EntropyCodec: KVComp's body as a codec on the shared token store (core/store.py).

Blocks of `block_tokens` tokens are quantized under an error bound (codecs/errbound.py) and
their symbols coded with a prefix code (codecs/huffman.py) into one byte stream; each (sequence,
head, block) starts at a stored byte offset, so any block decodes alone. The float16 minimum and
step of every group are kept beside the stream (`EntropyPacked`).

Tables belong to the codec, one codec per layer and per keys/values: the first blocks' histogram
builds the first table (as the paper). Each later batch of blocks is coded with the current table
unless that costs more than `drift` (5%) over a table built from the batch's own histogram; then
the new table is added and used from there on. Every block records its table. Where single-symbol
codes are more than 1.5% over the entropy, codes are over tuples of symbols (codecs/huffman.py's
`tuple_size`; on the bundled model, pairs at the bounds 0.2 and 0.3 and for some layers' values
at 0.1), which brings them within 1% where they were 7.5% over. `entropy=False` codes the same symbols with one fixed-width table: packed
integers (the comparison row).

Encoding builds new tensors (the tables are appended, never changed in place), so a `view()` taken
before the store grows, on this thread or its coder thread, stays a consistent snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...codecs import huffman
from ...codecs.base import Codec
from ...codecs.errbound import ErrorBound

MAX_TABLES = 255
CLOSE = 1.015  # single symbols per code where they come this close to the entropy (else tuples)


@dataclass(frozen=True)
class BodyView:
    """What attention needs of a coded body at one moment (on the body's device)."""

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
        """(B, H, blocks, T, d) uint8: every block decoded (blocks in parallel, by numba on the host: this
        serves prefills, crops and the reference path, not decode steps)."""
        b, h, n = self.starts.shape
        out = huffman.decode(*(_host(t) for t in (self.stream, self.starts.reshape(-1), self.table_of.repeat(b * h),
                                                  self.lut_sym, self.lut_len, self.lut_n, self.fixed)),
                             self.block * self.head_dim)
        return torch.from_numpy(np.ascontiguousarray(out)).view(b, h, n, self.block, self.head_dim).to(
            self.stream.device)

    def decoded(self, dtype=torch.float32) -> torch.Tensor:
        """(B, H, tokens, d): the whole body dequantized (the decode-then-attend reference)."""
        x = ErrorBound.dequantize(self.symbols(), self.mn, self.step, dtype)
        return x.reshape(*self.starts.shape[:2], -1, self.head_dim)


def _host(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


class EntropyPacked:
    """Entropy-coded blocks as the token store holds them (the `Packed` interface: tensors,
    num_tokens, cat, first_blocks, select_batch, repeat_batch). `block` is the store's block, a
    multiple of the codec's own; a cut or a batch reordering recodes the symbols with the tables
    they had, so nothing changes."""

    def __init__(self, codec: "EntropyCodec", stream, starts, table_of, mn, step, block: int, head_dim: int):
        self.codec, self.block, self.head_dim = codec, block, head_dim
        self.tensors = {"stream": stream, "starts": starts, "table_of": table_of, "mn": mn, "step": step}

    @property
    def num_tokens(self) -> int:
        return self.tensors["starts"].shape[2] * self.codec.block_tokens

    def view(self) -> BodyView:
        t, c = self.tensors, self.codec
        return BodyView(t["stream"], t["starts"], t["table_of"], *c.tables_on(t["stream"].device), t["mn"],
                        t["step"], c.block_tokens, self.head_dim)

    def cat(self, other: "EntropyPacked") -> "EntropyPacked":
        a, b = self.tensors, other.tensors
        base = a["stream"].numel() - huffman.PAD
        return EntropyPacked(self.codec, torch.cat([a["stream"][:base], b["stream"]]),
                             torch.cat([a["starts"], b["starts"] + base], 2), torch.cat([a["table_of"], b["table_of"]]),
                             torch.cat([a["mn"], b["mn"]], 2), torch.cat([a["step"], b["step"]], 2), self.block,
                             self.head_dim)

    def _recoded(self, symbols, mn, step, table_of) -> "EntropyPacked":
        stream, starts = self.codec.code(symbols, table_of)
        # copies: a slice of the old minimums and steps would keep their whole storage alive (a crop's or a
        # sliding layer's freed blocks)
        own = torch.contiguous_format
        return EntropyPacked(self.codec, stream, starts, table_of.clone(), mn.clone(memory_format=own),
                             step.clone(memory_format=own), self.block, self.head_dim)

    def first_blocks(self, n: int) -> "EntropyPacked":
        k = n * self.block // self.codec.block_tokens
        t = self.tensors
        return self._recoded(self.view().symbols()[:, :, :k], t["mn"][:, :, :k], t["step"][:, :, :k],
                             t["table_of"][:k])

    def drop_first(self, tokens: int) -> "EntropyPacked":
        """Without its first `tokens` (whole blocks), recoded with the tables they had."""
        k = tokens // self.codec.block_tokens
        t = self.tensors
        return self._recoded(self.view().symbols()[:, :, k:], t["mn"][:, :, k:], t["step"][:, :, k:],
                             t["table_of"][k:])

    def _map_batch(self, fn) -> "EntropyPacked":
        t = self.tensors
        return self._recoded(fn(self.view().symbols()), fn(t["mn"]), fn(t["step"]), t["table_of"])

    def select_batch(self, index: torch.Tensor) -> "EntropyPacked":
        return self._map_batch(lambda v: v.index_select(0, index.to(v.device)))

    def repeat_batch(self, repeats: int) -> "EntropyPacked":
        return self._map_batch(lambda v: v.repeat_interleave(repeats, dim=0))


class EntropyCodec(Codec):
    """Error-bounded quantization + prefix codes whose tables the codec grows ("KVComp", arXiv
    2509.00579): keys per channel in blocks of 64 tokens, values per token in blocks of 128."""

    name = "kvcomp"

    def __init__(self, quant: ErrorBound, block: int, entropy: bool = True, drift: float = 0.05, tuples: bool = True):
        self.quant, self.block_tokens, self.entropy, self.drift = quant, block, entropy, drift
        self.tuples = tuples  # False: one symbol per code (the comparison)
        self.k = 1  # symbols per code: chosen with the first table
        self.n_tables = 0
        self.lut_sym = self.lut_len = self.lut_n = self.lengths = self.fixed = self.codes = None
        self.symbols = 0  # symbols coded so far
        self.payload_bits = 0  # bits of the codes themselves, before byte alignment
        self.entropy_total = 0.0  # Shannon bits of each coded batch under its own histogram
        self._on = {}  # device -> (tables count, the decoding tables there): what a GPU kernel reads

    def describe(self) -> str:
        coder = "Huffman" if self.entropy else "fixed-width"
        return f"eb {self.quant.bound} per {self.quant.axis} in blocks of {self.block_tokens}, {coder}"

    # --- tables -------------------------------------------------------------------------
    def _best_tuple(self, symbols: np.ndarray) -> int:
        """Symbols per code (1 up to huffman.tuple_size) for the first batch: the fewest that come within
        CLOSE of its entropy, else the fewest bits. Tuples spread whole-bit losses, but a lookup then emits
        fewer symbols (decoding is about 15% slower at 8k), and rare tuples take code space (codes are at
        most MAX_LEN bits)."""
        s = self.quant.symbols
        limit = CLOSE * huffman.entropy_bits(np.bincount(symbols.reshape(-1), minlength=s))
        best, best_bits = 1, None
        for k in range(1, huffman.tuple_size(s) + 1):
            c = np.bincount(huffman.tuples(symbols, s, k).reshape(-1), minlength=s ** k).astype(np.int64)
            bits = int(np.dot(c, huffman.code_lengths(c).astype(np.int64)))
            if bits <= limit:
                return k
            if best_bits is None or bits < best_bits:
                best, best_bits = k, bits
        return best

    def _choose_table(self, symbols: np.ndarray) -> tuple[int, np.ndarray]:
        """(table, histogram of the codes it will code) for a batch's symbols (blocks, n)."""
        if not self.entropy:
            if not self.n_tables:
                self.add_table(huffman.Table(huffman.fixed_lengths(self.quant.symbols)))
            return 0, np.bincount(symbols.reshape(-1), minlength=self.quant.symbols).astype(np.int64)
        if not self.n_tables and self.tuples:
            self.k = self._best_tuple(symbols)
        counts = np.bincount(huffman.tuples(symbols, self.quant.symbols, self.k).reshape(-1),
                             minlength=self.quant.symbols ** self.k).astype(np.int64)
        fresh = huffman.code_lengths(counts)
        fresh_bits = int(np.dot(counts, fresh.astype(np.int64)))
        if not self.n_tables or (self._bits(-1, counts) > (1 + self.drift) * fresh_bits
                                 and self.n_tables < MAX_TABLES):
            self.add_table(huffman.Table(fresh, n_symbols=self.quant.symbols))
        return self.n_tables - 1, counts

    def _bits(self, table: int, counts: np.ndarray) -> int:
        """Bits table `table` spends on codes (symbols or tuples) with histogram `counts`."""
        return int(np.dot(np.asarray(counts, dtype=np.int64), self.lengths[table].numpy().astype(np.int64)))

    def add_table(self, table: huffman.Table) -> None:
        """One more table, appended to the stacked arrays the coder and the kernel read: each held once
        (and counted), the Table object itself is not kept."""
        def grow(old, new):
            t = torch.from_numpy(np.ascontiguousarray(new)[None].copy())
            return t if old is None else torch.cat([old, t])

        self.lut_sym, self.lut_len = grow(self.lut_sym, table.lut_sym), grow(self.lut_len, table.lut_len)
        self.lut_n, self.lengths = grow(self.lut_n, table.lut_n), grow(self.lengths, table.lengths)
        self.codes = grow(self.codes, table.codes)  # the encoder's canonical codes
        self.fixed = grow(self.fixed, np.array(table.fixed, dtype=np.uint8))
        self.k = table.k  # the tables fix the tuple length (a loaded cache's too)
        self.n_tables += 1

    def shared_tensors(self) -> list[torch.Tensor]:
        """The tables: code lengths, the encoder's codes and the decoding lookups built from them (and
        their copies on a GPU, where one is held)."""
        t = (self.lut_sym, self.lut_len, self.lut_n, self.lengths, self.fixed, self.codes)
        return [x for x in t if x is not None] + [x for _, held in self._on.values() for x in held]

    def tables_on(self, device) -> tuple:
        """(lut_sym, lut_len, lut_n, fixed) on `device`: the tables themselves on the CPU; elsewhere a copy
        made when the tables change (a table is added), not at every step."""
        device = torch.device(device)
        t = (self.lut_sym, self.lut_len, self.lut_n, self.fixed)
        if device.type == "cpu":
            return t
        n, held = self._on.get(device, (-1, None))
        if n != self.n_tables:
            held = tuple(x.to(device) for x in t)
            self._on[device] = (self.n_tables, held)
        return held

    # --- coding -------------------------------------------------------------------------
    def code(self, q: torch.Tensor, table_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, n, T, d) symbols, table_of (n,) -> (stream with PAD, starts (B, H, n)) on q's device. The
        coder is numba on the host: on a GPU the symbols of each coded batch make one round trip."""
        b, h, n = q.shape[:3]
        coded = huffman.tuples(_host(q.reshape(b * h * n, -1).contiguous()), self.quant.symbols, self.k)
        stream, starts = huffman.encode(coded, _host(table_of.repeat(b * h)), self.codes.numpy(),
                                        self.lengths.numpy())
        return torch.from_numpy(stream).to(q.device), torch.from_numpy(starts).view(b, h, n).to(q.device)

    def encode(self, x: torch.Tensor, block: int) -> EntropyPacked:
        """x (B, H, tokens, d), tokens a multiple of `block` (the store's), coded in blocks of
        `block_tokens`: one table choice for the whole call, as KVComp codes a batch of blocks."""
        b, h, t, d = x.shape
        n = t // self.block_tokens
        q, mn, step = self.quant.quantize(x.reshape(b, h, n, self.block_tokens, d))
        s = self.quant.symbols
        counts = _host(torch.bincount(q.reshape(-1), minlength=s)).astype(np.int64)
        table, code_counts = self._choose_table(_host(q.reshape(b * h * n, -1)))
        self.symbols += q.numel()
        self.payload_bits += self._bits(table, code_counts)
        self.entropy_total += huffman.entropy_bits(counts)
        cols = torch.full((n,), table, dtype=torch.int64, device=x.device)
        stream, starts = self.code(q, cols)
        return EntropyPacked(self, stream, starts, cols, mn, step, block, d)

    def decode(self, packed: EntropyPacked, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
        x = packed.view().decoded(dtype)
        return x if out is None else out.copy_(x)

    def stats(self) -> dict:
        """Symbols coded, bits per symbol of the codes, and the Shannon limit of the same symbols: each
        batch of blocks at the entropy of its own histogram (no symbol-by-symbol coder with tables
        built from histograms does better; the limit for one table per store would be higher)."""
        n = self.symbols
        return {"symbols": n, "tables": self.n_tables,
                "bits_per_symbol": self.payload_bits / n if n else float("nan"),
                "entropy_bits_per_symbol": self.entropy_total / n if n else float("nan")}
