"""Per-token IntQuant codes for a few tokens, compiled: what a decode step codes.

`IntQuant.encode` is about 35 PyTorch ops; for one decode token of a few heads
that is 170-190 us of per-op overhead per call, twice per layer for caches that
code every step (the paged eviction cache writes each token's row at once). This
computes the same codes, float16 minimums (rounded down) and steps (rounded up)
in one compiled call: bit for bit what the PyTorch path gives for the same
(already rotated) float32 input, tested on random, tied and extreme values.

`dequantize_rows` is the way back for a few tokens: what a decode step reads of a block still
filling (its per-token codes), which the PyTorch path decodes in about 15 ops per call.

No fast math here: the step is (max - min) / qmax in float32 and the code
round((x - min) / step), half to even, exactly as PyTorch computes them.
"""

from __future__ import annotations

import numba
import numpy as np

from .scales import DEV_TABLE, E4M3_MAX, LOW, RATIO_TABLE, STEPS


@numba.njit(cache=True)
def _f16(f):
    """float32 -> float16 bits, round to nearest even (finite inputs; beyond the range -> inf)."""
    x = _bits32(f)
    sign = np.uint16((x >> 16) & 0x8000)
    ax = x & np.uint32(0x7FFFFFFF)
    if ax >= np.uint32(0x477FF000):  # >= 65520: rounds to infinity
        return sign | np.uint16(0x7C00)
    if ax < np.uint32(0x33000001):  # <= 2^-25: rounds to zero (2^-25 itself ties to even 0)
        return sign
    e = np.int64(ax >> 23)
    m = np.int64(ax & np.uint32(0x7FFFFF)) | np.int64(0x800000)
    if e < 113:  # a float16 subnormal: units of 2^-24
        shift = 126 - e
    else:
        shift = 13
    q = m >> shift
    rem = m - (q << shift)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (q & 1)):
        q += 1
    if e < 113:
        return sign | np.uint16(q)  # q may reach 0x400: the smallest normal, still right
    return sign | np.uint16(((e - 112) << 10) + (q - 0x400))  # a carry moves into the exponent


@numba.njit(cache=True)
def _bits32(f):
    a = np.empty(1, dtype=np.float32)
    a[0] = f
    return a.view(np.uint32)[0]


@numba.njit(cache=True)
def _float(h):
    """float16 bits -> float32 (exact)."""
    a = np.empty(1, dtype=np.uint32)
    a[0] = ((np.uint32(h) & 0x7FFF) << 13) | ((np.uint32(h) & 0x8000) << 16)
    return a.view(np.float32)[0] * np.float32(2.0 ** 112)


@numba.njit(cache=True)
def _down(h):
    """The next float16 toward -inf (bits)."""
    if (h & 0x7FFF) == 0:
        return np.uint16(0x8001)
    return np.uint16(h - 1) if (h & 0x8000) == 0 else np.uint16(h + 1)


@numba.njit(cache=True)
def _up(h):
    """The next float16 toward +inf (bits)."""
    if (h & 0x7FFF) == 0:
        return np.uint16(0x0001)
    return np.uint16(h + 1) if (h & 0x8000) == 0 else np.uint16(h - 1)


@numba.njit(cache=True)
def _finite(x):
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            if not np.isfinite(x[i, c]):
                return False
    return True


@numba.njit(cache=True)
def _put(row, j, bits, k):
    """Code k at position j of a row's little-endian bit stream (packing.pack's layout; the row starts zeroed)."""
    bit = j * bits
    v = np.uint32(k) << (bit & 7)
    row[bit >> 3] |= np.uint8(v & 0xFF)
    if (bit & 7) + bits > 8:
        row[(bit >> 3) + 1] |= np.uint8(v >> 8)


@numba.njit(cache=True)
def quantize_rows(x, bits, groups, codes, step, mn):
    """x (n, d) float32 -> codes (n, d * bits / 8) uint8 (little-endian bit stream, as packing.pack
    writes it), step / mn (n, groups) float16 bits as uint16. Returns 0, 1 (x not finite) or 2 (a
    step or minimum beyond float16)."""
    n, d = x.shape
    gw = d // groups
    qmax = np.float32((1 << bits) - 1)
    if not _finite(x):
        return 1
    for i in range(n):
        row = codes[i]
        row[:] = 0
        for g in range(groups):
            xs = x[i, g * gw:(g + 1) * gw]
            lo, hi = xs[0], xs[0]
            for c in range(gw):
                lo = min(lo, xs[c])
                hi = max(hi, xs[c])
            m = _f16(lo)
            if _float(m) > lo:
                m = _down(m)
            mf = _float(m)
            s = _f16((hi - mf) / qmax)
            if _float(s) < (hi - mf) / qmax:
                s = _up(s)
            if (m & 0x7C00) == 0x7C00 or (s & 0x7C00) == 0x7C00:
                return 2
            mn[i, g], step[i, g] = m, s
            sf = _float(s)
            safe = sf if sf > 0 else np.float32(1.0)
            for c in range(gw):
                k = np.rint((xs[c] - mf) / safe)
                k = min(max(k, np.float32(0.0)), qmax)
                _put(row, g * gw + c, bits, k)
    return 0


