"""Decode attention that reads RVQ codes in place (codecs/rvq.py), compiled with numba.

A key is s_t * (the sum over levels of its codewords, group by group), so
q . k_t = s_t * sum over (group, level) of T[group, level, code], where
T = q_g . codeword is computed once per step for every codeword (a small table,
`RVQ.query_table`). Per tile of a head's tokens the kernel unpacks the key codes
and gathers the logits from T; it decodes the tile's values once into a float
buffer (the sum of their levels' codewords: shared by every query row), weights
them by softmax weight x s_t and folds them into an online softmax
(attention/tiles.py). A worker holds one tile of codes and one of decoded
values, never the history. The dense tokens and the log-sum-exp merge are in
the same call, as for the integer kernel (attention/split.py). The value sums
are in the codec's grouped channel order and are put back in head order at the
end of each split.

This replaces PyTorch code-domain attention (`attention/coded.py`, still used off
the CPU and for code layouts the flat unpack cannot read) on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from ..codecs.base import Packed
from ..codecs.rvq import RVQ
from .packed import _unpack
from .tiles import FAST, accumulate, as_u8, dense_partial, merge, weights


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _fused(q, vis, dk, dv, dvis, table, kc, kscale, kbits, books, vorder, vc, vscale, vbits, ncode, vb, splits,
           out):
    nb_, nh, nr, d = q.shape
    n = vis.shape[1]
    nt = dvis.shape[1]
    nvb = (n + vb - 1) // vb
    krow = kc.shape[1] // n
    vrow = vc.shape[1] // n
    depth, size, g = books.shape
    ngroups = d // g
    pm = np.empty((nb_, nh, splits + 1, nr), dtype=np.float32)
    pl = np.empty((nb_, nh, splits + 1, nr), dtype=np.float32)
    pacc = np.zeros((nb_, nh, splits + 1, nr, d), dtype=np.float32)
    for u in numba.prange(nb_ * nh * (splits + 1)):
        b = u // (nh * (splits + 1))
        h = (u // (splits + 1)) % nh
        sp = u % (splits + 1)
        if sp == splits:  # the dense tokens: one more split
            lr = np.empty(dk.shape[2], dtype=np.float32)
            kk = np.empty(dk.shape[2], dtype=np.int32)
            for r in range(nr):
                pm[b, h, sp, r], pl[b, h, sp, r] = dense_partial(q[b, h, r], dk[b, h], dv[b, h], dvis[b, r % nt],
                                                                 lr, kk, pacc[b, h, sp, r])
            continue
        bh = b * nh + h
        lo = sp * nvb // splits
        hi = (sp + 1) * nvb // splits
        ksym = np.empty(vb * ncode, dtype=np.uint8)
        vsym = np.empty(vb * ncode, dtype=np.uint8)
        vdec = np.empty(vb * d, dtype=np.float32)  # the tile's values, decoded once for every row
        lg = np.empty((nr, vb), dtype=np.float32)
        kk = np.empty(vb, dtype=np.int32)
        wt = np.empty(vb, dtype=np.float32)
        tmp = np.empty(d, dtype=np.float32)
        m = np.full(nr, -np.inf, dtype=np.float32)
        lsum = np.zeros(nr, dtype=np.float32)
        acc = pacc[b, h, sp]
        for j in range(lo, hi):
            t0 = j * vb
            cnt = min(vb, n - t0)
            _unpack(kc[bh, t0 * krow:], cnt * ncode, kbits, ksym)
            _unpack(vc[bh, t0 * vrow:], cnt * ncode, vbits, vsym)
            ks = kscale[b, h, t0:t0 + cnt]
            for i in range(cnt):  # values: per group, the sum of its levels' codewords
                row = vsym[i * ncode:(i + 1) * ncode]
                out_i = vdec[i * d:(i + 1) * d]
                for c in range(d):
                    out_i[c] = np.float32(0.0)
                for gi in range(ngroups):
                    dst = out_i[gi * g:(gi + 1) * g]
                    for lv in range(depth):
                        word = books[lv, row[gi * depth + lv]]
                        for c in range(g):
                            dst[c] += word[c]
            vt = vis[b, t0:t0 + cnt]
            for r in range(nr):
                tb = table[b, h, r]  # (ncode, size): the row's dot product with every codeword
                lr = lg[r]
                for i in range(cnt):
                    row = ksym[i * ncode:(i + 1) * ncode]
                    s = np.float32(0.0)
                    for jj in range(ncode):
                        s += tb[jj, row[jj]]
                    lr[i] = s * ks[i]
                mx, corr, t = weights(lr, vt, cnt, m[r], kk)
                if mx == -np.inf:
                    continue
                m[r] = mx
                lsum[r] = lsum[r] * corr + t
                vs = vscale[b, h, t0:t0 + cnt]
                for i in range(cnt):
                    wt[i] = lr[i] * vs[i]
                ar = acc[r]
                for c in range(d):
                    ar[c] *= corr
                accumulate(ar, wt, vdec, cnt, d)
        for r in range(nr):
            pm[b, h, sp, r] = m[r]
            pl[b, h, sp, r] = lsum[r]
            ar = acc[r]
            for c in range(d):  # grouped channel order -> head order
                tmp[vorder[c]] = ar[c]
            for c in range(d):
                ar[c] = tmp[c]
    merge(pm, pl, pacc, out)


def _codes(codec: RVQ, packed: Packed) -> tuple[np.ndarray, np.ndarray]:
    """(codes (B * H, bytes), scale (B, H, tokens) float32) of a body."""
    t = packed.tensors
    b, h = t["codes"].shape[:2]
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


def fused_attend(q, vis, dense_k, dense_v, dense_vis, keys: Packed, values: Packed, key_codec: RVQ,
                 value_codec: RVQ, tile: int, splits: int = 4) -> torch.Tensor:
    """As attention/packed.py's fused_attend, for RVQ codes: -> (B, H, R, d) float32."""
    b, h, r, d = q.shape
    n = keys.num_tokens
    splits = max(1, min(splits, -(-n // tile)))
    table = key_codec.query_table(q)  # (B, H, R, groups * depth, size)
    kc, ks = _codes(key_codec, keys)
    vc, vs = _codes(value_codec, values)
    books = value_codec.books_f32(q.device).numpy()
    order = value_codec.order(d).numpy()
    out = np.empty((b, h, r, d), dtype=np.float32)
    _fused(q.contiguous().numpy(), as_u8(vis), dense_k.contiguous().numpy(), dense_v.contiguous().numpy(),
           as_u8(dense_vis), table.contiguous().numpy(), kc, ks, key_codec.bits, books, order, vc, vs,
           value_codec.bits, (d // key_codec.group) * key_codec.depth, tile, splits, out)
    return torch.from_numpy(out)


@dataclass
class RVQBody:
    """A CodedLayer's RVQ-coded body, read in place by the kernel (attention/split.py)."""

    keys: Packed
    values: Packed
    key_codec: RVQ
    value_codec: RVQ
    block: int
    name = "rvq"

    @property
    def num_tokens(self) -> int:
        return self.keys.num_tokens

    def attend(self, q, vis, dense_k, dense_v, dense_vis, splits):
        return fused_attend(q, vis, dense_k, dense_v, dense_vis, self.keys, self.values, self.key_codec,
                            self.value_codec, self.block, splits)

    def decoded(self):
        return self.key_codec.decode(self.keys), self.value_codec.decode(self.values)
