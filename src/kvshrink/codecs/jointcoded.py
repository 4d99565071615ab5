"""CodedJointKeys: joint-basis keys (codecs/joint.py) whose narrow symbols are entropy-coded, with one static tuple
Huffman code per width (codecs/huffman.py) fitted once at calibration and shared by every layer (`WidthTables`).

The symbols of min/max codes over a block are far from uniform (a 2-bit class puts 83-88% of its symbols on the
two inner levels, 1.5 bits of entropy a symbol on the bundled model), so the same codes, the same decoded keys, take
fewer bytes; the budget spends what that frees on wider codes elsewhere (families/budget/coded.py).

Which widths are coded is the tables' choice (`CODED`: 2 and 3 bits). Every decode step decodes the whole history's
streams again, so a width is coded where its saving pays for its decoding: 2-bit classes save a quarter of their
bits (1.5 bits of entropy a symbol) and 3-bit ones 13%, at 0.7 and 1.1 ns a symbol with a 12-bit lookup emitting up
to 6 symbols (`decode_stream`); wider classes save 3-7% at a symbol a lookup and stay packed at fixed width
(`packing.pack`, read as the fixed-width kernel reads them).

Layout of one encode call (`StreamPacked`):
- `stream`: uint8, one stream per (sequence, head, block, width class), each in whole bytes and decodable alone
  (a coded class's Huffman codes, or a packed class's fixed-width codes), end to end, then TAIL spare bytes the
  decoder may read past the last one;
- `starts`: int32 (B, H, blocks, classes), the byte offset of each stream (4 bytes a stream, counted);
- `min`, `scale`: float16 per block, per axis and per coded axis, as JointKeys.
A class's symbols are axis-major as in JointKeys (each axis's `group` codes end to end), so the kernel forms a
block's keys from a decoded class as it does from an unpacked one. Tables are counted by every cache that uses
them (`shared_tensors`), once however many layers share them.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..errors import KvshrinkError
from . import huffman
from .base import tensor_nbytes
from .joint import JointKeys
from .packing import pack, packed_length, unpack

SLOTS = 9  # widths 0..8: a width's table slot, -1 where it has none
ALPHABET = 256  # tuple codes per table at most (huffman.TUPLES)
CODED = (2, 3)  # widths a calibration fits tables for (module docstring)
WINDOW, EMIT = 12, 6  # the decoding lookup: bits it reads, symbols it may emit (two triples or pairs; decode_stream)
TAIL = 4  # spare bytes after a body's last stream (decode_stream refills 32 bits at a time)


def tuple_size(width: int) -> int:
    """Symbols per code at this width: KVComp's rule (triples of 2-bit symbols, pairs of 3- and 4-bit ones)."""
    return huffman.tuple_size(1 << width)


