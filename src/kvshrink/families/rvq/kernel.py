"""Decode attention that reads RVQ codes in place (codecs/rvq.py), compiled with numba.

A key is s_t * (the sum over levels of its codewords, group by group), so
q . k_t = s_t * sum over (group, level) of T[group, level, code], where
T = q_g . codeword is computed once per step for every codeword (a small table,
`RVQ.query_table`). Per tile of a head's tokens the kernel unpacks the key codes
and gathers the logits from T; it decodes the tile's values once into a float
buffer (the sum of their levels' codewords: shared by every query row), weights
them by softmax weight x s_t and folds them into an online softmax
(kernels/tiles.py). A worker holds one tile of codes and one of decoded
values, never the history. The dense tokens and the log-sum-exp merge are in
the same call, as for the integer kernel (attention/split.py). The stage (the
tokens of an unfinished block, coded with the same per-token codec) is read in
place as a second segment rather than decoded every step. The value sums are in
the codec's grouped channel order and are put back in head order at the end of
each split.

This replaces PyTorch code-domain attention (`families/rvq/states.py`, still used off
the CPU and for code layouts the flat unpack cannot read) on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from ...codecs.base import Packed
from ...codecs.rvq import RVQ
from ...kernels.backend import TRITON, triton_for
from ...kernels.tiles import (
    FAST,
    accumulate,
    as_u8,
    dense_split,
    merge,
    partial_buffers,
    split_item,
    unpack_codes,
    weights,
    workers,
)

if TRITON:
    from . import gpu


@numba.njit(cache=True, fastmath=FAST)
def _tiles(table, kc, ks, vc, vs, vt, kbits, vbits, books, ncode, vb, lo, hi, cap, m, lsum, acc, scratch):
    """Tiles lo..hi of one (sequence, head)'s coded segment into the running (m, lsum, acc) of every
    query row: kc / vc its codes from the segment's first byte, ks / vs its scales, vt its visibility,
    cap the logits' soft-cap."""
    ksym, vsym, vdec, lg, kk, wt = scratch
    nr, d = acc.shape
    n = ks.shape[0]
    krow = kc.shape[0] // n
    vrow = vc.shape[0] // n
    depth, size, g = books.shape
    for j in range(lo, hi):
        t0 = j * vb
        cnt = min(vb, n - t0)
        unpack_codes(kc[t0 * krow:], cnt * ncode, kbits, ksym)
        unpack_codes(vc[t0 * vrow:], cnt * ncode, vbits, vsym)
        for i in range(cnt):  # values: per group, the sum of its levels' codewords
            row = vsym[i * ncode:(i + 1) * ncode]
            out_i = vdec[i * d:(i + 1) * d]
            for c in range(d):
                out_i[c] = np.float32(0.0)
            for gi in range(d // g):
                dst = out_i[gi * g:(gi + 1) * g]
                for lv in range(depth):
                    word = books[lv, row[gi * depth + lv]]
                    for c in range(g):
                        dst[c] += word[c]
        kst = ks[t0:t0 + cnt]
        vst = vs[t0:t0 + cnt]
        vtt = vt[t0:t0 + cnt]
        for r in range(nr):
            tb = table[r]  # (ncode, size): the row's dot product with every codeword
            lr = lg[r]
            for i in range(cnt):
                row = ksym[i * ncode:(i + 1) * ncode]
                s = np.float32(0.0)
                for jj in range(ncode):
                    s += tb[jj, row[jj]]
                lr[i] = s * kst[i]
            mx, corr, t = weights(lr, vtt, cnt, m[r], kk, cap)
            if mx == -np.inf:
                continue
            m[r] = mx
            lsum[r] = lsum[r] * corr + t
            for i in range(cnt):
                wt[i] = lr[i] * vst[i]
            ar = acc[r]
            for c in range(d):
                ar[c] *= corr
            accumulate(ar, wt, vdec, cnt, d)


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _fused(q, vis, dk, dv, dvis, table, kc, ks, vc, vs, kc2, ks2, vc2, vs2, kbits, vbits, books, vorder, ncode,
           vb, splits, cap, nw, out):
    nb_, nh, nr, d = q.shape
    n = ks.shape[2]
    n2 = ks2.shape[2]
    nvb = (n + vb - 1) // vb
    parts = splits + 2  # body ranges, the second segment (the stage), the dense tokens
    pm, pl, pacc = partial_buffers(nb_, nh, parts, nr, d)
    items = nb_ * nh * parts
    for w in numba.prange(nw):
        for i in range(w, items, nw):  # tiles.split_item's order: the body's ranges first, shared evenly
            b, h, sp = split_item(i, nb_, nh, splits, parts)
            if sp == parts - 1:  # the dense tokens
                dense_split(q[b, h], dk[b, h], dv[b, h], dvis[b], cap, pm[b, h, sp], pl[b, h, sp], pacc[b, h, sp])
                continue
            if sp == splits and n2 == 0:
                continue
            bh = b * nh + h
            scratch = (np.empty(vb * ncode, dtype=np.uint8), np.empty(vb * ncode, dtype=np.uint8),
                       np.empty(vb * d, dtype=np.float32), np.empty((nr, vb), dtype=np.float32),
                       np.empty(vb, dtype=np.int32), np.empty(vb, dtype=np.float32))
            m = np.full(nr, -np.inf, dtype=np.float32)
            lsum = np.zeros(nr, dtype=np.float32)
            acc = pacc[b, h, sp]
            if sp < splits:
                _tiles(table[b, h], kc[bh], ks[b, h], vc[bh], vs[b, h], vis[b, :n], kbits, vbits, books, ncode, vb,
                       sp * nvb // splits, (sp + 1) * nvb // splits, cap, m, lsum, acc, scratch)
            else:
                _tiles(table[b, h], kc2[bh], ks2[b, h], vc2[bh], vs2[b, h], vis[b, n:], kbits, vbits, books, ncode,
                       vb, 0, (n2 + vb - 1) // vb, cap, m, lsum, acc, scratch)
            tmp = np.empty(d, dtype=np.float32)
            for r in range(nr):
                pm[b, h, sp, r] = m[r]
                pl[b, h, sp, r] = lsum[r]
                ar = acc[r]
                for c in range(d):  # grouped channel order -> head order
                    tmp[vorder[c]] = ar[c]
                for c in range(d):
                    ar[c] = tmp[c]
    merge(pm, pl, pacc, out)


def _codes(packed: Packed | None, b: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes (B * H, bytes), scale (B, H, tokens) float32) of a coded segment (empty if None)."""
    if packed is None:
        return np.zeros((b * h, 0), dtype=np.uint8), np.zeros((b, h, 0), dtype=np.float32)
    t = packed.tensors
    return t["codes"].reshape(b * h, -1).numpy(), t["scale"].reshape(b, h, -1).float().numpy()


def supported(key_codec, value_codec, head_dim: int | None = None) -> bool:
    """RVQ keys and values of one group size and depth whose codes fill whole bytes per token (the
    flat unpack of a tile)."""
    def whole(c):
        if not isinstance(c, RVQ):
            return False
        return head_dim is None or (head_dim // c.group) * c.depth * c.bits % 8 == 0

    return (whole(key_codec) and whole(value_codec) and key_codec.group == value_codec.group
            and key_codec.depth == value_codec.depth)


def fused_attend(q, vis, dense_k, dense_v, dense_vis, segments: list, key_codec: RVQ, value_codec: RVQ, tile: int,
                 splits: int = 4, cap: float = 0.0) -> torch.Tensor:
    """As families/quant/kernel.py's fused_attend, for RVQ codes: segments, one or two (keys, values) Packed
    laid end to end (the body, then the stage, both per-token codes read in place), which `vis`
    covers -> (B, H, R, d) float32."""
    b, h, r, d = q.shape
    (k1, v1), (k2, v2) = segments[0], (segments[1] if len(segments) > 1 else (None, None))
    splits = max(1, min(splits, -(-k1.num_tokens // tile)))
    table = key_codec.query_table(q)  # (B, H, R, groups * depth, size)
    kc, ks = _codes(k1, b, h)
    vc, vs = _codes(v1, b, h)
    kc2, ks2 = _codes(k2, b, h)
    vc2, vs2 = _codes(v2, b, h)
    out = np.empty((b, h, r, d), dtype=np.float32)
    _fused(q.contiguous().numpy(), as_u8(vis), dense_k.contiguous().numpy(), dense_v.contiguous().numpy(),
           as_u8(dense_vis), table.contiguous().numpy(), kc, ks, vc, vs, kc2, ks2, vc2, vs2, key_codec.bits,
           value_codec.bits, value_codec.books_f32(q.device).numpy(), value_codec.order(d).numpy(),
           (d // key_codec.group) * key_codec.depth, tile, splits, np.float32(cap), workers(b * h * (splits + 2)), out)
    return torch.from_numpy(out)


@dataclass
class RVQBody:
    """A CodedLayer's RVQ-coded tokens, read in place by the kernel (attention/split.py): `segments`,
    the body and then the stage when there is one, each (keys, values) Packed."""

    segments: list
    key_codec: RVQ
    value_codec: RVQ
    block: int
    name = "rvq"

    @property
    def num_tokens(self) -> int:
        return sum(k.num_tokens for k, _ in self.segments)

    def attend(self, q, vis, dense_k, dense_v, dense_vis, splits, cap=0.0):
        if triton_for(q):
            return gpu.attend(q, vis, dense_k, dense_v, dense_vis, self.segments, self.key_codec, self.value_codec,
                              splits, cap)
        return fused_attend(q, vis, dense_k, dense_v, dense_vis, self.segments, self.key_codec, self.value_codec,
                            self.block, splits, cap)

    def decoded(self):
        keys = [self.key_codec.decode(k) for k, _ in self.segments]
        values = [self.value_codec.decode(v) for _, v in self.segments]
        return torch.cat(keys, 2), torch.cat(values, 2)
