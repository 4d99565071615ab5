"""The per-tile arithmetic shared by the compiled decode kernels (families/quant/kernel.py, kvcomp.py,
rvq.py, lowrank.py, rows.py).

A kernel turns one tile of a head's history into uint8 codes (unpacking or Huffman
decoding), then for each query row: logits from the codes (`channel_logits`),
softmax weights folded into the running max and sum (`weights`), and the weighted
codes added to the accumulator (`accumulate`).

Written for LLVM's vectorizer, which is what makes these fast (measured, one
8k-token layer: 1.3 ms before, 0.36 ms after):
- every inner loop indexes a view from 0 with a `range` variable: an index numba
  cannot prove non-negative gets a wrap-around test per element and stays scalar
  (an offset index made the unpack 30x slower);
- exp is a polynomial written out here: libm's expf is a scalar call, about 4 ns
  per logit, which was a quarter of the kernel;
- values are added four tokens per pass over the accumulator row, so the row is
  loaded and stored a quarter as often.
"""

from __future__ import annotations

import math
import sys

import numba
import numpy as np
import torch

COMPILE_NOTE = "10 to 60 s"  # measured cold on 2 cores: int 55 s, zdc 28 s, rvq 22 s, kvcomp 15 s, eviction 9 s
_ANNOUNCED: set = set()


def announce(kernel: str) -> None:
    """One line on stderr before a kernel's first call in this process: numba compiles it on a
    machine's first use (COMPILE_NOTE), then loads it from its cache."""
    if kernel not in _ANNOUNCED:
        _ANNOUNCED.add(kernel)
        print(f"kvshrink: preparing the compiled {kernel} decode kernel (numba: {COMPILE_NOTE} the first time "
              "on a machine, then loaded from its cache)", file=sys.stderr)


# fast math without "no infinities / no NaNs": the kernels test for -inf (masked tokens, empty
# splits), which fastmath=True would let LLVM fold away
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


def as_u8(mask: torch.Tensor) -> np.ndarray:
    """A bool mask as the uint8 array the kernels take (no copy when contiguous)."""
    return mask.contiguous().view(torch.uint8).numpy()


HALF = 16  # "bits" of a float16 body: its bytes are read as half-precision floats
_TWO_112 = np.float32(2.0 ** 112)


@numba.njit(cache=True, fastmath=FAST)
def half_to_float(src, n, dst):
    """dst[:n] = the n float16 numbers whose little-endian bytes start at src[0] (finite values,
    subnormals included). The half's exponent and mantissa are moved into float32's fields and
    the bias difference (2^112) applied by one multiply: two passes LLVM vectorizes."""
    di = dst.view(np.uint32)
    for i in range(n):
        h = np.uint32(src[2 * i]) | (np.uint32(src[2 * i + 1]) << 8)
        di[i] = ((h & 0x7FFF) << 13) | ((h & 0x8000) << 16)
    for i in range(n):
        dst[i] *= _TWO_112


@numba.njit(cache=True, fastmath=FAST)
def halves(x):
    """float16 bytes (n, 2w) -> float32 (n, w)."""
    n, w = x.shape[0], x.shape[1] // 2
    out = np.empty(n * w, dtype=np.float32)
    half_to_float(x.reshape(-1), n * w, out)
    return out.reshape(n, w)


@numba.njit(cache=True, fastmath=FAST)
def dots(qs, sym, n, bias, out):
    """out[:n] = bias + qs . sym[i * d : (i + 1) * d] for n tokens (sym token-major, codes or floats)."""
    d = qs.shape[0]
    for i in range(n):
        row = sym[i * d:(i + 1) * d]
        s = bias
        for c in range(d):
            s += qs[c] * np.float32(row[c])
        out[i] = s


