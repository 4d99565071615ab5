"""Canonical, length-limited Huffman codes over small alphabets, with numba kernels.

KVComp (Jiang et al., arXiv 2508.18263) entropy-codes quantized KV symbols with
Huffman codes whose table is built from an observed histogram. Codes here are
canonical (a table is just one code length per symbol) and at most `MAX_LEN`
bits, so decoding is one lookup of the next `MAX_LEN` bits in a
2**MAX_LEN-entry table: no tree walk, no per-bit branch. Each entry holds every
code that fits whole in those bits (up to `MULTI`), so one lookup emits about
three symbols at the ~3 bits per symbol seen here. Bits are written
most significant first; every block starts on a byte and is decodable alone.

Whole-bit codes lose most where one symbol is likely: a symbol of probability p costs at least
one bit where its information is -log2 p (5 symbols with the likeliest above 40% cost 7.5% over
the entropy on the bundled model). Codes over tuples of `k` symbols (`tuple_size`: up to 3 symbols
from an alphabet of at most 6, up to 2 from one of at most 16) spread that loss over k symbols. A tuple's lookup entry
holds its k symbols, so the decoders (here, and the GPU kernel) stay as they are: a window still
emits up to MULTI symbols. An arithmetic or ANS coder would close the gap further, but no library
one decodes inside a numba or Triton kernel, which is where blocks are read.

A fixed-width table (every symbol `bits` long) is the packed-integer form of
the same symbols: both forms share one encoder and one decoder.

The streams end with `PAD` spare bytes so the decoder may look ahead past the
last block; they are counted as held bytes.
"""

from __future__ import annotations

import heapq
import math

import numba
import numpy as np

MAX_LEN = 10
MULTI = 4  # symbols one lookup may emit
TUPLES = 256  # most tuples a code may have (MAX_LEN-bit codes leave room for the unlikely ones)
PAD = 3  # bytes the decoder may read past a block's last bit (two-byte refills of a MAX_LEN look-ahead)


