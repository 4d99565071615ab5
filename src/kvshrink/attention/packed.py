"""Decode attention that reads bit-packed integer codes (IntQuant, KIVI layout) in place.

For each (sequence, KV head) and each tile of `tile` tokens (one cache block),
the kernel unpacks the tile's key codes into a small uint8 buffer in one flat
pass and takes the logits of the head's query rows in the code domain:
q . (mn + step * code) = q . mn + (q * step) . code for per-channel keys (q * step
and q . mn once per key group); per-token keys use step_g (q_g . code_g) +
mn_g sum(q_g) per channel group. It then unpacks the tile's value codes and folds
them into an online softmax, each token's weight times its group's step, its
minimum added once per group. A worker holds two tiles of uint8 codes, never
the history, and nothing is decoded twice: codes are read where they are used.
The tiles of a head are split into `splits` ranges run in parallel (flash-
decoding); attention/split.py merges the partials with the dense parts.
(The loop shapes follow attention/kvcomp.py: a first version that unpacked one
token at a time inside the attention loops ran 2.5x slower.)
A Hadamard-rotated codec (x stored as x @ R) is read without undoing the
rotation per token: q . (x_r R^T) = (q R) . x_r, and sum p (x_r R^T) = (sum p x_r) R^T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

from ..codecs.base import Packed
from ..codecs.hadamard import rotation
from ..codecs.quant import IntQuant

# fast math without "no infinities / no NaNs": the kernels test for -inf (masked tokens, empty
# splits), which fastmath=True would let LLVM fold away
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, inline="always")
def _unpack(codes, start, nsym, bits, out):
    """nsym codes packed from byte `start` (little-endian within bytes, as packing.pack writes
    them) into out[:nsym] as uint8: one flat pass over a tile's bytes, the codes' own order."""
    if bits == 8:
        for i in range(nsym):
            out[i] = codes[start + i]
    elif bits == 4:
        for i in range(nsym // 2):
            x = codes[start + i]
            out[2 * i] = x & 15
            out[2 * i + 1] = x >> 4
    elif bits == 2:
        for i in range(nsym // 4):
            x = codes[start + i]
            out[4 * i] = x & 3
            out[4 * i + 1] = (x >> 2) & 3
            out[4 * i + 2] = (x >> 4) & 3
            out[4 * i + 3] = x >> 6
    elif bits == 3:
        for u in range(nsym // 8):
            x = (np.uint32(codes[start + 3 * u]) | (np.uint32(codes[start + 3 * u + 1]) << 8)
                 | (np.uint32(codes[start + 3 * u + 2]) << 16))
            for k in range(8):
                out[8 * u + k] = (x >> (3 * k)) & 7
    else:
        mask = (1 << bits) - 1
        for j in range(nsym):
            bit = j * bits
            byte = start + (bit >> 3)
            sh = bit & 7
            v = np.int32(codes[byte]) >> sh
            if sh + bits > 8:
                v |= np.int32(codes[byte + 1]) << (8 - sh)
            out[j] = v & mask


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _fused(q, vis, kc, kmn, kstep, kb, kgroups, kbits, vc, vmn, vstep, vgroups, vbits, vb, splits,
           out_m, out_l, out_acc):
    nb_, nh, nr, d = q.shape
    n = vis.shape[1]
    nvb = (n + vb - 1) // vb
    krow = kc.shape[1] // n
    vrow = vc.shape[1] // n
    kw = d // kgroups
    vw = d // vgroups
    for u in numba.prange(nb_ * nh * splits):
        b = u // (nh * splits)
        h = (u // splits) % nh
        bh = b * nh + h
        sp = u % splits
        lo = sp * nvb // splits
        hi = (sp + 1) * nvb // splits
        ksym = np.empty(vb * d, dtype=np.uint8)  # one tile of codes
        vsym = np.empty(vb * d, dtype=np.uint8)
        logit = np.empty((nr, vb), dtype=np.float32)
        qs = np.empty(d, dtype=np.float32)
        m = np.full(nr, -np.inf, dtype=np.float32)
        lsum = np.zeros(nr, dtype=np.float32)
        acc = np.zeros((nr, d), dtype=np.float32)
        accb = np.zeros((nr, vgroups), dtype=np.float32)
        for j in range(lo, hi):
            t0 = j * vb
            cnt = min(vb, n - t0)  # a body cut inside a block (per-token codes) ends in a short tile
            _unpack(kc[bh], t0 * krow, cnt * d, kbits, ksym)
            # keys: q . (mn + step * code) = q . mn + (q * step) . code, without forming the key
            for r in range(nr):
                if kb > 1:  # per-channel keys: one (step, min) row per group of kb tokens
                    for kk in range((cnt + kb - 1) // kb):
                        blk = (t0 + kk * kb) // kb
                        bias = np.float32(0.0)
                        for c in range(d):
                            qs[c] = q[b, h, r, c] * kstep[b, h, blk, c]
                            bias += q[b, h, r, c] * kmn[b, h, blk, c]
                        for i in range(min(kb, cnt - kk * kb)):
                            tok = kk * kb + i
                            if vis[b, t0 + tok]:
                                s = bias
                                base = tok * d
                                for c in range(d):
                                    s += qs[c] * np.float32(ksym[base + c])
                                logit[r, tok] = s
                            else:
                                logit[r, tok] = -np.inf
                else:  # per-token keys: a (step, min) per token and channel group
                    for tok in range(cnt):
                        if vis[b, t0 + tok]:
                            s = np.float32(0.0)
                            for g in range(kgroups):
                                t = np.float32(0.0)
                                bias = np.float32(0.0)
                                base = tok * d + g * kw
                                for jj in range(kw):
                                    x = q[b, h, r, g * kw + jj]
                                    t += x * np.float32(ksym[base + jj])
                                    bias += x
                                s += kstep[b, h, t0 + tok, g] * t + kmn[b, h, t0 + tok, g] * bias
                            logit[r, tok] = s
                        else:
                            logit[r, tok] = -np.inf
            _unpack(vc[bh], t0 * vrow, cnt * d, vbits, vsym)
            for r in range(nr):
                mx = m[r]
                for i in range(cnt):
                    if logit[r, i] > mx:
                        mx = logit[r, i]
                if mx == -np.inf:
                    continue
                corr = np.float32(math.exp(m[r] - mx)) if m[r] > -np.inf else np.float32(0.0)
                lsum[r] *= corr
                for g in range(vgroups):
                    accb[r, g] *= corr
                for c in range(d):
                    acc[r, c] *= corr
                for i in range(cnt):
                    if logit[r, i] == -np.inf:
                        continue
                    p = np.float32(math.exp(logit[r, i] - mx))
                    tok = t0 + i
                    lsum[r] += p
                    if vgroups == 1:
                        accb[r, 0] += p * vmn[b, h, tok, 0]
                        w = p * vstep[b, h, tok, 0]
                        base = i * d
                        for c in range(d):
                            acc[r, c] += w * np.float32(vsym[base + c])
                    else:
                        for g in range(vgroups):
                            accb[r, g] += p * vmn[b, h, tok, g]
                            w = p * vstep[b, h, tok, g]
                            base = i * d + g * vw
                            for jj in range(vw):
                                acc[r, g * vw + jj] += w * np.float32(vsym[base + jj])
                m[r] = mx
        for r in range(nr):
            out_m[b, h, sp, r] = m[r]
            out_l[b, h, sp, r] = lsum[r]
            for c in range(d):
                out_acc[b, h, sp, r, c] = acc[r, c] + accb[r, c // vw]


def _operands(codec: IntQuant, packed: Packed):
    """(codes (B * H, bytes), min, scale (B, H, N // tg, params) float32, tg, channel groups) of a body."""
    t = packed.tensors
    b, h = t["codes"].shape[:2]
    n, d = packed.num_tokens, packed.head_dim
    tg, groups = (codec.group, 1) if codec.axis == "channel" else (1, d // (codec.group or d))
    mn = t["min"].reshape(b, h, n // tg, -1).float().numpy()
    sc = t["scale"].reshape(b, h, n // tg, -1).float().numpy()
    return t["codes"].reshape(b * h, -1).numpy(), mn, sc, tg, groups


def supported(key_codec, value_codec, head_dim: int | None = None) -> bool:
    """Codecs the kernel reads: IntQuant of any bit width, keys on either axis, values per token, and
    no padding inside a token's codes (every channel group, and the head vector when `head_dim` is
    given, a whole number of bytes), so a tile's codes unpack in one flat pass."""
    def whole(c):
        if not isinstance(c, IntQuant):
            return False
        width = (c.group or head_dim) if c.axis == "token" else head_dim
        return width is None or width * c.bits % 8 == 0

    return whole(key_codec) and whole(value_codec) and value_codec.axis == "token"


def fused_partials(q: torch.Tensor, vis: torch.Tensor, keys: Packed, values: Packed, key_codec: IntQuant,
                   value_codec: IntQuant, tile: int, splits: int = 4):
    """q (B, H, R, d) float32 already scaled, vis (B, tokens) bool -> (m, l, acc) with a split dim:
    (B, H, S, R), (B, H, S, R), (B, H, S, R, d) over the body's tokens; tile: tokens per kernel tile
    (the cache block: a multiple of the key groups)."""
    b, h, r, d = q.shape
    n = keys.num_tokens
    splits = max(1, min(splits, -(-n // tile)))
    if key_codec.rotate:
        q = q @ rotation(d, key_codec.seed)
    kc, kmn, ksc, ktg, kgroups = _operands(key_codec, keys)
    vc, vmn, vsc, _, vgroups = _operands(value_codec, values)
    out_m = np.empty((b, h, splits, r), dtype=np.float32)
    out_l = np.empty((b, h, splits, r), dtype=np.float32)
    out_acc = np.empty((b, h, splits, r, d), dtype=np.float32)
    _fused(q.contiguous().numpy(), vis.to(torch.uint8).contiguous().numpy(), kc, kmn, ksc, ktg, kgroups,
           key_codec.bits, vc, vmn, vsc, vgroups, value_codec.bits, tile, splits, out_m, out_l, out_acc)
    acc = torch.from_numpy(out_acc)
    if value_codec.rotate:
        acc = acc @ rotation(d, value_codec.seed).T
    return torch.from_numpy(out_m), torch.from_numpy(out_l), acc


@dataclass
class IntBody:
    """A CompressedLayer's integer-coded body, read in place by the kernel (attention/split.py)."""

    keys: Packed
    values: Packed
    key_codec: IntQuant
    value_codec: IntQuant
    block: int  # the cache block: the kernel's tile
    name = "int"

    @property
    def num_tokens(self) -> int:
        return self.keys.num_tokens

    def partials(self, q, vis, splits):
        return fused_partials(q, vis, self.keys, self.values, self.key_codec, self.value_codec, self.block, splits)

    def decoded(self):
        return self.key_codec.decode(self.keys), self.value_codec.decode(self.values)