@numba.njit(cache=True, fastmath=FAST)
def channel_logits(q1, step, mn, sym, n, qs, out):
    """out[:n] = q1 . (mn + step * sym[i]) for n tokens of d codes each (sym token-major), keys
    quantized per channel with one (step, min) row: (q1 * step) . sym + q1 . mn."""
    d = q1.shape[0]
    bias = np.float32(0.0)
    for c in range(d):
        qs[c] = q1[c] * step[c]
        bias += q1[c] * mn[c]
    dots(qs, sym, n, bias, out)


@numba.njit(cache=True, fastmath=FAST, inline="always")
def dots3(qa, qb, qc, row, ta, tb, tc):
    """(ta + qa . row, tb + qb . row, tc + qc . row): one row (codes or floats) read once for three query rows."""
    for c in range(row.shape[0]):
        x = np.float32(row[c])
        ta += qa[c] * x
        tb += qb[c] * x
        tc += qc[c] * x
    return ta, tb, tc


@numba.njit(cache=True, fastmath=FAST)
def channel_logits3(qa, qb, qc, step, mn, sym, n, qs, oa, ob, oc):
    """channel_logits for three query rows at once (qs scratch (3, d)): each token's codes read once for the
    three."""
    d = qa.shape[0]
    ba, bb, bc = np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for c in range(d):
        qs[0, c] = qa[c] * step[c]
        qs[1, c] = qb[c] * step[c]
        qs[2, c] = qc[c] * step[c]
        ba += qa[c] * mn[c]
        bb += qb[c] * mn[c]
        bc += qc[c] * mn[c]
    for i in range(n):
        oa[i], ob[i], oc[i] = dots3(qs[0], qs[1], qs[2], sym[i * d:(i + 1) * d], ba, bb, bc)


@numba.njit(cache=True, fastmath=FAST)
def form_keys(step, mn, sym, n, out):
    """out[:n * d] = mn + step * sym for n tokens of a key group (token-major): a tile of keys turned back
    by their offsets (codecs/spin.py), formed once for all of a head's query rows (turned_logits)."""
    d = step.shape[0]
    for i in range(n):
        for c in range(d):
            out[i * d + c] = mn[c] + step[c] * np.float32(sym[i * d + c])


@numba.njit(cache=True, fastmath=FAST)
def form_axes(step, mn, sym, n, kb, out):
    """out[c * kb + i] = mn[c] + step[c] * sym[c * kb + i] for the first n tokens of each axis of one width
    class of joint-basis keys (codecs/joint.py: a class's codes are axis-major, kb per axis): step, mn the
    class's axes, out a view starting at its first axis. Axis-major, the loop runs over tokens with one
    (min, step) pair, which LLVM vectorizes; token-major classes of a few axes each cost 3x the work."""
    for c in range(step.shape[0]):
        row = out[c * kb:c * kb + n]
        s = sym[c * kb:c * kb + n]
        a, b = mn[c], step[c]
        for i in range(n):
            row[i] = a + b * np.float32(s[i])


