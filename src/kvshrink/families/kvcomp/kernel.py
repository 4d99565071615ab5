"""Decode attention that decompresses KVComp blocks where they are consumed.

For each (sequence, KV head) and each value block, the kernel decodes the
block's key symbols into a small buffer, turns them into logits for the query
rows of the head's group (q . (mn + s * sym) = q . mn + (q * s) . sym, so no
float key is formed), decodes the value block and folds it into an online
softmax (running max, sum and weighted sum). The whole decompressed cache never
exists; per call the kernel holds one block of symbols per worker. The value
blocks of a head are split into `splits` ranges processed in parallel (flash-
decoding style); the dense parts (sink, recent tokens, this call's tokens) are
one more split, and the kernel merges them all by log-sum-exp
(kernels/tiles.py has the per-tile arithmetic).

`SplitStates(fused=False)` (attention/split.py) computes the same thing by
decoding everything first and calling softmax attention: the path the fused
kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from ...codecs.huffman import MAX_LEN, MULTI, decode_into
from ...kernels.backend import TRITON, triton_for
from ...kernels.tiles import (
    FAST,
    as_u8,
    channel_logits,
    channel_logits3,
    dense_split,
    merge,
    partial_buffers,
    softmax_fold,
    split_item,
    workers,
)
from .codec import BodyView

if TRITON:
    from . import gpu


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _fused(q, vis, dk, dv, dvis, ks, kst, ktab, kls, kll, kln, kfix, kmn, kstep, kb,
           vs, vst, vtab, vls, vll, vln, vfix, vmn, vstep, vb, splits, cap, nw, out):
    nb_, nh, nr, d = q.shape
    nvb = vst.shape[2]
    per = vb // kb
    pm, pl, pacc = partial_buffers(nb_, nh, splits + 1, nr, d)
    items = nb_ * nh * (splits + 1)
    for w in numba.prange(nw):
        for i in range(w, items, nw):  # tiles.split_item's order: the body's ranges first, shared evenly
            b, h, sp = split_item(i, nb_, nh, splits, splits + 1)
            if sp == splits:  # the dense tokens (sink, recent, this call's): one more split
                dense_split(q[b, h], dk[b, h], dv[b, h], dvis[b], cap, pm[b, h, sp], pl[b, h, sp], pacc[b, h, sp])
                continue
            lo = sp * nvb // splits
            hi = (sp + 1) * nvb // splits
            ksym = np.empty(vb * d + MULTI, dtype=np.uint8)  # decoders write up to MULTI past the end
            vsym = np.empty(vb * d + MULTI, dtype=np.uint8)
            lg = np.empty((nr, vb), dtype=np.float32)
            kk = np.empty(vb, dtype=np.int32)
            wt = np.empty(vb, dtype=np.float32)
            w3 = np.empty((3, vb), dtype=np.float32)
            corr = np.empty(nr, dtype=np.float32)
            qs = np.empty(d, dtype=np.float32)
            qs3 = np.empty((3, d), dtype=np.float32)
            trio = nr // 3 * 3  # rows whose logits are formed three at a time (tiles.channel_logits3)
            m = np.full(nr, -np.inf, dtype=np.float32)
            lsum = np.zeros(nr, dtype=np.float32)
            acc = pacc[b, h, sp]
            accb = np.zeros((nr, 1), dtype=np.float32)
            for j in range(lo, hi):
                for kq in range(per):
                    blk = j * per + kq
                    t = ktab[blk]
                    decode_into(ks, kst[b, h, blk], kb * d, kls[t], kll[t], kln[t], MAX_LEN, kfix[t],
                                ksym[kq * kb * d:])
                t = vtab[j]
                decode_into(vs, vst[b, h, j], vb * d, vls[t], vll[t], vln[t], MAX_LEN, vfix[t], vsym)
                vt = vis[b, j * vb:(j + 1) * vb]
                for kq in range(per):
                    blk, at = j * per + kq, kq * kb
                    st, mn, sym = kstep[b, h, blk], kmn[b, h, blk], ksym[at * d:]
                    for r in range(0, trio, 3):
                        channel_logits3(q[b, h, r], q[b, h, r + 1], q[b, h, r + 2], st, mn, sym, kb, qs3,
                                        lg[r, at:], lg[r + 1, at:], lg[r + 2, at:])
                    for r in range(trio, nr):
                        channel_logits(q[b, h, r], st, mn, sym, kb, qs, lg[r, at:])
                softmax_fold(lg, vt, vb, m, lsum, kk, cap, corr, acc, accb, wt, w3, vsym,
                             vstep[b, h, j * vb:(j + 1) * vb], vmn[b, h, j * vb:(j + 1) * vb])
            for r in range(nr):
                pm[b, h, sp, r] = m[r]
                pl[b, h, sp, r] = lsum[r]
                for c in range(d):
                    acc[r, c] += accb[r, 0]
    merge(pm, pl, pacc, out)


def fused_attend(q: torch.Tensor, vis: torch.Tensor, dense_k: torch.Tensor, dense_v: torch.Tensor,
                 dense_vis: torch.Tensor, keys: BodyView, values: BodyView, splits: int = 4,
                 cap: float = 0.0) -> torch.Tensor:
    """Decode attention in one call: q (B, H, R, d) float32 already scaled, vis (B, n) bool over the
    coded tokens, dense_k / dense_v (B, H, n_dense, d) float32 and dense_vis (B, t, n_dense) bool for
    the other tokens -> (B, H, R, d) float32; cap: the logits' soft-cap (0: none)."""
    b, h, r, d = q.shape
    splits = max(1, min(splits, values.num_blocks))
    out = np.empty((b, h, r, d), dtype=np.float32)
    _fused(q.contiguous().numpy(), as_u8(vis), dense_k.contiguous().numpy(), dense_v.contiguous().numpy(),
           as_u8(dense_vis), keys.stream.numpy(), keys.starts.numpy(), keys.table_of.numpy(), keys.lut_sym.numpy(),
           keys.lut_len.numpy(), keys.lut_n.numpy(), keys.fixed.numpy(),
           keys.mn[..., 0, :].float().contiguous().numpy(), keys.step[..., 0, :].float().contiguous().numpy(),
           keys.block,
           values.stream.numpy(), values.starts.numpy(), values.table_of.numpy(), values.lut_sym.numpy(),
           values.lut_len.numpy(), values.lut_n.numpy(), values.fixed.numpy(),
           values.mn.reshape(b, h, -1, 1).float().contiguous().numpy(),
           values.step.reshape(b, h, -1, 1).float().contiguous().numpy(), values.block, splits, np.float32(cap),
           workers(b * h * (splits + 1)), out)
    return torch.from_numpy(out)


@dataclass
class KVCompBody:
    """A KVComp layer's coded body, read in place by the fused kernel (attention/split.py)."""

    keys: BodyView
    values: BodyView
    name = "kvcomp"

    @property
    def num_tokens(self) -> int:
        return self.keys.num_tokens

    def attend(self, q, vis, dense_k, dense_v, dense_vis, splits, cap=0.0):
        if triton_for(q):
            return gpu.fused_attend(q, vis, dense_k, dense_v, dense_vis, self.keys, self.values, splits, cap)
        return fused_attend(q, vis, dense_k, dense_v, dense_vis, self.keys, self.values, splits, cap)

    def decoded(self):
        return self.keys.decoded(), self.values.decoded()