@numba.njit(cache=True)
def dequantize_rows(codes, bits, lut, mn, sc, out):
    """codes (n, d * bits / 8) uint8 (quantize_rows's bit stream), mn / sc (n, groups) float32 -> out (n, d)
    float32: mn + sc * lut[code] per group. What a decode step reads of an unfinished block, which the
    PyTorch path decodes in about 15 ops (0.1-0.4 ms for a block of 3 heads, twice per layer and step)."""
    n, d = out.shape
    groups = mn.shape[1]
    gw = d // groups
    mask = (1 << bits) - 1
    for i in range(n):
        row = codes[i]
        for g in range(groups):
            a, s = mn[i, g], sc[i, g]
            for c in range(g * gw, (g + 1) * gw):
                bit = c * bits
                v = np.uint32(row[bit >> 3]) >> (bit & 7)
                if (bit & 7) + bits > 8:
                    v |= np.uint32(row[(bit >> 3) + 1]) << (8 - (bit & 7))
                out[i, c] = a + s * lut[v & mask]


@numba.njit(cache=True)
def _log_code(x, up):
    """scales.py's log code of a deviation: (log2 x - low) * steps, rounded half to even (or up), as float32."""
    t = (np.float32(np.log2(x)) - np.float32(LOW)) * np.float32(STEPS)
    return np.float32(np.ceil(t)) if up else np.float32(np.rint(t))


@numba.njit(cache=True)
def _e4m3(v):
    """float32 v (|v| <= E4M3_MAX) -> its float8 e4m3 byte, rounded to nearest, ties to even: a search of the 127
    non-negative finite values, by code (ascending, as e4m3's codes are)."""
    table = RATIO_TABLE
    a = np.float64(abs(v))
    lo, hi = 0, 126
    while lo < hi:  # the largest code whose value is <= a
        mid = (lo + hi + 1) >> 1
        if np.float64(table[mid]) <= a:
            lo = mid
        else:
            hi = mid - 1
    if lo < 126:
        below, above = a - np.float64(table[lo]), np.float64(table[lo + 1]) - a
        if above < below or (above == below and (lo & 1)):
            lo += 1
    return np.uint16(lo | (0x80 if np.signbit(v) else 0))


@numba.njit(cache=True)
def gauss_rows(x, mean, dev, bits, thresholds, eight_bit, codes, scale, mn):
    """x (n, d) float32 with each group's mean and deviation (n, groups) float32 -> codes (n, d * bits / 8)
    uint8 (quantize_rows's bit stream), each element's nearest Gaussian level (levels.py: the count of
    thresholds below its z-score under the stored mean and deviation); scale / mn (n, groups) uint16: the
    stored deviation and mean, float16 bits, or with eight_bit scales.py's (e, r) bytes. The same arithmetic
    as IntQuant's PyTorch path, in float32. Returns 0, 1 (x not finite) or 2 (beyond the scales' range)."""
    n, d = x.shape
    groups = mean.shape[1]
    gw = d // groups
    nt = thresholds.shape[0]
    if not _finite(x):
        return 1
    codes[:] = 0
    for i in range(n):
        for g in range(groups):
            mu, sd = mean[i, g], dev[i, g]
            if eight_bit:
                e = max(_log_code(sd, False), _log_code(abs(mu) / np.float32(E4M3_MAX), True))
                if e > 255:
                    return 2
                k = int(min(max(e, np.float32(1.0)), np.float32(255.0))) if (sd > 0 or mu != 0) else 0
                dd = DEV_TABLE[k]
                ratio = mu / dd if dd > 0 else np.float32(0.0)
                r = _e4m3(min(max(ratio, -np.float32(E4M3_MAX)), np.float32(E4M3_MAX)))
                scale[i, g], mn[i, g] = k, r
                mf, sf = RATIO_TABLE[r] * dd, dd
            else:
                s, m = _f16(sd), _f16(mu)
                if (m & 0x7C00) == 0x7C00 or (s & 0x7C00) == 0x7C00:
                    return 2
                scale[i, g], mn[i, g] = s, m
                mf, sf = _float(m), _float(s)
            safe = sf if sf > 0 else np.float32(1.0)
            for c in range(gw):
                z = (x[i, g * gw + c] - mf) / safe
                k = 0
                while k < nt and thresholds[k] < z:
                    k += 1
                _put(codes[i], g * gw + c, bits, k)
    return 0