@numba.njit(cache=True, fastmath=FAST)
def axis_logits(qt, k, n, kb, out):
    """out[:n] = sum_c qt[c, i] * k[c * kb + i]: the logits of n tokens of a key group formed axis-major
    (form_axes), each offset i with its own query column qt[:, i] (d, group). Four axes per pass over out."""
    d = qt.shape[0]
    for i in range(n):
        out[i] = 0.0
    for c4 in range(d // 4):
        c = 4 * c4
        q0, q1, q2, q3 = qt[c], qt[c + 1], qt[c + 2], qt[c + 3]
        k0, k1, k2, k3 = k[c * kb:], k[(c + 1) * kb:], k[(c + 2) * kb:], k[(c + 3) * kb:]
        for i in range(n):
            out[i] += (q0[i] * k0[i] + q1[i] * k1[i]) + (q2[i] * k2[i] + q3[i] * k3[i])
    for c in range(d // 4 * 4, d):
        qc, kc = qt[c], k[c * kb:]
        for i in range(n):
            out[i] += qc[i] * kc[i]


@numba.njit(cache=True, fastmath=FAST)
def axis_logits3(qa, qb, qc, k, n, kb, oa, ob, oc):
    """axis_logits for three query rows at once (qa, qb, qc their (d, group) tables, oa, ob, oc their logits): each
    key read once for the three, where three calls read the tile's keys three times. Four axes a pass."""
    d = qa.shape[0]
    for i in range(n):
        oa[i] = 0.0
        ob[i] = 0.0
        oc[i] = 0.0
    for c4 in range(d // 4):
        c = 4 * c4
        k0, k1, k2, k3 = k[c * kb:], k[(c + 1) * kb:], k[(c + 2) * kb:], k[(c + 3) * kb:]
        a0, a1, a2, a3 = qa[c], qa[c + 1], qa[c + 2], qa[c + 3]
        b0, b1, b2, b3 = qb[c], qb[c + 1], qb[c + 2], qb[c + 3]
        e0, e1, e2, e3 = qc[c], qc[c + 1], qc[c + 2], qc[c + 3]
        for i in range(n):
            x0, x1, x2, x3 = k0[i], k1[i], k2[i], k3[i]
            oa[i] += (a0[i] * x0 + a1[i] * x1) + (a2[i] * x2 + a3[i] * x3)
            ob[i] += (b0[i] * x0 + b1[i] * x1) + (b2[i] * x2 + b3[i] * x3)
            oc[i] += (e0[i] * x0 + e1[i] * x1) + (e2[i] * x2 + e3[i] * x3)
    for c in range(d // 4 * 4, d):
        kc, a0, b0, e0 = k[c * kb:], qa[c], qb[c], qc[c]
        for i in range(n):
            oa[i] += a0[i] * kc[i]
            ob[i] += b0[i] * kc[i]
            oc[i] += e0[i] * kc[i]


@numba.njit(cache=True, fastmath=FAST)
def turned_logits(qt, k, n, out):
    """out[:n] = qt[i] . k[i] for the first n tokens of a key group formed by form_keys: each offset has its
    own query row qt[i] (group, d), so the keys are dotted as floats (one multiply-add per element and row)."""
    d = qt.shape[1]
    for i in range(n):
        row = k[i * d:(i + 1) * d]
        qi = qt[i]
        s = np.float32(0.0)
        for c in range(d):
            s += qi[c] * row[c]
        out[i] = s


@numba.njit(cache=True, fastmath=FAST)
def turned_logits3(qa, qb, qc, k, n, oa, ob, oc):
    """turned_logits for three query rows at once: each formed key read once for the three."""
    d = qa.shape[1]
    zero = np.float32(0.0)
    for i in range(n):
        oa[i], ob[i], oc[i] = dots3(qa[i], qb[i], qc[i], k[i * d:(i + 1) * d], zero, zero, zero)


@numba.njit(cache=True, fastmath=FAST)
def weights(lr, vt, n, m, kk, cap):
    """Online-softmax step for one query row over one tile: given its logits lr[:n], visibility
    vt[:n], running max m and soft-cap cap (logits become cap * tanh(logit / cap) when cap > 0, as
    Gemma 2 does after scaling; a float32 cap, since a float64 one made a capped kernel 1.5x
    slower), returns (new max, rescale factor for the old sums, sum of the new weights) and leaves
    the weights exp(lr - max) in lr (0 where not visible). new max = -inf means the tile is
    invisible to the row and lr is left as it was. kk: int32 scratch (n,)."""
    if cap > 0:
        for i in range(n):
            lr[i] = cap * np.tanh(lr[i] / cap)
    mx = m
    for i in range(n):
        if vt[i]:
            mx = max(mx, lr[i])
    if mx == -np.inf:
        return mx, np.float32(1.0), np.float32(0.0)
    corr = np.float32(math.exp(m - mx)) if m > -np.inf else np.float32(0.0)
    # exp(x), x <= 0: x = k ln2 + f (Cody-Waite, two-part ln2), e^f by a degree-6 polynomial
    # (relative error < 1e-7), 2^k added to the result's exponent bits in a second pass
    for i in range(n):
        v = max(lr[i] - mx, np.float32(-87.0))
        k = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))
        f = v - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * f + np.float32(1.3981999507e-3)
        p = p * f + np.float32(8.3334519073e-3)
        p = p * f + np.float32(4.1665795894e-2)
        p = p * f + np.float32(1.6666665459e-1)
        p = p * f + np.float32(5.0000001201e-1)
        lr[i] = p * f * f + f + np.float32(1.0)
        kk[i] = np.int32(k) << 23
    li = lr.view(np.int32)
    t = np.float32(0.0)
    for i in range(n):
        li[i] += kk[i]
        if not vt[i]:
            lr[i] = np.float32(0.0)
        t += lr[i]
    return mx, corr, t


@numba.njit(cache=True, fastmath=FAST)
def accumulate(acc, w, sym, n, stride):
    """acc[:w] += sum_i w[i] * sym[i * stride : i * stride + len(acc)] for n tokens: one channel group
    of a tile's value codes, weighted per token."""
    vw = acc.shape[0]
    for i4 in range(n // 4):
        i = 4 * i4
        w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
        r0 = sym[i * stride:i * stride + vw]
        r1 = sym[(i + 1) * stride:(i + 1) * stride + vw]
        r2 = sym[(i + 2) * stride:(i + 2) * stride + vw]
        r3 = sym[(i + 3) * stride:(i + 3) * stride + vw]
        for c in range(vw):
            acc[c] += ((w0 * np.float32(r0[c]) + w1 * np.float32(r1[c]))
                       + (w2 * np.float32(r2[c]) + w3 * np.float32(r3[c])))
    for i in range(n // 4 * 4, n):
        wi = w[i]
        row = sym[i * stride:i * stride + vw]
        for c in range(vw):
            acc[c] += wi * np.float32(row[c])


@numba.njit(cache=True, fastmath=FAST)
def accumulate3(aa, ab, ac, wa, wb, wc, sym, n, stride):
    """accumulate for three query rows at once (accumulators aa, ab, ac, weights wa, wb, wc): each value read once
    for the three."""
    vw = aa.shape[0]
    for i2 in range(n // 2):
        i = 2 * i2
        r0 = sym[i * stride:i * stride + vw]
        r1 = sym[(i + 1) * stride:(i + 1) * stride + vw]
        a0, a1, b0, b1, e0, e1 = wa[i], wa[i + 1], wb[i], wb[i + 1], wc[i], wc[i + 1]
        for c in range(vw):
            x0, x1 = np.float32(r0[c]), np.float32(r1[c])
            aa[c] += a0 * x0 + a1 * x1
            ab[c] += b0 * x0 + b1 * x1
            ac[c] += e0 * x0 + e1 * x1
    for i in range(n // 2 * 2, n):
        row = sym[i * stride:i * stride + vw]
        a0, b0, e0 = wa[i], wb[i], wc[i]
        for c in range(vw):
            x0 = np.float32(row[c])
            aa[c] += a0 * x0
            ab[c] += b0 * x0
            ac[c] += e0 * x0


@numba.njit(cache=True, fastmath=FAST)
def fold_values3(acc, accb, r0, w, lg, sym, step, mn, n, corr):
    """fold_values for query rows r0, r0 + 1, r0 + 2 at once (acc (R, d), accb (R, groups), lg (R, n) their
    weights, corr (R,) their rescale factors; w scratch (3, n))."""
    d = acc.shape[1]
    groups = accb.shape[1]
    vw = d // groups
    for j in range(3):
        r = r0 + j
        cr = corr[r]
        for c in range(d):
            acc[r, c] *= cr
    for g in range(groups):
        for j in range(3):
            r = r0 + j
            lr, wr = lg[r], w[j]
            t = np.float32(0.0)
            for i in range(n):
                wr[i] = lr[i] * step[i, g]
                t += lr[i] * mn[i, g]
            accb[r, g] = accb[r, g] * corr[r] + t
        accumulate3(acc[r0, g * vw:(g + 1) * vw], acc[r0 + 1, g * vw:(g + 1) * vw], acc[r0 + 2, g * vw:(g + 1) * vw],
                    w[0], w[1], w[2], sym[g * vw:], n, d)


@numba.njit(cache=True, fastmath=FAST)
def fold_values(acc, accb, w, lr, sym, step, mn, n, corr):
    """Rescale one query row's sums by corr and add a tile's values: acc (d,), accb (groups,) the
    per-group sum of weight x min; w scratch (n,); lr the weights; sym the tile's value codes
    (token-major, d per token); step, mn (n, groups) per token and channel group."""
    d = acc.shape[0]
    groups = accb.shape[0]
    vw = d // groups
    for c in range(d):
        acc[c] *= corr
    for g in range(groups):
        t = np.float32(0.0)
        for i in range(n):
            w[i] = lr[i] * step[i, g]
            t += lr[i] * mn[i, g]
        accb[g] = accb[g] * corr + t
        accumulate(acc[g * vw:(g + 1) * vw], w, sym[g * vw:], n, d)


@numba.njit(cache=True, fastmath=FAST)
def softmax_fold(lg, vt, n, m, lsum, kk, cap, corr, acc, accb, wt, w3, sym, step, mn):
    """One tile for every query row, after its logits lg[r, :n]: each row's weights folded into its online softmax
    (m, lsum), then the tile's values (sym, step, mn as fold_values takes them) added to acc, accb, three rows at a
    time where they can (fold_values3: each value read once for three), the rest one by one. A row the tile is
    invisible to adds nothing. corr (rows,), wt (n,), w3 (3, n) scratch."""
    nr = lg.shape[0]
    for r in range(nr):
        mx, c, t = weights(lg[r], vt, n, m[r], kk, cap)
        if mx == -np.inf:
            corr[r] = 1.0
            lg[r, :n] = 0.0
            continue
        m[r] = mx
        lsum[r] = lsum[r] * c + t
        corr[r] = c
    whole = nr // 3 * 3
    for r in range(0, whole, 3):
        fold_values3(acc, accb, r, w3, lg, sym, step, mn, n, corr)
    for r in range(whole, nr):
        fold_values(acc[r], accb[r], wt, lg[r], sym, step, mn, n, corr[r])


@numba.njit(cache=True, fastmath=FAST)
def dense_partial(q1, keys, values, vt, lr, kk, acc, cap):
    """One query row over float keys/values (n, d) with visibility vt and soft-cap cap: fills acc (d,) with the
    weighted value sum and returns (max logit, weight sum) as a kernel split does."""
    n = keys.shape[0]
    if n == 0:
        return -np.inf, np.float32(0.0)
    dots(q1, keys.ravel(), n, np.float32(0.0), lr)
    mx, _, t = weights(lr, vt, n, -np.inf, kk, cap)
    if mx == -np.inf:
        return mx, np.float32(0.0)
    accumulate(acc, lr, values.ravel(), n, acc.shape[0])
    return mx, t


@numba.njit(cache=True)
def partial_buffers(nb_, nh, parts, nr, d):
    """(max, sum, weighted value sum) per (sequence, head, part, query row): the kernels' splits
    write here and `merge` reads; a part left unwritten counts as empty (max -inf)."""
    pm = np.full((nb_, nh, parts, nr), -np.inf, dtype=np.float32)
    pl = np.zeros((nb_, nh, parts, nr), dtype=np.float32)
    pacc = np.zeros((nb_, nh, parts, nr, d), dtype=np.float32)
    return pm, pl, pacc


def workers(items: int) -> int:
    """How many workers a kernel's `prange` runs for `items` work items: one per numba thread. numba hands a
    prange's iterations to its threads in equal contiguous runs, so a kernel that looped over (sequence, head, part)
    gave one of 2 threads two heads' body splits and the other one (the dense, stage and window parts are nearly
    free). Each worker instead takes items w, w + workers, ... of `split_item`'s order. Counted here, not in the
    kernel: numba cannot cache a function that asks for its thread count."""
    return max(1, min(numba.get_num_threads(), items))


@numba.njit(cache=True)
def split_item(i, nb_, nh, splits, parts):
    """Work item i of a call over (sequence, head, part), `parts` partials per head of which the first `splits` are
    the body's ranges, as (sequence, head, part): every body range first (they hold the tiles), then the light
    parts (dense tokens, stage, window), so that workers taking every `workers()`-th item share the tiles evenly."""
    heavy = nb_ * nh * splits
    if i < heavy:
        return i // (nh * splits), (i // splits) % nh, i % splits
    i -= heavy
    extra = parts - splits
    return i // (nh * extra), (i // extra) % nh, splits + i % extra


@numba.njit(cache=True, fastmath=FAST)
def dense_split(q, keys, values, vis, cap, pm, pl, pacc):
    """The dense tokens of one (sequence, head) as one more split: q (R, d) its query rows, keys /
    values (n, d), vis (t, n) per query token (row r is token r % t), cap the soft-cap; fills pm, pl (R,), pacc (R, d)."""
    lr = np.empty(keys.shape[0], dtype=np.float32)
    kk = np.empty(keys.shape[0], dtype=np.int32)
    for r in range(q.shape[0]):
        pm[r], pl[r] = dense_partial(q[r], keys, values, vis[r % vis.shape[0]], lr, kk, pacc[r], cap)


@numba.njit(cache=True, fastmath=FAST)
def _row_max(pm, b, h, r):
    """The largest logit of row r over every partial (-inf where the row sees nothing)."""
    mx = -np.inf
    for p in range(pm.shape[2]):
        mx = max(mx, pm[b, h, p, r])
    return mx


@numba.njit(cache=True, fastmath=FAST)
def merge(pm, pl, pacc, out):
    """Log-sum-exp merge of partials (B, H, P, R), (B, H, P, R), (B, H, P, R, d) into out (B, H, R, d);
    a row that sees nothing (left padding) gets zeros."""
    nb_, nh, np_, nr = pm.shape
    d = out.shape[3]
    for b in range(nb_):
        for h in range(nh):
            for r in range(nr):
                mx = _row_max(pm, b, h, r)
                o = out[b, h, r]
                o[:] = 0.0
                if mx == -np.inf:
                    continue
                den = np.float32(0.0)
                for p in range(np_):
                    if pm[b, h, p, r] == -np.inf:
                        continue
                    w = np.float32(math.exp(pm[b, h, p, r] - mx))
                    den += w * pl[b, h, p, r]
                    a = pacc[b, h, p, r]
                    for c in range(d):
                        o[c] += w * a[c]
                inv = np.float32(1.0) / den
                for c in range(d):
                    o[c] *= inv


@numba.njit(cache=True, fastmath=FAST)
def log_sum(pm, pl, lse):
    """Each row's log-sum-exp of logits over every partial (B, H, P, R) -> lse (B, H, R); -inf for a row that sees
    nothing. A caller that scores tokens outside the kernel turns their logits into probabilities with it."""
    nb_, nh, np_, nr = pm.shape
    for b in range(nb_):
        for h in range(nh):
            for r in range(nr):
                mx = _row_max(pm, b, h, r)
                if mx == -np.inf:
                    lse[b, h, r] = -np.inf
                    continue
                den = 0.0
                for p in range(np_):
                    if pm[b, h, p, r] != -np.inf:
                        den += math.exp(pm[b, h, p, r] - mx) * pl[b, h, p, r]
                lse[b, h, r] = mx + math.log(den)


@numba.njit(cache=True, fastmath=FAST)
def rotate_back(a, rot, tmp):
    """a (d,) <- a @ rot.T: a value sum of a Hadamard-rotated codec back in the model's basis
    (sum p (x_r R^T) = (sum p x_r) R^T); tmp: scratch (d,)."""
    d = a.shape[0]
    for i in range(d):
        ri = rot[i]
        s = np.float32(0.0)
        for c in range(d):
            s += a[c] * ri[c]
        tmp[i] = s
    for i in range(d):
        a[i] = tmp[i]


@numba.njit(cache=True, inline="always")
def unpack_codes(codes, nsym, bits, out):
    """nsym codes packed from codes[0] on (little-endian within bytes, as packing.pack writes them)
    into out[:nsym] as uint8: one flat pass over a tile's bytes, the codes' own order. `codes` is a
    view starting at the tile: an offset index would keep the loop from vectorizing."""
    if bits == 8:
        for i in range(nsym):
            out[i] = codes[i]
    elif bits == 4:
        for i in range(nsym // 2):
            x = codes[i]
            out[2 * i] = x & 15
            out[2 * i + 1] = x >> 4
    elif bits == 2:
        for i in range(nsym // 4):
            x = codes[i]
            out[4 * i] = x & 3
            out[4 * i + 1] = (x >> 2) & 3
            out[4 * i + 2] = (x >> 4) & 3
            out[4 * i + 3] = x >> 6
    elif bits == 1:
        for i in range(nsym // 8):
            x = codes[i]
            for k in range(8):
                out[8 * i + k] = (x >> k) & 1
    elif bits == 3:
        for u in range(nsym // 8):
            x = (np.uint32(codes[3 * u]) | (np.uint32(codes[3 * u + 1]) << 8)
                 | (np.uint32(codes[3 * u + 2]) << 16))
            for k in range(8):
                out[8 * u + k] = (x >> (3 * k)) & 7
    elif bits > 4 and nsym % 8 == 0:  # 5 to 7 bits: eight codes from `bits` bytes (3.5x the generic loop)
        wide = np.uint64((1 << bits) - 1)
        for u in range(nsym // 8):
            src = codes[u * bits:(u + 1) * bits]
            x = np.uint64(0)
            for k in range(bits):
                x |= np.uint64(src[k]) << np.uint64(8 * k)
            dst = out[8 * u:8 * u + 8]
            for k in range(8):
                dst[k] = np.uint8((x >> np.uint64(bits * k)) & wide)
    else:
        mask = (1 << bits) - 1
        for j in range(nsym):
            bit = j * bits
            byte = bit >> 3
            sh = bit & 7
            v = np.int32(codes[byte]) >> sh
            if sh + bits > 8:
                v |= np.int32(codes[byte + 1]) << (8 - sh)
            out[j] = v & mask


@numba.njit(cache=True, fastmath=FAST)
def to_vectors(sym, n, book, out):
    """out[:n * r] = the codewords book[sym[:n]] (book (K, r)) end to end: vector codes to the levels they stand for
    (codecs/vector.py)."""
    r = book.shape[1]
    for i in range(n):
        row = book[sym[i]]
        for k in range(r):
            out[i * r + k] = row[k]


@numba.njit(cache=True, fastmath=FAST)
def to_levels(sym, n, lut, out):
    """out[:n] = lut[sym[:n]]: codes to the float32 levels they stand for. A table of four (2-bit codes)
    is read by selects on the code's two bits, which LLVM vectorizes; a gather of each code does not."""
    if lut.shape[0] == 4:
        l0, l1, l2, l3 = lut[0], lut[1], lut[2], lut[3]
        for i in range(n):
            c = sym[i]
            lo = l1 if c & 1 else l0
            hi = l3 if c & 1 else l2
            out[i] = hi if c & 2 else lo
    else:
        for i in range(n):
            out[i] = lut[sym[i]]