def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code length per symbol (uint8) for `counts` (every symbol gets a code: the caller
    smooths zero counts). Over-long codes are avoided by halving the counts until the tree fits,
    the usual heuristic; it costs a fraction of a percent here."""
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.size
    if n == 1:
        return np.ones(1, dtype=np.uint8)
    if n > 1 << max_len:
        raise ValueError(f"{n} symbols cannot have codes of at most {max_len} bits")
    c = counts.copy()
    while True:
        heap = [(int(w), i, (i,)) for i, w in enumerate(c)]
        heapq.heapify(heap)
        depth = np.zeros(n, dtype=np.int64)
        tie = n
        while len(heap) > 1:
            w1, _, s1 = heapq.heappop(heap)
            w2, _, s2 = heapq.heappop(heap)
            for s in s1 + s2:
                depth[s] += 1
            heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
            tie += 1
        if depth.max() <= max_len:
            return depth.astype(np.uint8)
        c = np.maximum(c >> 1, 1)


def fixed_lengths(n_symbols: int) -> np.ndarray:
    """Every symbol `ceil(log2 n)` bits: plain packed integers."""
    return np.full(n_symbols, max(1, math.ceil(math.log2(n_symbols))), dtype=np.uint8)


def tuple_size(n_symbols: int) -> int:
    """Symbols per code for an alphabet of n: the most (at most 3, so one lookup emits a whole tuple)
    whose tuples number at most TUPLES."""
    k = 1
    while k < 3 and n_symbols ** (k + 1) <= TUPLES:
        k += 1
    return k


def tuples(symbols: np.ndarray, n_symbols: int, k: int) -> np.ndarray:
    """symbols (blocks, n) -> (blocks, ceil(n / k)) tuple indices (the first symbol most significant),
    the last tuple of a block padded with symbol 0 (the decoder emits the padding past the block's n)."""
    if k == 1:
        return symbols
    b, n = symbols.shape
    padded = np.zeros((b, -(-n // k) * k), dtype=np.int64)
    padded[:, :n] = symbols
    padded = padded.reshape(b, -1, k)
    out = np.zeros(padded.shape[:2], dtype=np.int64)
    for j in range(k):
        out = out * n_symbols + padded[:, :, j]
    return out.astype(np.uint16 if n_symbols ** k > 256 else np.uint8)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (uint32) for code lengths: shorter codes first, then by symbol."""
    order = np.lexsort((np.arange(lengths.size), lengths))
    codes = np.zeros(lengths.size, dtype=np.uint32)
    code, prev = 0, int(lengths[order[0]])
    for k, s in enumerate(order):
        ln = int(lengths[s])
        if k:
            code = (code + 1) << (ln - prev)
        codes[s] = code
        prev = ln
    return codes


class Table:
    """One prefix code: lengths (what is stored), codes and the decoding lookup (derived, but held).
    With `n_symbols`, a code per tuple of k symbols where there are n_symbols ** k lengths."""

    def __init__(self, lengths: np.ndarray, max_len: int = MAX_LEN, n_symbols: int | None = None):
        self.lengths = np.asarray(lengths, dtype=np.uint8)
        self.n_symbols = n_symbols or self.lengths.size
        self.k = round(math.log(self.lengths.size) / math.log(self.n_symbols)) if self.n_symbols > 1 else 1
        if self.n_symbols ** self.k != self.lengths.size or self.k > MULTI:
            raise ValueError(f"{self.lengths.size} code lengths are not tuples of {self.n_symbols} symbols")
        if int(self.lengths.max()) > max_len:
            raise ValueError(f"code length {int(self.lengths.max())} exceeds {max_len}")
        kraft = float(np.sum(2.0 ** -self.lengths.astype(np.float64)))
        if kraft > 1 + 1e-12:
            raise ValueError("code lengths violate the Kraft inequality")
        self.codes = canonical_codes(self.lengths)
        # 4- and 8-bit fixed-width codes (canonical codes = the symbols) decode by position;
        # other widths go through the lookup like any prefix code (measured faster than shifting)
        same = (self.lengths == self.lengths[0]).all() and self.k == 1
        self.fixed = int(self.lengths[0]) if same and int(self.lengths[0]) in (4, 8) else 0
        self.lut_sym, self.lut_len, self.lut_n = _lookup(self.codes, self.lengths, max_len, self.n_symbols, self.k)

    @classmethod
    def from_counts(cls, counts: np.ndarray, n_symbols: int | None = None) -> "Table":
        """From a histogram of symbols, or of tuples of n_symbols symbols."""
        return cls(code_lengths(counts), n_symbols=n_symbols)

    def bits(self, counts: np.ndarray) -> int:
        """Bits these codes spend on symbols with histogram `counts`."""
        return int(np.dot(np.asarray(counts, dtype=np.int64), self.lengths.astype(np.int64)))


def _lookup(codes: np.ndarray, lengths: np.ndarray, max_len: int, n_symbols: int | None = None, k: int = 1,
            multi: int = MULTI):
    """Per window of max_len bits: the symbols of the codes that fit whole in it (`multi` at most),
    the bits they take and how many they are (k per code of a tuple)."""
    n_symbols = n_symbols or codes.size
    size = 1 << max_len
    one_sym = np.zeros((size, k), dtype=np.uint8)  # the k symbols of the code starting the window
    one_len = np.zeros(size, dtype=np.int64)
    for s in range(codes.size):
        shift = max_len - int(lengths[s])
        start = int(codes[s]) << shift
        one_sym[start:start + (1 << shift)] = [s // n_symbols ** (k - 1 - j) % n_symbols for j in range(k)]
        one_len[start:start + (1 << shift)] = lengths[s]
    w = np.arange(size, dtype=np.int64)
    sym = np.zeros((size, multi), dtype=np.uint8)
    used = np.zeros(size, dtype=np.int64)
    count = np.zeros(size, dtype=np.int64)
    live = np.ones(size, dtype=bool)
    for _ in range(multi // k):
        nxt = (w << used) & (size - 1)  # the window's bits after the codes taken so far, zero-filled
        ln = one_len[nxt]
        live &= (ln > 0) & (used + ln <= max_len)  # a code that only fits with the zero fill is not whole
        for j in range(k):
            sym[live, count[live] + j] = one_sym[nxt[live], j]
        used = np.where(live, used + ln, used)
        count += live * k
    return sym, used.astype(np.uint8), count.astype(np.uint8)


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy of the histogram times its size: the limit for any symbol-by-symbol coder."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    p = c[c > 0] / total
    return float(-(c[c > 0] * np.log2(p)).sum())


@numba.njit(cache=True)
def _block_bits(symbols, table_of, lengths):
    n = symbols.shape[0]
    out = np.zeros(n, dtype=np.int64)
    for b in range(n):
        t = table_of[b]
        s = 0
        for i in range(symbols.shape[1]):
            s += lengths[t, symbols[b, i]]
        out[b] = s
    return out


@numba.njit(cache=True)
def _write(symbols, table_of, codes, lengths, starts, stream):
    for b in range(symbols.shape[0]):
        t = table_of[b]
        pos = starts[b]
        acc = np.uint64(0)
        nacc = 0
        for i in range(symbols.shape[1]):
            s = symbols[b, i]
            ln = lengths[t, s]
            acc = (acc << np.uint64(ln)) | np.uint64(codes[t, s])
            nacc += ln
            while nacc >= 8:
                nacc -= 8
                stream[pos] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
                pos += 1
        if nacc > 0:
            stream[pos] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))


def encode(symbols: np.ndarray, table_of: np.ndarray, codes: np.ndarray, lengths: np.ndarray):
    """symbols (blocks, n) uint8 (or tuple indices, `tuples`), table_of (blocks,) table per block,
    codes/lengths (tables, alphabet) -> (stream uint8 with PAD spare bytes, starts int64 (blocks,)
    byte offset of each block)."""
    bits = _block_bits(symbols, table_of, lengths)
    nbytes = (bits + 7) // 8
    starts = np.zeros(symbols.shape[0], dtype=np.int64)
    if symbols.shape[0] > 1:
        np.cumsum(nbytes[:-1], out=starts[1:])
    stream = np.zeros(int(nbytes.sum()) + PAD, dtype=np.uint8)
    _write(symbols, table_of, codes, lengths, starts, stream)
    return stream, starts


@numba.njit(cache=True, inline="always")
def decode_into(stream, start, n, lut_sym, lut_len, lut_n, max_len, fixed, out):
    """Decode n symbols of the block at byte `start` into out[:n] (out[n:n + MULTI] may be
    overwritten). `fixed` = 4 or 8: every code is that many bits (packed integers), read by
    position without the serial bit cursor."""
    if fixed == 8:
        for i in range(n):
            out[i] = stream[start + i]
        return
    if fixed == 4:
        for i in range(n // 2):
            byte = stream[start + i]
            out[2 * i] = byte >> 4
            out[2 * i + 1] = byte & 15
        if n % 2:
            out[n - 1] = stream[start + n // 2] >> 4
        return
    mask = (1 << max_len) - 1
    pos = start
    acc = np.uint64(0)
    nacc = 0
    i = 0
    while i < n:  # out has MULTI slots of slack: every lookup writes all MULTI, keeps lut_n
        if nacc < max_len:
            acc = (acc << np.uint64(16)) | (np.uint64(stream[pos]) << np.uint64(8)) | np.uint64(stream[pos + 1])
            pos += 2
            nacc += 16
        peek = int((acc >> np.uint64(nacc - max_len)) & np.uint64(mask))
        for j in range(MULTI):
            out[i + j] = lut_sym[peek, j]
        i += lut_n[peek]
        nacc -= lut_len[peek]


@numba.njit(cache=True, parallel=True)
def _decode_all(stream, starts, table_of, lut_sym, lut_len, lut_n, fixed, max_len, n, out):
    for b in numba.prange(starts.shape[0]):
        t = table_of[b]
        decode_into(stream, starts[b], n, lut_sym[t], lut_len[t], lut_n[t], max_len, fixed[t], out[b])


def decode(stream: np.ndarray, starts: np.ndarray, table_of: np.ndarray, lut_sym: np.ndarray,
           lut_len: np.ndarray, lut_n: np.ndarray, fixed: np.ndarray, n: int, max_len: int = MAX_LEN) -> np.ndarray:
    """(blocks, n) uint8 symbols of every block (blocks decoded in parallel); fixed: bits per
    code of each table, 0 for a prefix code."""
    out = np.empty((starts.shape[0], n + MULTI), dtype=np.uint8)  # MULTI slots of slack per block
    _decode_all(stream, starts, table_of, lut_sym, lut_len, lut_n, fixed, max_len, n, out)
    return out[:, :n]
