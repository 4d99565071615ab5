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
decoding); attention/split.py merges the partials with the dense parts. The
per-tile arithmetic (and why it is written as it is) is in kernels/tiles.py.
A Hadamard-rotated codec (x stored as x @ R) is read without undoing the
rotation per token: q . (x_r R^T) = (q R) . x_r, and sum p (x_r R^T) = (sum p x_r) R^T.
Keys turned back by their offset in a group (codecs/spin.py) are read the same way, with one
query row per offset (turn(q, -j) R, built once per call): tiles.turned_logits.
Joint-basis keys (codecs/joint.py) are turned keys whose R is a head's own map back to keys: each tile's
width classes are unpacked one after another and formed axis-major into float keys (tiles.form_axes), the
uncoded axes taking their block's mean; the logits read them per axis, over all offsets at once, with the
per-offset queries stored axis-major too (tiles.axis_logits). Entropy-coded joint keys (codecs/jointcoded.py) are
read the same way, each block's coded classes decoded from their streams (jointcoded.decode_stream) where the
fixed-width ones are unpacked. Vector-level values (codecs/vector.py) hold a byte a run of coordinates: a tile's bytes
become their codewords (tiles.to_vectors) where scalar codes become their levels, then fold as Gaussian levels do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np
import torch

from ...codecs.base import Packed
from ...codecs.fewrows import few_rows
from ...codecs.hadamard import hadamard_block, rotation, signs
from ...codecs.joint import JointKeys
from ...codecs.jointcoded import EMIT, TAIL, WINDOW, CodedJointKeys, decode_stream
from ...codecs.quant import IntQuant
from ...codecs.scales import DEV_TABLE, RATIO_TABLE
from ...codecs.scales import unpack_numpy as unpack_scales
from ...codecs.scales import unpack_rms_numpy as unpack_rms
from ...codecs.spin import angles
from ...codecs.vector import VectorQuant
from ...errors import KvshrinkError
from ...kernels.backend import TRITON, triton_for
from ...kernels.tiles import (
    FAST,
    as_u8,
    axis_logits,
    axis_logits3,
    channel_logits,
    channel_logits3,
    dense_split,
    form_axes,
    form_keys,
    half_to_float,
    log_sum,
    merge,
    partial_buffers,
    rotate_back,
    softmax_fold,
    split_item,
    to_levels,
    to_vectors,
    turned_logits,
    turned_logits3,
    unpack_codes,
    workers,
)

if TRITON:
    from . import gpu