class WidthTables:
    """One tuple Huffman code per coded symbol width, stacked as the coder and the kernel read them: lengths (T, 256)
    and codes (T, 256) for the encoder, the 12-bit decoding lookup (T, 4096, EMIT) with its lengths and counts
    (32 KB a table); slot (9 ints) the table of each width, -1 where none (those widths are packed at fixed width),
    k each table's symbols a code."""

    def __init__(self, lengths: dict):
        self.widths = sorted(int(w) for w in lengths)
        if any(not 1 <= w <= 8 for w in self.widths):
            raise KvshrinkError(f"code tables are for widths 1..8, got {self.widths}")
        slot = [-1] * SLOTS
        tables = []
        for i, w in enumerate(self.widths):
            slot[w] = i
            tables.append(huffman.Table(np.asarray(lengths[w], dtype=np.uint8)[:(1 << w) ** tuple_size(w)],
                                        n_symbols=1 << w))
        # tuples, not arrays: what the cache counts are its tensors (these few numbers describe them)
        self.slot, self.k = tuple(slot), tuple(t.k for t in tables)
        size = 1 << WINDOW
        pad = [np.pad(t.lengths, (0, ALPHABET - t.lengths.size)) for t in tables]
        self.lengths = _stack(pad, (ALPHABET,), np.uint8)
        self.codes = _stack([np.pad(t.codes, (0, ALPHABET - t.codes.size)) for t in tables], (ALPHABET,), np.uint32)
        luts = [huffman._lookup(t.codes, t.lengths, WINDOW, t.n_symbols, t.k, multi=EMIT) for t in tables]
        self.lut_sym = _stack([x[0] for x in luts], (size, EMIT), np.uint8)
        self.lut_len = _stack([x[1] for x in luts], (size,), np.uint8)
        self.lut_n = _stack([x[2] for x in luts], (size,), np.uint8)

    @classmethod
    def fit(cls, counts: dict) -> WidthTables:
        """From tuple counts per width ({width: (2**width) ** tuple_size(width) counts}), every tuple given a code
        (counts + 1), so that a cache's symbols never meet a tuple without one."""
        return cls({w: huffman.code_lengths(np.asarray(c, dtype=np.int64) + 1) for w, c in counts.items()})

    def lengths_of(self, width: int) -> np.ndarray:
        if self.table(width) < 0:
            raise KvshrinkError(f"no code table for {width}-bit symbols (tables for {self.widths})")
        return self.lengths[self.table(width)].numpy()[:(1 << width) ** tuple_size(width)]

    def table(self, width: int) -> int:
        """The table of a width, -1 where it has none (packed at fixed width)."""
        return int(self.slot[width]) if 0 <= width < SLOTS else -1

    def tensors(self) -> list[torch.Tensor]:
        return [self.lengths, self.codes, self.lut_sym, self.lut_len, self.lut_n]

    def nbytes(self) -> int:
        return tensor_nbytes(self.tensors())

    @staticmethod
    def count(width: int, symbols: np.ndarray) -> np.ndarray:
        """Tuple counts of symbols (streams, n) at this width: what `fit` takes."""
        k, n = tuple_size(width), 1 << width
        return np.bincount(huffman.tuples(symbols, n, k).reshape(-1).astype(np.int64), minlength=n ** k)


def _stack(arrays: list, shape: tuple, dtype) -> torch.Tensor:
    """(tables, *shape) tensor of per-table arrays (none: empty)."""
    return torch.from_numpy(np.stack(arrays).astype(dtype) if arrays else np.zeros((0, *shape), dtype=dtype))


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@numba.njit(cache=True, inline="always")
def decode_stream(stream, start, n, lut_sym, lut_len, lut_n, out):
    """n symbols of the stream at byte `start` into out[:n] (out[n:n + EMIT] may be overwritten): huffman.decode_into
    with a WINDOW-bit lookup emitting up to EMIT symbols, its stores unrolled, refilled 32 bits at a time (a body's
    streams need TAIL spare bytes after the last). On 2-bit triples this decodes twice as fast as KVComp's 10-bit
    lookup emitting 4, on 3-bit pairs a third faster: each lookup waits on the last one's length, so fewer lookups is
    what pays."""
    mask = np.uint64((1 << WINDOW) - 1)
    flat = lut_sym.reshape(-1)
    pos, acc, nacc, i = start, np.uint64(0), 0, 0
    while i < n:
        if nacc < WINDOW:
            acc = ((acc << np.uint64(32)) | (np.uint64(stream[pos]) << np.uint64(24))
                   | (np.uint64(stream[pos + 1]) << np.uint64(16)) | (np.uint64(stream[pos + 2]) << np.uint64(8))
                   | np.uint64(stream[pos + 3]))
            pos += 4
            nacc += 32
        peek = int((acc >> np.uint64(nacc - WINDOW)) & mask)
        e = peek * EMIT
        out[i], out[i + 1], out[i + 2] = flat[e], flat[e + 1], flat[e + 2]
        out[i + 3], out[i + 4], out[i + 5] = flat[e + 3], flat[e + 4], flat[e + 5]
        i += lut_n[peek]
        nacc -= lut_len[peek]


@numba.njit(cache=True, parallel=True)
def _decode_all(stream, starts, lut_sym, lut_len, lut_n, n, out):
    for b in numba.prange(starts.shape[0]):
        decode_stream(stream, starts[b], n, lut_sym, lut_len, lut_n, out[b])


def _decode_streams(stream, starts, lut_sym, lut_len, lut_n, n: int) -> np.ndarray:
    """(streams, n) symbols of the streams at `starts`, decoded in parallel (numba)."""
    out = np.empty((starts.shape[0], n + EMIT), dtype=np.uint8)
    _decode_all(stream, starts, lut_sym, lut_len, lut_n, n, out)
    return out[:, :n]


