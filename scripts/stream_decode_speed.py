"""What entropy-coded blocks would cost a decode step (docs/budget.md, "Entropy coding of the symbols"): the time to
turn one layer's keys or values at 8,064 tokens (3 heads x 64 channels, blocks of 128) back into uint8 codes,
fixed-width (`tiles.unpack_codes`, what the fused kernel does now) against tuple Huffman streams, one per block
(`huffman.decode_into`, KVComp's decoder), each called per block as a kernel would. Symbols are drawn with the
distributions measured on `auto-6x`'s cache; one thread. Then the study's own variant of the decoder: a 12-bit
window emitting up to 8 symbols a lookup (two triples of 2-bit symbols) where KVComp's emits up to 4 from 10 bits.

    .venv/bin/python scripts/stream_decode_speed.py
"""

import time

import numba
import numpy as np

from kvshrink.codecs import huffman
from kvshrink.kernels.tiles import unpack_codes

BLOCK, D, H, TOKENS = 128, 64, 3, 8064
CASES = {"2-bit min/max keys": (2, [0.043, 0.457, 0.457, 0.043]),
         "3-bit min/max keys": (3, [0.02, 0.065, 0.14, 0.275, 0.275, 0.14, 0.065, 0.02]),
         "2-bit Gaussian values": (2, [0.1635, 0.3365, 0.3365, 0.1635])}


@numba.njit(cache=True)
def fixed_width(packed, blocks, row, n, bits, out):
    for b in range(blocks):
        unpack_codes(packed[b * row:], n, bits, out)


@numba.njit(cache=True)
def streams(stream, starts, n, lut_sym, lut_len, lut_n, max_len, out):
    for b in range(starts.shape[0]):
        huffman.decode_into(stream, starts[b], n, lut_sym, lut_len, lut_n, max_len, 0, out)


@numba.njit(cache=True)
def decode_wide(stream, start, n, lut_sym, lut_len, lut_n, max_len, out):
    """huffman.decode_into for any window and symbols a lookup (out needs lut_sym.shape[1] slots of slack)."""
    mask = np.uint64((1 << max_len) - 1)
    pos, acc, nacc, i = start, np.uint64(0), 0, 0
    while i < n:
        if nacc < max_len:
            acc = (acc << np.uint64(16)) | (np.uint64(stream[pos]) << np.uint64(8)) | np.uint64(stream[pos + 1])
            pos += 2
            nacc += 16
        peek = int((acc >> np.uint64(nacc - max_len)) & mask)
        for j in range(lut_sym.shape[1]):
            out[i + j] = lut_sym[peek, j]
        i += lut_n[peek]
        nacc -= lut_len[peek]


@numba.njit(cache=True)
def wide(stream, starts, n, lut_sym, lut_len, lut_n, max_len, out):
    for b in range(starts.shape[0]):
        decode_wide(stream, starts[b], n, lut_sym, lut_len, lut_n, max_len, out)


def best(fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    rng = np.random.default_rng(0)
    blocks, n = H * TOKENS // BLOCK, BLOCK * D
    out = np.empty(n + huffman.MULTI, np.uint8)
    for name, (w, p) in CASES.items():
        sym = rng.choice(len(p), size=blocks * n, p=p).astype(np.uint8).reshape(blocks, n)
        k = huffman.tuple_size(1 << w)
        tup = huffman.tuples(sym, 1 << w, k)
        table = huffman.Table.from_counts(np.bincount(tup.ravel(), minlength=(1 << w) ** k) + 1, n_symbols=1 << w)
        stream, starts = huffman.encode(tup, np.zeros(blocks, np.int64), table.codes[None], table.lengths[None])
        luts = (table.lut_sym, table.lut_len, table.lut_n, huffman.MAX_LEN)
        huffman.decode_into(stream, starts[5], n, *luts, 0, out)
        assert (out[:n] == sym[5]).all(), "the streams do not decode to their symbols"
        packed = np.zeros(blocks * n * w // 8, np.uint8)  # unpacking costs the same whatever the bytes
        tf = best(fixed_width, packed, blocks, n * w // 8, n, w, out)
        th = best(streams, stream, starts, n, *luts, out)
        print(f"{name}: {8 * stream.size / sym.size:.2f} bits a symbol in streams; one layer's side at {TOKENS} "
              f"tokens: fixed width {1e3 * tf:.2f} ms, Huffman {1e3 * th:.2f} ms; 30 layers, keys and values: "
              f"{60e3 * tf:.0f} ms against {60e3 * th:.0f} ms")
        padded = np.concatenate([stream, np.zeros(8, np.uint8)])  # a wider window reads further past the end
        max_len, multi = 12, 8
        luts = (*huffman._lookup(table.codes, table.lengths, max_len, 1 << w, k, multi), max_len)
        one = np.zeros(n + 16, np.uint8)
        decode_wide(padded, starts[7], n, *luts, one)
        assert (one[:n] == sym[7]).all(), "the study's decoder is wrong"
        print(f"  a {max_len}-bit window emitting up to {multi} symbols: "
              f"{1e3 * best(wide, padded, starts, n, *luts, one):.2f} ms")


if __name__ == "__main__":
    main()
