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

`attend_reference` computes the same thing by decoding everything first and
calling softmax attention: the path the fused kernel is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch.profiler import record_function

from ..codecs.huffman import MAX_LEN, MULTI, decode_into
from ..entropy_body import BodyView
from .paged import bool_mask


@numba.njit(cache=True, parallel=True, fastmath=True)
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
class KVCompStates:
    """One decode call's view of a KVComp layer: dense float16 sink, coded body, dense recent tokens,
    then this call's tokens (exact)."""

    sink: tuple  # (keys, values) (B, H, s, d)
    body: tuple | None  # (key BodyView, value BodyView)
    recent: tuple  # (keys, values) (B, H, r, d)
    new: tuple  # (keys, values) (B, H, t, d)
    fused: bool = True
    splits: int = 4

    def attend(self, module, query: torch.Tensor, mask, scaling=None):
        b, hq, t, d = query.shape
        h = self.new[0].shape[1]
        g = hq // h
        scale = scaling if scaling is not None else d ** -0.5
        q = (query.float() * scale).reshape(b, h, g * t, d)
        n_sink = self.sink[0].shape[2]
        n_body = self.body[0].num_tokens if self.body is not None else 0
        vis = bool_mask(mask)
        if vis is None:
            vis = torch.ones(b, 1, t, n_sink + n_body + self.recent[0].shape[2] + t, dtype=torch.bool).tril_(
                n_sink + n_body + self.recent[0].shape[2])
        vis = vis[:, 0].expand(b, t, -1)
        if not self.fused or self.body is None:
            return self._reference(q, vis, query)
        dense_k = torch.cat([self.sink[0].float(), self.recent[0].float(), self.new[0].float()], 2)
        dense_v = torch.cat([self.sink[1].float(), self.recent[1].float(), self.new[1].float()], 2)
        dense_vis = torch.cat([vis[..., :n_sink], vis[..., n_sink + n_body:]], -1)  # (B, t, n_dense)
        s = (q @ dense_k.transpose(2, 3)).view(b, h, g, t, -1)
        s = s.masked_fill(~dense_vis[:, None, None], float("-inf")).view(b, h, g * t, -1)
        m_d = s.amax(-1)
        body_vis = vis[:, -1, n_sink:n_sink + n_body]  # past tokens: every query row sees the same ones
        with record_function("kvcomp.fused_blocks"):  # named in profiles (scripts/profile_decode.py)
            m_b, l_b, acc_b = fused_partials(q, body_vis, *self.body, splits=self.splits)
        mx = torch.maximum(m_d, m_b.amax(2))
        safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(s - safe[..., None])
        w_b = torch.exp(m_b - safe[:, :, None]).nan_to_num_(0.0)  # an empty split has m = -inf
        den = p.sum(-1) + (l_b * w_b).sum(2)
        num = p @ dense_v + (acc_b * w_b[..., None]).sum(2)
        out = (num / den[..., None]).nan_to_num_(0.0)  # rows of left padding see nothing
        return out.to(query.dtype).view(b, hq, t, d).transpose(1, 2).contiguous(), None

    def _reference(self, q, vis, query):
        """Decode every block, then softmax attention over the whole history."""
        b, hq, t, d = query.shape
        h = q.shape[1]
        ks = [self.sink[0].float()]
        vs = [self.sink[1].float()]
        if self.body is not None:
            with record_function("kvcomp.decode_all"):
                ks.append(self.body[0].decoded())
                vs.append(self.body[1].decoded())
        ks += [self.recent[0].float(), self.new[0].float()]
        vs += [self.recent[1].float(), self.new[1].float()]
        k, v = torch.cat(ks, 2), torch.cat(vs, 2)
        s = (q @ k.transpose(2, 3)).view(b, h, hq // h, t, -1).masked_fill(~vis[:, None, None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num_(0.0).view(b, h, -1, k.shape[2])
        out = p @ v
        return out.to(query.dtype).view(b, hq, t, d).transpose(1, 2).contiguous(), None