def _gather(stream: torch.Tensor, starts: torch.Tensor, pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, starts) holding only the streams whose starts are `pick` (entries of `starts`, any shape, in any
    order, repeats allowed), end to end in pick's order. A stream runs to the next start in the stream (they are laid
    end to end without gaps), so nothing is decoded."""
    s, every, p = _host(stream), _host(starts).astype(np.int64).ravel(), _host(pick).astype(np.int64).ravel()
    edges = np.unique(every)
    ends = np.append(edges[1:], s.size - TAIL)
    length = ends[np.searchsorted(edges, p)] - p
    at = np.zeros_like(p)
    if p.size > 1:
        np.cumsum(length[:-1], out=at[1:])
    idx = np.repeat(p - at, length) + np.arange(int(length.sum()), dtype=np.int64)
    out = np.concatenate([s[idx], np.zeros(TAIL, dtype=np.uint8)])
    return (torch.from_numpy(out).to(stream.device),
            torch.from_numpy(at.astype(np.int32)).reshape(pick.shape).to(starts.device))


class StreamPacked:
    """Entropy-coded blocks as the token store holds them (the `Packed` interface: tensors indexed by block where
    they can be, num_tokens, cat, first_blocks, drop_first, blocks, select_batch, repeat_batch, nbytes). Cuts and
    batch changes move whole streams (`_gather`): nothing is decoded or coded again."""

    def __init__(self, stream, starts, mn, step, block: int, head_dim: int):
        self.tensors = {"stream": stream, "starts": starts, "min": mn, "scale": step}
        self.block, self.head_dim = block, head_dim

    @property
    def num_blocks(self) -> int:
        return self.tensors["starts"].shape[2]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block

    def nbytes(self) -> int:
        return tensor_nbytes(self.tensors.values())

    def cat(self, other: StreamPacked) -> StreamPacked:
        a, b = self.tensors, other.tensors
        base = a["stream"].numel() - TAIL
        if base + b["stream"].numel() >= 2 ** 31:
            raise KvshrinkError("an entropy-coded body past 2 GB of streams does not fit its int32 offsets")
        return StreamPacked(torch.cat([a["stream"][:base], b["stream"]]),
                            torch.cat([a["starts"], b["starts"] + base], 2), torch.cat([a["min"], b["min"]], 2),
                            torch.cat([a["scale"], b["scale"]], 2), self.block, self.head_dim)

    def _pick(self, starts: torch.Tensor, mn: torch.Tensor, step: torch.Tensor) -> StreamPacked:
        stream, st = _gather(self.tensors["stream"], self.tensors["starts"], starts)
        own = torch.contiguous_format  # a slice would keep the old parameters' whole storage alive
        return StreamPacked(stream, st, mn.clone(memory_format=own), step.clone(memory_format=own), self.block,
                            self.head_dim)

    def blocks(self, start: int, stop: int) -> StreamPacked:
        t = self.tensors
        return self._pick(t["starts"][:, :, start:stop], t["min"][:, :, start:stop], t["scale"][:, :, start:stop])

    def first_blocks(self, n: int) -> StreamPacked:
        return self.blocks(0, n)

    def drop_first(self, tokens: int) -> StreamPacked:
        return self.blocks(tokens // self.block, self.num_blocks)

    def select_batch(self, index: torch.Tensor) -> StreamPacked:
        t = self.tensors
        return self._pick(*(t[k].index_select(0, index.to(t[k].device)) for k in ("starts", "min", "scale")))

    def repeat_batch(self, repeats: int) -> StreamPacked:
        t = self.tensors
        return self._pick(*(t[k].repeat_interleave(repeats, dim=0) for k in ("starts", "min", "scale")))


class CodedJointKeys(JointKeys):
    """JointKeys whose width classes with a table are coded with `tables`, the others packed (module docstring): the
    same symbols, the same keys decoded, fewer bytes. The coder and the reference decoder run on the host (numba);
    the int kernel decodes a tile's streams where it reads them (families/quant/kernel.py)."""

    def __init__(self, inverse: torch.Tensor, widths, group: int, derope: tuple, rate: float, tables: WidthTables):
        super().__init__(inverse, widths, group, derope, rate)
        self.tables = tables
        self.name = f"joint{rate:g}h"
        # the table of each class, -1 where packed
        self.slots = tuple(tables.table(w) for _, _, w in self.classes)

    @property
    def slot_table(self) -> np.ndarray:
        """The table of each class as the int kernel reads it (made per call, as JointKeys.class_table)."""
        return np.array(self.slots, dtype=np.int64)

    def describe(self) -> str:
        return super().describe() + ", Huffman-coded"

    def shared_tensors(self) -> list[torch.Tensor]:
        return super().shared_tensors() + self.tables.tensors()

    def encode(self, x: torch.Tensor, block: int) -> StreamPacked:
        axes, mn, step = self.quantize(x, block)
        b, h, nb = mn.shape[:3]
        g, rows = self.group, b * h * nb
        parts, starts, base = [], np.zeros((len(self.classes), rows), dtype=np.int64), 0
        codes, lengths = self.tables.codes.numpy(), self.tables.lengths.numpy()
        one = np.zeros(rows, dtype=np.int64)
        for c, (a, n, w) in enumerate(self.classes):
            t = self.slots[c]
            sym = axes[..., a:a + n, :].reshape(rows, n * g)
            if t < 0:  # packed at fixed width, n * g * w / 8 bytes a stream
                packed = _host(pack(sym, w))
                parts.append(packed.reshape(-1))
                starts[c] = base + packed.shape[1] * np.arange(rows)
                base += packed.size
                continue
            stream, at = huffman.encode(huffman.tuples(_host(sym), 1 << w, self.tables.k[t]), one, codes[t:t + 1],
                                        lengths[t:t + 1])
            parts.append(stream[:stream.size - huffman.PAD])
            starts[c] = at + base
            base += stream.size - huffman.PAD
        if base >= 2 ** 31:
            raise KvshrinkError("an entropy-coded body past 2 GB of streams does not fit its int32 offsets")
        stream = np.concatenate([*parts, np.zeros(TAIL, dtype=np.uint8)])
        st = torch.from_numpy(starts.T.astype(np.int32).copy()).reshape(b, h, nb, len(self.classes))
        return StreamPacked(torch.from_numpy(stream).to(x.device), st.to(x.device), mn, step, block, len(self.widths))

    def symbols(self, packed: StreamPacked) -> list[torch.Tensor]:
        """Each width class's codes (B, H, blocks, axes, group) uint8, decoded on the host (numba, streams in
        parallel): the reference path, prefills and crops; decode steps read the streams in the kernel."""
        t = self.tables
        stream, starts = _host(packed.tensors["stream"]), _host(packed.tensors["starts"]).astype(np.int64)
        b, h, nb = starts.shape[:3]
        out = []
        for c, (_, n, w) in enumerate(self.classes):
            s, first = self.slots[c], starts[..., c].reshape(-1)
            if s < 0:
                size = packed_length(n * self.group, w)
                rows = torch.from_numpy(stream[first[:, None] + np.arange(size)])
                sym = unpack(rows, w, n * self.group).numpy()
            else:
                sym = _decode_streams(stream, first, t.lut_sym[s].numpy(), t.lut_len[s].numpy(), t.lut_n[s].numpy(),
                                      n * self.group)
            out.append(torch.from_numpy(np.ascontiguousarray(sym)).reshape(b, h, nb, n, self.group))
        return out

    def coded_counts(self, packed: StreamPacked) -> dict:
        """{width: (symbol counts, payload bits)} of the Huffman-coded classes of a body: the bits their codes take
        (before each stream's last byte is filled), and the symbols' histogram, whose entropy bounds any order-0
        coder of them."""
        out = {}
        for (_, n, w), sym, slot in zip(self.classes, self.symbols(packed), self.slots):
            if slot < 0:
                continue
            flat = sym.reshape(-1, n * self.group).numpy()
            tup = huffman.tuples(flat, 1 << w, self.tables.k[slot]).astype(np.int64)
            counts, bits = out.get(w, (0, 0))
            out[w] = (counts + np.bincount(flat.ravel(), minlength=1 << w),
                      bits + int(self.tables.lengths_of(w).astype(np.int64)[tup].sum()))
        return out

    def decode(self, packed: StreamPacked, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
        return self.dequantize(self.symbols(packed), packed.tensors, dtype, out)
