"""Decode attention that decompresses KVComp blocks where they are consumed.

For each (sequence, KV head) and each value block, the kernel decodes the
block's key symbols into a small buffer, turns them into logits for the query
rows of the head's group (q . (mn + s * sym) = q . mn + (q * s) . sym, so no
float key is formed), decodes the value block and folds it into an online
softmax (running max, sum and weighted sum). The whole decompressed cache never
exists; per call the kernel holds one block of symbols per worker. The value
blocks of a head are split into `splits` ranges processed in parallel (flash-
decoding style) whose partial results are merged with the dense parts (sink,
recent tokens, this call's tokens) by log-sum-exp.

`SplitStates(fused=False)` (attention/split.py) computes the same thing by
decoding everything first and calling softmax attention: the path the fused
kernel is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

from ..codecs.huffman import MAX_LEN, MULTI, decode_into
from ..entropy_body import BodyView

# fast math without "no infinities / no NaNs": the kernels test for -inf (masked tokens, empty
# splits), which fastmath=True would let LLVM fold away
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _fused(q, vis, ks, kst, ktab, kls, kll, kln, kfix, kmn, kstep, kb,
           vs, vst, vtab, vls, vll, vln, vfix, vmn, vstep, vb, splits, out_m, out_l, out_acc):
    nb_, nh, nr, d = q.shape
    nvb = vst.shape[2]
    per = vb // kb
    for u in numba.prange(nb_ * nh * splits):
        b = u // (nh * splits)
        h = (u // splits) % nh
        sp = u % splits
        lo = sp * nvb // splits
        hi = (sp + 1) * nvb // splits
        ksym = np.empty(vb * d + MULTI, dtype=np.uint8)  # decoders write up to MULTI past the end
        vsym = np.empty(vb * d + MULTI, dtype=np.uint8)
        logit = np.empty((nr, vb), dtype=np.float32)
        qs = np.empty(d, dtype=np.float32)
        m = np.full(nr, -np.inf, dtype=np.float32)
        lsum = np.zeros(nr, dtype=np.float32)
        acc = np.zeros((nr, d), dtype=np.float32)
        accb = np.zeros(nr, dtype=np.float32)
        for j in range(lo, hi):
            for kk in range(per):
                blk = j * per + kk
                t = ktab[blk]
                decode_into(ks, kst[b, h, blk], kb * d, kls[t], kll[t], kln[t], MAX_LEN, kfix[t], ksym[kk * kb * d:])
            for r in range(nr):
                for kk in range(per):
                    blk = j * per + kk
                    bias = np.float32(0.0)
                    for c in range(d):
                        qs[c] = q[b, h, r, c] * kstep[b, h, blk, c]
                        bias += q[b, h, r, c] * kmn[b, h, blk, c]
                    for i in range(kb):
                        tok = kk * kb + i
                        if vis[b, j * vb + tok]:
                            s = bias
                            base = tok * d
                            for c in range(d):
                                s += qs[c] * np.float32(ksym[base + c])
                            logit[r, tok] = s
                        else:
                            logit[r, tok] = -np.inf
            t = vtab[j]
            decode_into(vs, vst[b, h, j], vb * d, vls[t], vll[t], vln[t], MAX_LEN, vfix[t], vsym)
            for r in range(nr):
                mx = m[r]
                for i in range(vb):
                    if logit[r, i] > mx:
                        mx = logit[r, i]
                if mx == -np.inf:
                    continue
                corr = np.float32(math.exp(m[r] - mx)) if m[r] > -np.inf else np.float32(0.0)
                lsum[r] *= corr
                accb[r] *= corr
                for c in range(d):
                    acc[r, c] *= corr
                for i in range(vb):
                    if logit[r, i] == -np.inf:
                        continue
                    p = np.float32(math.exp(logit[r, i] - mx))
                    tok = j * vb + i
                    lsum[r] += p
                    accb[r] += p * vmn[b, h, tok]
                    w = p * vstep[b, h, tok]
                    base = i * d
                    for c in range(d):
                        acc[r, c] += w * np.float32(vsym[base + c])
                m[r] = mx
        for r in range(nr):
            out_m[b, h, sp, r] = m[r]
            out_l[b, h, sp, r] = lsum[r]
            for c in range(d):
                out_acc[b, h, sp, r, c] = acc[r, c] + accb[r]


def fused_partials(q: torch.Tensor, vis: torch.Tensor, keys: BodyView, values: BodyView, splits: int = 4):
    """q (B, H, R, d) float32 already scaled, vis (B, tokens) bool -> (m, l, acc) with a split dim:
    (B, H, S, R), (B, H, S, R), (B, H, S, R, d) over the coded tokens."""
    b, h, r, d = q.shape
    splits = max(1, min(splits, values.num_blocks))
    out_m = np.empty((b, h, splits, r), dtype=np.float32)
    out_l = np.empty((b, h, splits, r), dtype=np.float32)
    out_acc = np.empty((b, h, splits, r, d), dtype=np.float32)
    _fused(q.contiguous().numpy(), vis.to(torch.uint8).contiguous().numpy(),
           keys.stream.numpy(), keys.starts.numpy(), keys.table_of.numpy(), keys.lut_sym.numpy(),
           keys.lut_len.numpy(), keys.lut_n.numpy(), keys.fixed.numpy(), keys.mn[..., 0, :].float().contiguous().numpy(),
           keys.step[..., 0, :].float().contiguous().numpy(), keys.block,
           values.stream.numpy(), values.starts.numpy(), values.table_of.numpy(), values.lut_sym.numpy(),
           values.lut_len.numpy(), values.lut_n.numpy(), values.fixed.numpy(), values.mn.reshape(b, h, -1).float().contiguous().numpy(),
           values.step.reshape(b, h, -1).float().contiguous().numpy(), values.block, splits, out_m, out_l, out_acc)
    return torch.from_numpy(out_m), torch.from_numpy(out_l), torch.from_numpy(out_acc)


@dataclass
class KVCompBody:
    """A KVComp layer's coded body, read in place by the fused kernel (attention/split.py)."""

    keys: BodyView
    values: BodyView
    name = "kvcomp"

    @property
    def num_tokens(self) -> int:
        return self.keys.num_tokens

    def partials(self, q, vis, splits):
        return fused_partials(q, vis, self.keys, self.values, splits)

    def decoded(self):
        return self.keys.decoded(), self.values.decoded()