@numba.njit(cache=True, fastmath=FAST)
def _rows(qb, qt, axes, kb, t0, cnt, kstep, kmn, ksym, kgroups, qsum, vt, cap, m, lsum, lg, kk, qs, acc, accb, wt,
          vsym, vstep, vmn, corr, w3, qs3):
    """One tile for every query row of a head: logits from the key symbols ksym (codes, or their levels), folded
    into the online softmax (m, lsum) and the value sums (acc, accb) with the value symbols.
    qt (rows, kb, d): each row's query per offset in a key group, for turned keys (else empty); with `axes`
    (joint-basis keys) qt is (rows, d, kb) and the keys were formed axis-major. Rows go three at a time where
    they can (a GQA group's rows of one decode token): each key and value of the tile is read once for three
    (axis_logits3, turned_logits3, channel_logits3; tiles.softmax_fold). corr (rows,), w3 (3, tile), qs3 (3, d)
    scratch."""
    nr, d = qb.shape
    kw = d // kgroups
    trio = nr // 3 * 3
    if kb > 1:  # per-channel keys: one (step, min) row per block of kb tokens
        for kq in range((cnt + kb - 1) // kb):
            blk, at = (t0 + kq * kb) // kb, kq * kb
            nk = min(kb, cnt - at)
            kt = ksym[at * d:]
            for r in range(0, trio, 3):
                la, lb, lc = lg[r, at:], lg[r + 1, at:], lg[r + 2, at:]
                if axes:  # keys formed axis-major (_span)
                    axis_logits3(qt[r], qt[r + 1], qt[r + 2], kt, nk, kb, la, lb, lc)
                elif qt.shape[0]:  # keys formed (_span)
                    turned_logits3(qt[r], qt[r + 1], qt[r + 2], kt, nk, la, lb, lc)
                else:
                    channel_logits3(qb[r], qb[r + 1], qb[r + 2], kstep[blk], kmn[blk], kt, nk, qs3, la, lb, lc)
            for r in range(trio, nr):
                if axes:
                    axis_logits(qt[r], kt, nk, kb, lg[r, at:])
                elif qt.shape[0]:
                    turned_logits(qt[r], kt, nk, lg[r, at:])
                else:
                    channel_logits(qb[r], kstep[blk], kmn[blk], kt, nk, qs, lg[r, at:])
    else:  # per-token keys: step_g (q_g . code_g) + mn_g sum(q_g) per channel group
        ks = kstep[t0:t0 + cnt]
        km = kmn[t0:t0 + cnt]
        for r in range(nr):
            q1, qg, lr = qb[r], qsum[r], lg[r]
            for i in range(cnt):
                row = ksym[i * d:(i + 1) * d]
                s = np.float32(0.0)
                for g in range(kgroups):
                    qq = q1[g * kw:(g + 1) * kw]
                    rr = row[g * kw:(g + 1) * kw]
                    t = np.float32(0.0)
                    for jj in range(kw):
                        t += qq[jj] * np.float32(rr[jj])
                    s += ks[i, g] * t + km[i, g] * qg[g]
                lr[i] = s
    softmax_fold(lg, vt, cnt, m, lsum, kk, cap, corr, acc, accb, wt, w3, vsym, vstep, vmn)


_LIGHT = 3  # the kernel's parts after the body's splits: dense tokens, stage, window
# how a body's (min, step) are held: float32 (a batch's padded copy), float16, 8-bit, or a root mean square's byte
# with no mean (IntQuant's scales="rms8": its step bytes stand in for the min operand, unread)
F32, F16, SCALES8, RMS8 = 0, 1, 2, 3
_BYTES = np.array([4, 2, 1, 1], dtype=np.int64)  # bytes a number in each


@numba.njit(cache=True)
def _width(p):
    """Numbers a row of a side's parameters holds (p: _params's tuple for one head)."""
    return p[0].shape[1] // _BYTES[p[2]]


@numba.njit(cache=True)
def _head(p, b, h):
    """_params's tuple for all heads -> one (sequence, head)'s."""
    return p[0][b, h], p[1][b, h], p[2], p[3], p[4]


@numba.njit(cache=True, fastmath=FAST)
def _tile_params(p, r0, rows, mn, sc):
    """Rows r0 .. r0 + rows - 1 of one head's (min, step) as stored -> float32 mn, sc (rows, numbers): p = (min bytes,
    step bytes, format, a, c) with the format F32, F16, RMS8 (mean 0) or SCALES8 (codecs/scales.py: the step bytes
    are the deviation's log codes, the min bytes the mean's ratio to it), then an affine level table folded in
    (min + step * c, step * a: _table). Read a tile at a time, so a decode step converts nothing before the call."""
    pmn, psc, fmt, a, c = p
    wide, w = mn.shape[1], psc.shape[1] // _BYTES[fmt]  # numbers a row: the tile's, and the stored steps'
    k = rows * wide  # the rows are contiguous: one flat pass (a loop per row of one number was 7% slower)
    bm, bs = pmn[r0:r0 + rows].reshape(-1), psc[r0:r0 + rows].reshape(-1)
    om, os_ = mn.reshape(-1)[:k], sc.reshape(-1)[:k]
    if fmt == F32:
        om[:] = bm.view(np.float32)
    elif fmt == F16:
        half_to_float(bm, k, om)
    if w < wide:  # joint-basis keys (float16, or a batch's float32): steps of the first w axes only, the others' 0
        for r in range(rows):
            row = os_[r * wide:(r + 1) * wide]
            row[w:] = 0.0
            if fmt == F32:
                row[:w] = bs[r * w * 4:(r + 1) * w * 4].view(np.float32)
            else:
                half_to_float(bs[r * w * 2:(r + 1) * w * 2], w, row)
    elif fmt == F32:
        os_[:] = bs.view(np.float32)
    elif fmt == F16:
        half_to_float(bs, k, os_)
    elif fmt == RMS8:
        for i in range(k):
            os_[i] = DEV_TABLE[bs[i]]
            om[i] = 0.0
    else:
        for i in range(k):
            dv = DEV_TABLE[bs[i]]
            os_[i] = dv
            om[i] = RATIO_TABLE[bm[i]] * dv
    if a != 1.0 or c != 0.0:
        for i in range(k):
            om[i] += os_[i] * c
            os_[i] *= a


@numba.njit(cache=True, fastmath=FAST)
def _span(qb, qt, vis, lo, hi, n, kc, kp, kb, kgroups, kbits, vc, vp, vgroups, vbits, vb, vrot, cap, klut, vlut, vbook,
          kcls, kst, hsym, hlen, hn, kslot, pm, pl, acc):
    """Tiles lo..hi-1 (vb tokens each, the last one short where n ends inside it) of one (sequence, head)'s
    coded tokens as one split: qb (R, d) the query rows in the keys' basis, qt (R, group, d) turned ones or
    empty, vis (n,) the tokens' visibility, kc / vc (bytes,) the codes, kp / vp the parameters per group as
    stored (_tile_params reads a tile's); fills pm, pl (R,) and acc (R, d). kcls: for joint-basis keys (codecs/joint.py),
    (first axis, axes, width) per width class, the axes after the last class holding their means; else empty.
    kst (blocks, classes): where the keys are entropy-coded (codecs/jointcoded.py), each block's streams' byte
    offsets in kc (the whole stream), a class decoded with table kslot[class] of the lookups hsym, hlen, hn, or
    unpacked where kslot[class] is -1 (packed at fixed width); else (blocks, 0).
    vbook (K, r): vector-level values (codecs/vector.py), a byte a run of r coordinates; else (0, 1)."""
    nr, d = qb.shape
    krow = d * kbits // 8  # code bytes per token (supported(): whole bytes)
    jbits = 0  # joint-basis keys: code bits a token, their classes' (whole bytes a block; J1.5 is 12 bytes a token)
    for c in range(kcls.shape[0]):
        jbits += kcls[c, 1] * kcls[c, 2]
    vrow = d * vbits // 8
    kw = d // kgroups
    vw = d // vgroups
    ksym = np.empty(vb * d + EMIT, dtype=np.uint8)  # one tile of codes (a stream's decoder may write EMIT past)
    vsym = np.empty(vb * d, dtype=np.uint8)
    turned = qt.shape[0] > 0
    axes = kcls.shape[0] > 0  # joint-basis keys: formed and read axis-major
    floats = turned or klut.shape[0] > 0  # the keys the rows read are floats: levels, or turned keys formed
    kfl = np.empty(vb * d if floats else 0, dtype=np.float32)  # their levels (or keys), where not the codes
    vec = vbook.shape[0] > 0
    vruns = d // vbook.shape[1]  # value codes a token: one a coordinate, or one a codeword's run
    vfloat = vec or vlut.shape[0] > 0  # the values the rows read are levels, not the codes
    vfl = np.empty(vb * d if vfloat else 0, dtype=np.float32)
    lg = np.empty((nr, vb), dtype=np.float32)
    kk = np.empty(vb, dtype=np.int32)
    wt = np.empty(vb, dtype=np.float32)
    w3 = np.empty((3, vb), dtype=np.float32)
    qs3 = np.empty((3, d), dtype=np.float32)
    corr = np.empty(nr, dtype=np.float32)
    qs = np.empty(d, dtype=np.float32)
    qsum = np.zeros((nr, kgroups), dtype=np.float32)
    m = np.full(nr, -np.inf, dtype=np.float32)
    lsum = np.zeros(nr, dtype=np.float32)
    accb = np.zeros((nr, vgroups), dtype=np.float32)
    krows = (vb + kb - 1) // kb  # a tile's key parameter rows
    kmn, kstep = np.empty((krows, _width(kp)), dtype=np.float32), np.empty((krows, _width(kp)), dtype=np.float32)
    vm, vs = np.empty((vb, _width(vp)), dtype=np.float32), np.empty((vb, _width(vp)), dtype=np.float32)
    for r in range(nr):
        for c in range(d):
            qsum[r, c // kw] += qb[r, c]
    for j in range(lo, hi):
        t0 = j * vb
        cnt = min(vb, n - t0)  # a body cut inside a block (per-token codes) ends in a short tile
        _tile_params(kp, t0 // kb, (cnt + kb - 1) // kb, kmn, kstep)  # rows from 0: the tile's first block
        _tile_params(vp, t0, cnt, vm, vs)
        if kcls.shape[0] == 0:
            unpack_codes(kc[t0 * krow:], cnt * d, kbits, ksym)
        if vec:  # a byte a run, formed into its codeword's coordinates below
            unpack_codes(vc[t0 * vrow:], cnt * vruns, 8, vsym)
        else:
            unpack_codes(vc[t0 * vrow:], cnt * d, vbits, vsym)
        vt = vis[t0:t0 + cnt]
        # levels that are not the integers: a side's codes become their levels first
        if klut.shape[0]:
            to_levels(ksym, cnt * d, klut, kfl)
        if turned:  # each key group's keys formed once, not once per query row
            for kq in range((cnt + kb - 1) // kb):
                blk = kq  # the tile's parameter rows start at its first block
                nk, at = min(kb, cnt - kq * kb), kq * kb * d
                if kcls.shape[0]:  # joint-basis keys: each width class unpacked and formed, then the means
                    off = (t0 + kq * kb) * jbits // 8
                    last = 0
                    for c in range(kcls.shape[0]):
                        a0, na, bw = kcls[c, 0], kcls[c, 1], kcls[c, 2]
                        if kst.shape[1]:  # the class's stream of this block, decoded where it is read
                            sl, at0 = kslot[c], kst[t0 // kb + kq, c]
                            if sl >= 0:
                                decode_stream(kc, at0, kb * na, hsym[sl], hlen[sl], hn[sl], ksym)
                            else:
                                unpack_codes(kc[at0:], kb * na, bw, ksym)
                        else:
                            unpack_codes(kc[off:], kb * na, bw, ksym)
                        form_axes(kstep[blk, a0:a0 + na], kmn[blk, a0:a0 + na], ksym, nk, kb, kfl[at + a0 * kb:])
                        off += kb * na * bw // 8
                        last = a0 + na
                    for c in range(last, d):
                        kfl[at + c * kb:at + c * kb + nk] = kmn[blk, c]
                elif klut.shape[0]:  # levels, in place
                    form_keys(kstep[blk], kmn[blk], kfl[at:], nk, kfl[at:])
                else:
                    form_keys(kstep[blk], kmn[blk], ksym[at:], nk, kfl[at:])
        if vec:
            to_vectors(vsym, cnt * vruns, vbook, vfl)
        elif vlut.shape[0]:
            to_levels(vsym, cnt * d, vlut, vfl)
        # one call per pair of buffer types (uint8 codes or float32 levels): numba compiles each
        if floats and vfloat:
            _rows(qb, qt, axes, kb, 0, cnt, kstep, kmn, kfl, kgroups, qsum, vt, cap, m, lsum, lg, kk, qs, acc, accb, wt,
                  vfl, vs, vm, corr, w3, qs3)
        elif floats:
            _rows(qb, qt, axes, kb, 0, cnt, kstep, kmn, kfl, kgroups, qsum, vt, cap, m, lsum, lg, kk, qs, acc, accb, wt,
                  vsym, vs, vm, corr, w3, qs3)
        elif vfloat:
            _rows(qb, qt, axes, kb, 0, cnt, kstep, kmn, ksym, kgroups, qsum, vt, cap, m, lsum, lg, kk, qs, acc, accb, wt,
                  vfl, vs, vm, corr, w3, qs3)
        else:
            _rows(qb, qt, axes, kb, 0, cnt, kstep, kmn, ksym, kgroups, qsum, vt, cap, m, lsum, lg, kk, qs, acc, accb, wt,
                  vsym, vs, vm, corr, w3, qs3)
    for r in range(nr):
        pm[r] = m[r]
        pl[r] = lsum[r]
        for c in range(d):
            acc[r, c] += accb[r, c // vw]
        if vrot.shape[0]:
            rotate_back(acc[r], vrot, qs)


@numba.njit(cache=True, fastmath=FAST)
def _coded_span(qb, vis, n, kc, kp, kgroups, kbits, vc, vp, vgroups, vbits, vb, vrot, cap, vlut, vbook, pm, pl, acc):
    """n tokens of per-token codes (a stage or a coded window) as one split: uniform key codes, no turn."""
    if n:
        zero, one = np.int64(0), np.int64(1)  # not literals: every _span call shares one compiled signature
        _span(qb, np.empty((0, 0, 0), dtype=np.float32), vis, zero, (n + vb - 1) // vb, n, kc, kp, one, kgroups, kbits,
              vc, vp, vgroups, vbits, vb, vrot, cap, np.empty(0, dtype=np.float32), vlut, vbook,
              np.empty((0, 3), dtype=np.int64),
              np.empty((0, 0), dtype=np.int32), np.empty((0, 1 << WINDOW, EMIT), dtype=np.uint8),
              np.empty((0, 1 << WINDOW), dtype=np.uint8), np.empty((0, 1 << WINDOW), dtype=np.uint8),
              np.empty(0, dtype=np.int64), pm, pl, acc)


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _fused(q, qb, qt, vis, nbody, dk, dv, dvis, ndense, kc, kp, kb, kgroups, kbits, vc, vp, vgroups, vbits, vb, splits, vrot,
           cap, klut, vlut, vbook, kcls, kst, hsym, hlen, hn, kslot, soff, sqb, nstage, skc, skp, skgroups, skbits, svc,
           svp, woff, wqb, nwin, wkc, wkp, wkgroups, wkbits, wvc, wvp, wvgroups, wvbits, wrot, nw, out, lse):
    """Body splits 0..splits-1, the dense tokens (split `splits`), the stage (split `splits` + 1): a
    block still filling, per-token codes read in place (its keys by sqb, the query in their basis, its
    values in the body values' codec), at vis[b, soff:]; and a coded recent window (split `splits` + 2):
    per-token codes of its own codec for keys and values (keys by wqb, values rotated back by wrot), at
    vis[b, woff:]. Partials merged in that order. nw: the workers the parts are shared by (tiles.workers).
    Entropy-coded keys: kc one row (the stream), kst (B * H, blocks, classes) the offsets (_span). lse: (B, H, R) to
    receive each row's log-sum-exp (families/mixed scores tokens with it), or empty."""
    nb_, nh, nr, d = q.shape
    parts = splits + _LIGHT
    pm, pl, pacc = partial_buffers(nb_, nh, parts, nr, d)
    no_levels = np.empty(0, dtype=np.float32)
    no_book = np.empty((0, 1), dtype=np.float32)
    items = nb_ * nh * parts
    for w in numba.prange(nw):
        for i in range(w, items, nw):  # split_item's order: the body's ranges first, shared evenly
            b, h, sp = split_item(i, nb_, nh, splits, parts)
            bh = b * nh + h
            if sp == splits:  # the dense tokens (sink, float16 tokens, this call's): one more split
                nd = ndense[b]  # this sequence's dense tokens (the rest is a batch's padding)
                dense_split(q[b, h], dk[b, h, :nd], dv[b, h, :nd], dvis[b, :, :nd], cap, pm[b, h, sp], pl[b, h, sp],
                            pacc[b, h, sp])
                continue
            if sp == splits + 1:  # the stage, its values in the body values' codec
                _coded_span(sqb[b, h], vis[b, soff:], nstage[b], skc[bh], _head(skp, b, h), skgroups, skbits, svc[bh],
                            _head(svp, b, h), vgroups, vbits, vb, vrot, cap, vlut, vbook, pm[b, h, sp], pl[b, h, sp],
                            pacc[b, h, sp])
                continue
            if sp == splits + 2:  # the coded window, keys and values in its own codec
                _coded_span(wqb[b, h], vis[b, woff:], nwin[b], wkc[bh], _head(wkp, b, h), wkgroups, wkbits, wvc[bh],
                            _head(wvp, b, h), wvgroups, wvbits, vb, wrot, cap, no_levels, no_book, pm[b, h, sp],
                            pl[b, h, sp], pacc[b, h, sp])
                continue
            n = nbody[b]  # this sequence's body tokens: its tiles and split edges ignore a batch's padding
            nvb = (n + vb - 1) // vb
            used = max(1, min(splits, nvb))
            if sp >= used:
                continue
            _span(qb[b, h], qt[b, h], vis[b], sp * nvb // used, (sp + 1) * nvb // used, n, kc[bh % kc.shape[0]],
                  _head(kp, b, h), kb, kgroups, kbits, vc[bh], _head(vp, b, h), vgroups, vbits, vb, vrot, cap, klut,
                  vlut, vbook, kcls, kst[bh % kst.shape[0]], hsym, hlen, hn, kslot, pm[b, h, sp], pl[b, h, sp],
                  pacc[b, h, sp])
    merge(pm, pl, pacc, out)
    if lse.shape[0]:
        log_sum(pm, pl, lse)


def _operands(codec: IntQuant, packed: Packed):
    """(codes (B * H, bytes), parameters as stored (_params), tg, channel groups) of a body; entropy-coded keys'
    codes are their stream, one row."""
    t = packed.tensors
    b, h = t["scale"].shape[:2]
    d = packed.head_dim
    tg, groups = (codec.group, 1) if codec.axis == "channel" else (1, d // (codec.group or d))
    codes = t["stream"].reshape(1, -1) if isinstance(codec, CodedJointKeys) else t["codes"].reshape(b * h, -1)
    return codes.numpy(), _params(codec, t, b, h, packed.num_tokens // tg), tg, groups


# no entropy-coded keys: kst with no blocks (unpacked as fixed-width codes), no tables; one tuple for every call
_NO_STREAMS = (np.empty((1, 0, 0), dtype=np.int32), np.empty((0, 1 << WINDOW, EMIT), dtype=np.uint8),
               np.empty((0, 1 << WINDOW), dtype=np.uint8), np.empty((0, 1 << WINDOW), dtype=np.uint8),
               np.empty(0, dtype=np.int64))


def _streams(codec, starts: np.ndarray | None) -> tuple:
    """The kernel's (kst, hsym, hlen, hn, kslot) for a body's keys: starts (B * H, blocks, classes) int32 and the
    codec's tables where they are entropy-coded; else _NO_STREAMS."""
    if not isinstance(codec, CodedJointKeys):
        return _NO_STREAMS
    t = codec.tables
    return starts, t.lut_sym.numpy(), t.lut_len.numpy(), t.lut_n.numpy(), codec.slot_table


_FORMATS = {torch.float32: F32, torch.float16: F16, torch.uint8: SCALES8}


def _params(codec: IntQuant, t: dict, b: int, h: int, rows: int) -> tuple:
    """A body's (min, step) for the kernel to read in place (_tile_params): (their bytes (B, H, rows, -1) each, format,
    a, c of an affine level table). Converting them to float32 before the call (float16 by the compiled loop, 8-bit
    scales by their tables) cost `auto-6x` about 2% of a decode step at 8k, for a copy the kernel reads once."""
    _, a, c = _table(codec)
    sc = np.ascontiguousarray(t["scale"].numpy()).view(np.uint8).reshape(b, h, rows, -1)
    if "min" not in t:  # root-mean-square scales: no mean held
        return sc, sc, RMS8, float(a), float(c)
    mn = np.ascontiguousarray(t["min"].numpy()).view(np.uint8).reshape(b, h, rows, -1)
    return mn, sc, _FORMATS[t["min"].dtype], float(a), float(c)


def _as_params(mn: np.ndarray, sc: np.ndarray, codec: IntQuant | None = None) -> tuple:
    """float32 (B, H, rows, numbers) parameters of `codec` (None: no level table) as _params's tuple."""
    _, a, c = _table(codec) if codec is not None else (None, 1.0, 0.0)
    return mn.view(np.uint8), sc.view(np.uint8), F32, float(a), float(c)


def supported(key_codec, value_codec, head_dim: int | None = None) -> bool:
    """Codecs the kernel reads: IntQuant of any bit width, keys on either axis, values per token, and
    no padding inside a token's codes (every channel group, and the head vector when `head_dim` is
    given, a whole number of bytes), so a tile's codes unpack in one flat pass."""
    def whole(c):
        if isinstance(c, JointKeys):
            return c is key_codec and (head_dim is None or head_dim == len(c.widths))
        if not isinstance(c, IntQuant):
            return False
        width = (c.group or head_dim) if c.axis == "token" else head_dim
        return width is None or width * c.bits % 8 == 0

    return whole(key_codec) and whole(value_codec) and value_codec.axis == "token"


def stage_supported(codec, head_dim: int) -> bool:
    """Stage codes the kernel reads in place (its stage split): uniform per-token IntQuant, float16
    scales, no turned keys, whole bytes per channel group."""
    return (isinstance(codec, IntQuant) and codec.axis == "token" and codec.uniform and not codec.derope
            and codec.scales == "fp16" and supported(codec, IntQuant(8, "token"), head_dim))


def fused_attend(q: torch.Tensor, vis: torch.Tensor, dense_k: torch.Tensor, dense_v: torch.Tensor,
                 dense_vis: torch.Tensor, keys: Packed, values: Packed, key_codec: IntQuant,
                 value_codec: IntQuant, tile: int, splits: int = 4, cap: float = 0.0, stage=None,
                 window=None, lse: np.ndarray | None = None) -> torch.Tensor:
    """Decode attention in one call: q (B, H, R, d) float32 already scaled (rows in (group, token)
    order), vis (B, n) bool over the body's tokens (then the stage's), dense_k / dense_v (B, H, n_dense, d)
    float32 and dense_vis (B, t, n_dense) bool for the other tokens -> (B, H, R, d) float32. tile: tokens per
    kernel tile (the cache block: a multiple of the key groups); cap: the logits' soft-cap (0: none);
    stage: None or (keys, values, key codec) of a block still filling, per-token codes read in place; window: None
    or (keys, values, codec) of a coded recent window after it, likewise (vis covers body, stage, then window); lse:
    None, or a (B, H, R) float32 array the kernel fills with each row's log-sum-exp."""
    b, h, r, d = q.shape
    n = keys.num_tokens
    splits = max(1, min(splits, -(-n // tile)))
    qb, qt = _key_queries(q, key_codec)
    vrot = rotation(d, value_codec.seed).numpy() if value_codec.rotate else _NO_ROTATION
    kc, kp, ktg, kgroups = _operands(key_codec, keys)
    vc, vp, _, vgroups = _operands(value_codec, values)
    out = np.empty((b, h, r, d), dtype=np.float32)
    nbody = np.full(b, n, dtype=np.int64)
    ndense = np.full(b, dense_k.shape[2], dtype=np.int64)
    staged = _stage_operands(q, _per_row(stage, b), stage[2] if stage is not None else None, value_codec)
    woff = n + (stage[0].num_tokens if stage is not None else 0)
    recent = _window_operands(q, _per_row(window, b), window[2] if window is not None else None)
    _fused(q.contiguous().numpy(), qb.contiguous().numpy(), qt, as_u8(vis), nbody, dense_k.contiguous().numpy(),
           dense_v.contiguous().numpy(), as_u8(dense_vis), ndense, kc, kp, ktg, kgroups, key_codec.bits, vc, vp,
           vgroups, value_codec.bits, tile, splits, vrot, np.float32(cap), *_luts(key_codec, value_codec),
           _classes(key_codec), *_streams(key_codec, _starts(key_codec, keys)), n, *staged, woff, *recent,
           workers(b * h * (splits + _LIGHT)), out, _NO_LSE if lse is None else lse)
    return torch.from_numpy(out)


def _starts(codec, packed) -> np.ndarray | None:
    """(B * H, blocks, classes) int32 stream offsets of an entropy-coded key body, else None."""
    if not isinstance(codec, CodedJointKeys):
        return None
    st = packed.tensors["starts"]
    b, h, nb, ncls = st.shape
    return st.reshape(b * h, nb, ncls).numpy()


def _per_row(stage, b: int) -> list:
    """A batch's stage (keys, values of B rows) as B one-row stages, as _stage_operands takes them."""
    if stage is None or b == 1:
        return [None if stage is None else stage[:2]] * b
    k, v = stage[0], stage[1]
    return [(k.select_batch(torch.tensor([i])), v.select_batch(torch.tensor([i]))) for i in range(b)]


def _stage_operands(q: torch.Tensor, stages: list, codec: IntQuant | None, value_codec: IntQuant):
    """The kernel's stage arguments for B sequences' stages (each None or (keys, values) Packed of one row):
    (sqb, nstage, skc, skp, skgroups, skbits, svc, svp), stages padded to the longest (parameters: _params's tuples)."""
    b, h, _, d = q.shape
    ns = np.array([0 if s is None else s[0].num_tokens for s in stages], dtype=np.int64)
    if not ns.any():
        vgroups = d // (value_codec.group or d)
        none = (np.zeros((b, h, 0, 1), np.float32), np.zeros((b, h, 0, vgroups), np.float32))
        keys, vals = ((np.zeros((b * h, 0), np.uint8), _as_params(x, x)) for x in none)
        return np.zeros(q.shape, dtype=np.float32), ns, *keys, 1, 8, *vals
    s_max = int(ns.max())
    kc, kp, _, kgroups = _padded(codec, [[s[0]] if s is not None else [] for s in stages], s_max)
    vc, vp, _, _ = _padded(value_codec, [[s[1]] if s is not None else [] for s in stages], s_max)
    sqb = _key_queries(q, codec)[0].contiguous().numpy()
    return sqb, ns, kc, kp, kgroups, codec.bits, vc, vp


def _window_operands(q: torch.Tensor, windows: list, codec: IntQuant | None):
    """The kernel's window arguments for B sequences' coded windows (each None or (keys, values) Packed of one row,
    both in `codec`): (wqb, nwin, wkc, wkp, wkgroups, wkbits, wvc, wvp, wvgroups, wvbits, wrot),
    windows padded to the longest. A window is a stage whose values are in its own codec (stage_supported)."""
    d = q.shape[-1]
    codec = codec or _NO_WINDOW  # no window: empty operands of a placeholder codec
    staged = _stage_operands(q, windows, codec, codec)
    rot = rotation(d, codec.seed).numpy() if codec.rotate else _NO_ROTATION
    return (*staged, d // (codec.group or d), codec.bits, rot)


_NO_ROTATION = np.empty((0, 0), dtype=np.float32)
_NO_LSE = np.empty((0, 0, 0), dtype=np.float32)
_NO_WINDOW = IntQuant(8, "token")
_NO_LEVELS = np.empty(0, dtype=np.float32)


@numba.njit(cache=True, fastmath=FAST)
def _turned_table(q, cos, sin, sg, block, out):
    """out[b, h, r, j] = turn(q[b, h, r], -j) @ R (codecs/spin.py, codecs/hadamard.py), without forming R:
    the turn pair by pair, then (with signs sg) a fast Walsh-Hadamard transform within each block. The
    work is laid out channel-major (d, group), so every step runs over the group's offsets in vectors."""
    nb, nh, nr, d = q.shape
    g, n = cos.shape
    scale = np.float32(1.0 / np.sqrt(block)) if sg.shape[0] else np.float32(1.0)
    u = np.empty((d, g), dtype=np.float32)
    for b in range(nb):
        for h in range(nh):
            for r in range(nr):
                x = q[b, h, r]
                for i in range(n):
                    x1, x2 = x[i], x[i + n]
                    s1 = sg[i] if sg.shape[0] else np.float32(1.0)
                    s2 = sg[i + n] if sg.shape[0] else np.float32(1.0)
                    for j in range(g):
                        u[i, j] = (x1 * cos[j, i] + x2 * sin[j, i]) * s1
                        u[i + n, j] = (x2 * cos[j, i] - x1 * sin[j, i]) * s2
                for i in range(2 * n, d):
                    si = sg[i] if sg.shape[0] else np.float32(1.0)
                    for j in range(g):
                        u[i, j] = x[i] * si
                if sg.shape[0]:
                    for o in range(0, d, block):
                        w = 1
                        while w < block:
                            for a in range(o, o + block, 2 * w):
                                for i in range(a, a + w):
                                    for j in range(g):
                                        t = u[i, j]
                                        u[i, j] = t + u[i + w, j]
                                        u[i + w, j] = t - u[i + w, j]
                            w *= 2
                for j in range(g):
                    for i in range(d):
                        out[b, h, r, j, i] = u[i, j] * scale


def turned_table(q: torch.Tensor, codec: IntQuant) -> np.ndarray:
    """The per-offset queries (B, H, R, group, d) float32 of a turned key codec: turn(q, -j) R for j < group
    (tiles.turned_logits reads them)."""
    d = q.shape[-1]
    cos, sin = angles(codec.derope, codec.group, torch.device("cpu"))
    sg = signs(d, codec.seed).numpy() if codec.rotate else np.empty(0, dtype=np.float32)
    out = np.empty((*q.shape[:3], codec.group, d), dtype=np.float32)
    _turned_table(q.contiguous().numpy(), cos.numpy(), sin.numpy(), sg, hadamard_block(d), out)
    return out


def _key_queries(q: torch.Tensor, codec: IntQuant):
    """(the query the key logits read, the per-offset queries (B, H, R, group, d) or empty): for turned keys
    q as it is and the table (the rotation is in the table), else q in the keys' rotated basis. Joint-basis
    keys: the table's rows mapped by each head's inverse, turn(q, -j) inverse[h]^T (_joint_table),
    axis-major (B, H, R, d, group) as tiles.axis_logits reads them."""
    d = q.shape[-1]
    if isinstance(codec, JointKeys):
        return q, _joint_table(q, codec)
    if codec.derope:
        return q, turned_table(q, codec)
    none = np.empty((*q.shape[:2], 0, 0, 0), dtype=np.float32)  # qt[b, h] stays in bounds
    return (few_rows(q, rotation(d, codec.seed)) if codec.rotate else q), none


@lru_cache(maxsize=16)
def _cos_sin(freqs: tuple, group: int) -> np.ndarray:
    """(2n, group) float32: cos then sin of offset j times frequency i (codecs/spin.py's angles), transposed."""
    cos, sin = angles(freqs, group, torch.device("cpu"))
    return torch.cat([cos, sin], 1).T.contiguous().numpy()


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _joint_rows(q, rows, scale, cs, out):
    """out[b, h, r] (d, group) = turn(q[b, h, r], -j) A^T for every offset j, A = rows[h] * scale[h] (the
    head's inverse, int8 rows and a scale per row). The turn is linear in (cos, sin) of j f_k, so with x1, x2 the
    query's pairs, row i is sum_k (x1 A1 + x2 A2)[i, k] cos[k] + (x2 A1 - x1 A2)[i, k] sin[k], plus the channels
    RoPE leaves alone, the same for every offset: a product of row i's 2n coefficients (p) with the (2n, group)
    cos and sin table. One query row per worker, on numba's threads."""
    nb_, nh, nr, d = q.shape
    n = cs.shape[0] // 2
    for u in numba.prange(nb_ * nh * nr):
        b = u // (nh * nr)
        h = (u // nr) % nh
        r = u % nr
        x = q[b, h, r]
        o = out[b, h, r]
        p = np.empty((d, 2 * n), dtype=np.float32)
        for i in range(d):
            s = scale[h, i]
            rest = np.float32(0.0)
            for c in range(2 * n, d):
                rest += np.float32(rows[h, i, c]) * x[c]
            o[i, :] = rest * s
            for k in range(n):
                a1 = np.float32(rows[h, i, k]) * s
                a2 = np.float32(rows[h, i, n + k]) * s
                p[i, k] = x[k] * a1 + x[n + k] * a2
                p[i, n + k] = x[n + k] * a1 - x[k] * a2
        _times_table(p, cs, o)


@numba.njit(cache=True, fastmath=FAST)
def _times_table(p, cs, o):
    """o (d, group) += p (d, m) @ cs (m, group), four rows of o by four of cs at a time (each load feeds four
    times the multiply-adds of a row at a time: 104 against 166 us for a 9-row table at 8k, alone)."""
    d, m = p.shape
    i = 0
    while i + 4 <= d:
        o0, o1, o2, o3 = o[i], o[i + 1], o[i + 2], o[i + 3]
        p0, p1, p2, p3 = p[i], p[i + 1], p[i + 2], p[i + 3]
        k = 0
        while k + 4 <= m:
            ca, cb, cc, cd = cs[k], cs[k + 1], cs[k + 2], cs[k + 3]
            a0, b0, c0, d0 = p0[k], p0[k + 1], p0[k + 2], p0[k + 3]
            a1, b1, c1, d1 = p1[k], p1[k + 1], p1[k + 2], p1[k + 3]
            a2, b2, c2, d2 = p2[k], p2[k + 1], p2[k + 2], p2[k + 3]
            a3, b3, c3, d3 = p3[k], p3[k + 1], p3[k + 2], p3[k + 3]
            for j in range(o.shape[1]):
                va, vb, vc, vd = ca[j], cb[j], cc[j], cd[j]
                o0[j] += a0 * va + b0 * vb + c0 * vc + d0 * vd
                o1[j] += a1 * va + b1 * vb + c1 * vc + d1 * vd
                o2[j] += a2 * va + b2 * vb + c2 * vc + d2 * vd
                o3[j] += a3 * va + b3 * vb + c3 * vc + d3 * vd
            k += 4
        for t in range(4):
            _row_times_table(p[i + t], cs, k, o[i + t])
        i += 4
    for t in range(i, d):
        _row_times_table(p[t], cs, 0, o[t])


@numba.njit(cache=True, fastmath=FAST)
def _row_times_table(pr, cs, k0, orow):
    """orow += sum over k >= k0 of pr[k] cs[k]: what _times_table's blocks leave."""
    for k in range(k0, pr.shape[0]):
        ck = cs[k]
        pk = pr[k]
        for j in range(orow.shape[0]):
            orow[j] += pk * ck[j]


def _joint_table(q: torch.Tensor, codec: JointKeys) -> np.ndarray:
    """turn(q, -j) inverse[h]^T for every offset j, axis-major (B, H, R, d, group) float32 (_joint_rows). On numba's
    threads: as a PyTorch product (one batched matmul, 4.7 million multiply-adds at 8k) it took 0.3-0.8 ms a layer
    in a decode step, mostly waiting at MKL's OpenMP barrier (codecs/fewrows.py)."""
    out = np.empty((*q.shape[:3], q.shape[-1], codec.group), dtype=np.float32)
    scale = codec.inverse_scale.numpy().astype(np.float32).reshape(codec.inverse_rows.shape[:2])
    _joint_rows(q.contiguous().numpy(), codec.inverse_rows.numpy(), scale, _cos_sin(codec.derope, codec.group), out)
    return out


def _table(codec: IntQuant):
    """(level table, a, c) for a codec: no table where a code's level is affine in the code (uniform codes,
    and any 1-bit table: level = a * code + c), whose (min, step) the kernel then reads as
    (min + step * c, step * a); else the table. Vector levels have none: their codebook (_luts) holds them."""
    if codec.uniform or isinstance(codec, VectorQuant):
        return _NO_LEVELS, 1.0, 0.0
    lv = codec.table()
    if lv.numel() == 2:
        return _NO_LEVELS, float(lv[1] - lv[0]), float(lv[0])
    return lv.numpy(), 1.0, 0.0


_NO_CLASSES = np.empty((0, 3), dtype=np.int64)


def _classes(codec) -> np.ndarray:
    """(first axis, axes, width) per width class of joint-basis keys (the kernel's kcls), else empty."""
    return codec.class_table if isinstance(codec, JointKeys) else _NO_CLASSES


_NO_BOOK = np.empty((0, 1), dtype=np.float32)


def _luts(key_codec: IntQuant, value_codec: IntQuant) -> tuple:
    """The level tables the kernel takes for keys and values (empty: the codes are read as they are), and the
    values' codebook (vector levels; else empty)."""
    book = value_codec.book.numpy() if isinstance(value_codec, VectorQuant) else _NO_BOOK
    return _table(key_codec)[0], _table(value_codec)[0], book


def _views(codec: IntQuant, p: Packed, h: int) -> tuple:
    """(codes, min, scale) of one body as (h, -1) numpy arrays. Views of its tensors, kept on the body
    (never written, so they stay right; no bytes of their own): a server's step reads every body,
    shared prefix parts included, and building them each time cost more than the copy of a short part.
    8-bit scales are decoded per call (kept, they would be a second copy)."""
    views = p.__dict__.get("_views")
    if views is None:
        c = p.tensors["codes"].numpy().reshape(h, -1)
        if codec.scales == "8bit":  # decoded first (codecs/scales.py)
            return (c, *(x.reshape(h, -1) for x in unpack_scales(p.tensors["scale"].numpy(), p.tensors["min"].numpy())))
        if codec.scales == "rms8":
            return (c, *(x.reshape(h, -1) for x in unpack_rms(p.tensors["scale"].numpy())))
        views = p.__dict__["_views"] = (c, *(p.tensors[k].numpy().reshape(h, -1) for k in ("min", "scale")))
    return views


def _padded(codec: IntQuant, bodies: list, n_max: int):
    """_operands of many sequences' bodies (one sequence each, a list of parts laid end to end: blocks
    shared with other sequences, then its own) in arrays padded to n_max tokens, float32 parameters."""
    h = next(p for parts in bodies for p in parts).tensors["codes"].shape[1]
    tg = codec.group if codec.axis == "channel" else 1
    if len(bodies) == 1 and len(bodies[0]) == 1 and bodies[0][0].num_tokens == n_max:
        return _operands(codec, bodies[0][0])  # one sequence's one body (a decode step's stage, window): as held
    codes = mn = sc = None
    for b, parts in enumerate(bodies):  # numpy views: a torch op per part would cost more than the copy
        at_c = at_m = at_s = 0  # where the next part goes: code bytes, minimums, steps
        for p in parts:
            c, m, s = _views(codec, p, h)
            if codes is None:
                n = p.num_tokens
                # code bytes and parameters per group (a joint key's token may hold part of a byte: J1.5 at 16 wide;
                # its steps are for the coded axes only)
                row, params, steps = c.shape[1] * tg // n, m.shape[1] * tg // n, s.shape[1] * tg // n
                codes = np.zeros((len(bodies), h, n_max // tg * row), dtype=np.uint8)
                mn = np.zeros((len(bodies), h, n_max // tg * params), dtype=np.float32)
                sc = np.zeros((len(bodies), h, n_max // tg * steps), dtype=np.float32)
            codes[b, :, at_c:at_c + c.shape[1]] = c
            mn[b, :, at_m:at_m + m.shape[1]] = m
            sc[b, :, at_s:at_s + s.shape[1]] = s
            at_c += c.shape[1]
            at_m += m.shape[1]
            at_s += s.shape[1]
    mn, sc = mn.reshape(len(bodies), h, n_max // tg, params), sc.reshape(len(bodies), h, n_max // tg, steps)
    return codes.reshape(len(bodies) * h, -1), _as_params(mn, sc, codec), tg, \
        1 if codec.axis == "channel" else params


def _padded_streams(codec: CodedJointKeys, bodies: list, n_max: int):
    """_padded for entropy-coded keys: (stream (1, bytes), float32 parameters, tg, 1, offsets (B * H, blocks,
    classes)), every part's streams end to end in one row and their offsets moved with them (nothing decoded)."""
    first = next(p for parts in bodies for p in parts)
    _, h, _, ncls = first.tensors["starts"].shape
    d, nbm = first.head_dim, n_max // codec.group
    kst = np.zeros((len(bodies), h, nbm, ncls), dtype=np.int32)
    mn = np.zeros((len(bodies), h, nbm, d), dtype=np.float32)
    sc = np.zeros((len(bodies), h, nbm, codec.coded), dtype=np.float32)  # steps of the coded axes only
    chunks, base = [], 0
    for b, parts in enumerate(bodies):
        at = 0
        for p in parts:
            t = p.tensors
            s = t["stream"].numpy()
            nb = p.num_blocks
            kst[b, :, at:at + nb] = t["starts"][0].numpy() + base
            mn[b, :, at:at + nb] = t["min"][0].numpy()
            sc[b, :, at:at + nb] = t["scale"][0].numpy()
            chunks.append(s[:s.size - TAIL])
            base += s.size - TAIL
            at += nb
    if base >= 2 ** 31:
        raise KvshrinkError("a batch's entropy-coded keys past 2 GB of streams do not fit int32 offsets")
    stream = np.concatenate([*chunks, np.zeros(TAIL, dtype=np.uint8)])
    return stream.reshape(1, -1), _as_params(mn, sc, codec), codec.group, 1, kst.reshape(len(bodies) * h, nbm, ncls)


def _joined(parts: list) -> Packed:
    out = parts[0]
    for p in parts[1:]:
        out = out.cat(p)
    return out


def fused_attend_many(q: torch.Tensor, dense_k: np.ndarray, dense_v: np.ndarray, dense_n: np.ndarray,
                      bodies: list, splits: int = 4, cap: float = 0.0) -> torch.Tensor:
    """One call for the decode tokens of many sequences, each with its own IntBody of the same codecs
    and block (a server's batch): q (B, H, R, d) float32 scaled, dense_k / dense_v (B, H, n_dense, d)
    float32 padded to the longest, dense_n (B,) int64 each one's dense tokens (all visible); the bodies
    and stages are padded here to the longest. The kernel reads each sequence's own tiles, stage and dense
    tokens, with split edges from its own length, so its output is what `fused_attend` gives it alone, bit
    for bit."""
    b, h, r, d = q.shape
    one = bodies[0]
    n = np.array([x.body_tokens for x in bodies], dtype=np.int64)
    n_max = int(n.max())
    staged = _stage_operands(q, [x.stage[:2] if x.stage is not None else None for x in bodies],
                             next((x.stage[2] for x in bodies if x.stage is not None), None), one.value_codec)
    ns = staged[1]
    recent = _window_operands(q, [x.window[:2] if x.window is not None else None for x in bodies],
                              next((x.window[2] for x in bodies if x.window is not None), None))
    nw = recent[1]
    vis = np.concatenate([np.arange(n_max)[None, :] < n[:, None], np.arange(int(ns.max()))[None, :] < ns[:, None],
                          np.arange(int(nw.max()))[None, :] < nw[:, None]], axis=1)
    if isinstance(one.key_codec, CodedJointKeys):
        kc, kp, ktg, kgroups, kst = _padded_streams(one.key_codec, [x.key_parts for x in bodies], n_max)
    else:
        (kc, kp, ktg, kgroups), kst = _padded(one.key_codec, [x.key_parts for x in bodies], n_max), None
    vc, vp, _, vgroups = _padded(one.value_codec, [x.value_parts for x in bodies], n_max)
    qb, qt = _key_queries(q, one.key_codec)
    vrot = rotation(d, one.value_codec.seed).numpy() if one.value_codec.rotate else _NO_ROTATION
    out = np.empty((b, h, r, d), dtype=np.float32)
    dense_vis = np.ones((b, 1, dense_k.shape[2]), dtype=np.uint8)
    _fused(q.contiguous().numpy(), qb.contiguous().numpy(), qt, vis.view(np.uint8), n, dense_k, dense_v,
           dense_vis, dense_n, kc, kp, ktg, kgroups, one.key_codec.bits, vc, vp, vgroups,
           one.value_codec.bits, one.block, splits, vrot, np.float32(cap), *_luts(one.key_codec, one.value_codec),
           _classes(one.key_codec), *_streams(one.key_codec, kst), n_max, *staged, n_max + int(ns.max()), *recent,
           workers(b * h * (splits + _LIGHT)), out, _NO_LSE)
    return torch.from_numpy(out)


@dataclass
class IntBody:
    """A CompressedLayer's integer-coded body, read in place by the kernel (attention/split.py): the
    keys' and the values' bodies each as parts laid end to end (a store's `body_parts()`: blocks
    shared with other sequences, then its own). The batched call (a server's decode step) reads the
    parts where they are, as it copies every sequence's body into one padded array anyway; a call
    over one sequence reads one body, joined here per call when there are several parts.
    stage: None, or (keys, values, key codec) of the block still filling after the body: per-token
    codes (the keys in their stage codec, the values in theirs) that both kernels read in place
    (decoding them into the dense tokens every step cost a 15-sequence server step about a sixth of
    its time on the CPU). Its tokens count in `num_tokens`, after the body's.
    window: None, or (keys, values, codec) of a coded recent window after the stage (core/store.py's
    `code_window`), read in place likewise (decoding it every step cost `auto-6x` 8% of its decode speed at 8k);
    its tokens count after the stage's."""

    key_parts: list
    value_parts: list
    key_codec: IntQuant
    value_codec: IntQuant
    block: int  # the cache block: the kernel's tile
    stage: tuple | None = None
    window: tuple | None = None
    scored: bool = False  # keep each query row's log-sum-exp of the last `attend` in `lse` (families/mixed)
    lse: torch.Tensor | None = None
    name = "int"

    @property
    def body_tokens(self) -> int:
        return sum(p.num_tokens for p in self.key_parts)

    @property
    def num_tokens(self) -> int:
        return (self.body_tokens + (self.stage[0].num_tokens if self.stage is not None else 0)
                + (self.window[0].num_tokens if self.window is not None else 0))

    @property
    def keys(self) -> Packed:
        return _joined(self.key_parts)

    @property
    def values(self) -> Packed:
        return _joined(self.value_parts)

    def attend(self, q, vis, dense_k, dense_v, dense_vis, splits, cap=0.0):
        if triton_for(q):
            if isinstance(self.key_codec, JointKeys):
                raise KvshrinkError("the Triton kernel does not read joint-basis keys: use attend=decode on CUDA")
            if isinstance(self.value_codec, VectorQuant):
                raise KvshrinkError("the Triton kernel does not read vector-level values: use attend=decode on CUDA")
            out = gpu.fused_attend(q, vis, dense_k, dense_v, dense_vis, self.keys, self.values, self.key_codec,
                                   self.value_codec, splits, cap, self.stage, self.window, self.scored)
            out, self.lse = out if self.scored else (out, None)
            return out
        lse = np.empty(q.shape[:3], dtype=np.float32) if self.scored else None
        out = fused_attend(q, vis, dense_k, dense_v, dense_vis, self.keys, self.values, self.key_codec,
                           self.value_codec, self.block, splits, cap, self.stage, self.window, lse)
        self.lse = None if lse is None else torch.from_numpy(lse)
        return out

    def batch_key(self) -> tuple:
        """Bodies with equal keys are read by one `attend_many` call (a stage's codec follows from the
        key codec: core/layer.py's stage rule)."""
        joint = id(self.key_codec) if isinstance(self.key_codec, JointKeys) else None  # its own basis
        book = id(self.value_codec.book) if isinstance(self.value_codec, VectorQuant) else None  # its own codebook
        window = self.window[2] if self.window is not None else None
        return tuple(None if c is None else (c.bits, c.axis, c.group, c.rotate, c.seed, c.levels, c.derope, c.scales)
                     for c in (self.key_codec, self.value_codec, window)) + (self.block, joint, book)

    @staticmethod
    def attend_many(bodies, q, dense_k, dense_v, dense_n, splits, cap=0.0):
        return fused_attend_many(q, dense_k, dense_v, dense_n, bodies, splits, cap)

    def decoded(self):
        ks, vs = [self.key_codec.decode(self.keys)], [self.value_codec.decode(self.values)]
        if self.stage is not None:
            sk, sv, codec = self.stage
            ks.append(codec.decode(sk))
            vs.append(self.value_codec.decode(sv))
        if self.window is not None:
            wk, wv, codec = self.window
            ks.append(codec.decode(wk))
            vs.append(codec.decode(wv))
        return torch.cat(ks, 2), torch.cat(vs, 2)
