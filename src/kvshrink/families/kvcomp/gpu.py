"""KVComp decode attention on Triton (the interpreter on a CPU; see below for CUDA).

As the numba kernel (kernel.py) does, each program takes one (sequence, KV head) and a range of
value blocks. Per value block it decodes the block's value symbols and its key blocks' symbols into
a small scratch of its own (one block each, never the history), then takes the logits and folds the
values into an online softmax from those symbols and the blocks' float16 minimums and steps.
Prefix codes are decoded serially, one lookup of the next MAX_LEN bits emitting up to MULTI
symbols (codecs/huffman.py); 4- and 8-bit fixed-width tables are read by position, all at once.

A serial decode is one scalar chain per block: fine for the interpreter and for long contexts (many
blocks in parallel), slow per block on a GPU. On CUDA the streams live on the device and the encoder
stays numba on the host (docs/gpu.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...codecs.huffman import MAX_LEN, MULTI
from ...kernels.backend import CALLS
from ...kernels.gpu import TUNING, block, mm, online, splits_for
from ...kernels.partials import merge_dense
from .codec import BodyView

@triton.jit
def _symbols(stream, start, tab, lut_sym, lut_len, lut_n, fixed, out, n: tl.constexpr, MAXL: tl.constexpr,
             MULTIS: tl.constexpr):
    """The n symbols of the block at byte `start`, coded with table `tab`, into out[:n] (out[n:n + MULTIS]
    may be overwritten)."""
    fx = tl.load(fixed + tab)
    if fx == 0:
        lut = tab * (1 << MAXL)
        pos = start
        acc = start * 0  # the bit buffer (int64): at most MAXL - 1 + 16 bits are live
        nacc = 0
        i = 0
        while i < n:
            if nacc < MAXL:
                b0 = tl.load(stream + pos).to(tl.int64)
                b1 = tl.load(stream + pos + 1).to(tl.int64)
                acc = ((acc << 16) | (b0 << 8) | b1) & 0xFFFFFFFF
                pos += 2
                nacc += 16
            peek = (acc >> (nacc - MAXL)) & ((1 << MAXL) - 1)
            for j in tl.static_range(MULTIS):
                tl.store(out + i + j, tl.load(lut_sym + (lut + peek) * MULTIS + j))
            i += tl.load(lut_n + lut + peek).to(tl.int32)
            nacc -= tl.load(lut_len + lut + peek).to(tl.int32)
    else:
        for c0 in tl.static_range(0, n, 1024):
            idx = c0 + tl.arange(0, 1024)
            ok = idx < n
            if fx == 8:
                sym = tl.load(stream + start + idx, mask=ok, other=0)
            else:  # 4 bits, the first symbol in the high nibble
                byte = tl.load(stream + start + idx // 2, mask=ok, other=0)
                sym = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
            tl.store(out + idx, sym, mask=ok)


@triton.jit
def _kvcomp(q, vis, scratch, ks, kst, ktab, kls, kll, kln, kfix, kmn, kstep, vs, vst, vtab, vls, vll, vln, vfix, vmn,
            vstep, pm, pl, pacc, H, R, nvb, vis_b, cap, SPLITS, KB: tl.constexpr, VB: tl.constexpr,
            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, CAP: tl.constexpr,
            MAXL: tl.constexpr, MULTIS: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # offsets past 2 GiB (long contexts, big batches)
    sp = tl.program_id(1)
    b = bh // H
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    toks = tl.arange(0, VB)
    cm = cols[None, :] < D
    qrow = tl.load(q + (bh * R + rows[:, None]) * D + cols[None, :], mask=(rows[:, None] < R) & cm, other=0.0)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    kbuf = scratch + (bh * SPLITS + sp) * 2 * (VB * D + MULTIS)
    vbuf = kbuf + VB * D + MULTIS
    used = tl.maximum(1, tl.minimum(SPLITS, nvb))
    lo = sp * nvb // used
    hi = tl.where(sp < used, (sp + 1) * nvb // used, lo)
    nkb = nvb * (VB // KB)
    for j in range(lo, hi):
        for kq in tl.static_range(VB // KB):
            blk = j * (VB // KB) + kq
            _symbols(ks, tl.load(kst + bh * nkb + blk), tl.load(ktab + blk), kls, kll, kln, kfix,
                     kbuf + kq * KB * D, KB * D, MAXL, MULTIS)
        _symbols(vs, tl.load(vst + bh * nvb + j), tl.load(vtab + j), vls, vll, vln, vfix, vbuf, VB * D, MAXL, MULTIS)
        tl.debug_barrier()  # the serial writes above, then every thread's reads below
        sym = toks[:, None] * D + cols[None, :]
        kp = (bh * nkb + j * (VB // KB) + toks[:, None] // KB) * D + cols[None, :]  # per channel, per key block
        k = tl.load(kmn + kp, mask=cm, other=0.0).to(tl.float32) + tl.load(kstep + kp, mask=cm, other=0.0).to(
            tl.float32) * tl.load(kbuf + sym, mask=cm, other=0).to(tl.float32)
        s = mm(qrow, tl.trans(k), PREC)
        if CAP:
            s = cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))
        seen = tl.load(vis + b * vis_b + j * VB + toks) != 0
        s = tl.where(seen[None, :], s, float("-inf"))
        vp = bh * nvb * VB + j * VB + toks[:, None]  # per token
        v = tl.load(vmn + vp).to(tl.float32) + tl.load(vstep + vp).to(tl.float32) * tl.load(
            vbuf + sym, mask=cm, other=0).to(tl.float32)
        m, l, acc = online(s, m, l, acc, v, PREC)
        tl.debug_barrier()  # every read of this block's symbols before the next block overwrites them
    u = bh * (SPLITS + 1) + sp
    rmask = rows < R
    tl.store(pm + u * R + rows, m, mask=rmask)
    tl.store(pl + u * R + rows, l, mask=rmask)
    tl.store(pacc + (u * R + rows[:, None]) * D + cols[None, :], acc, mask=rmask[:, None] & cm)


def fused_attend(q: torch.Tensor, vis: torch.Tensor, dense_k: torch.Tensor, dense_v: torch.Tensor,
                 dense_vis: torch.Tensor, keys: BodyView, values: BodyView, splits: int = 4,
                 cap: float = 0.0) -> torch.Tensor:
    """kernel.fused_attend on the tensors' device (see there)."""
    CALLS["KVComp"] += 1
    b, h, r, d = q.shape
    dev = q.device
    nvb = values.num_blocks
    splits = splits_for(splits, dev, b * h, nvb)
    pm = torch.empty(b * h, splits + 1, r, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty(b * h, splits + 1, r, d, device=dev)
    scratch = torch.empty(b * h * splits * 2 * (values.block * d + MULTI), dtype=torch.uint8, device=dev)
    vis8 = vis.to(torch.uint8).contiguous()
    _kvcomp[(b * h, splits)](q.float().contiguous(), vis8, scratch, keys.stream, keys.starts.contiguous(),
                             keys.table_of, keys.lut_sym, keys.lut_len, keys.lut_n, keys.fixed,
                             keys.mn.contiguous(), keys.step.contiguous(), values.stream, values.starts.contiguous(),
                             values.table_of, values.lut_sym, values.lut_len, values.lut_n, values.fixed,
                             values.mn.contiguous(), values.step.contiguous(), pm, pl, pacc, h, r, nvb,
                             vis8.stride(0), float(cap), splits, KB=keys.block, VB=values.block, D=d,
                             BLOCK_D=block(d), BLOCK_R=max(16, triton.next_power_of_2(r)),
                             CAP=bool(cap), MAXL=MAX_LEN, MULTIS=MULTI, PREC=TUNING.precision,
                             num_warps=TUNING.num_warps)
    pm, pl, pacc = (x.view(b, h, splits + 1, *x.shape[2:]) for x in (pm, pl, pacc))
    return merge_dense(pm, pl, pacc, q, dense_k, dense_v, dense_vis, cap)
