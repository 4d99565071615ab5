"""Decode attention for ZDC caches (low rank, alone or with int codes) that reads the stored
coordinates in place, compiled with numba.

A ZdcCache keeps each KV head's body at its own widths: r_k key and r_v value
coordinates per token (float16, or int codes in the KIVI layout). The query is
mapped once into the key basis' dual coordinates (module.zdc_qk, as in
families/lowrank/states.py); the kernel takes its first r_k coordinates against each tile
of the body, read straight from the float16 bits or unpacked from the int codes,
and folds the weighted values into the first r_v coordinates of an online-softmax
accumulator. The dense segments (sink and window at `sink_rank` coordinates, the
float16 tokens of decode steps at r_k / r_v, this call's tokens at head_dim) are
one more split of the same call, each at its own width, and the log-sum-exp merge
ends the call (kernels/tiles.py). The value sums stay in the reduced
coordinates: the folded o_proj maps them back. Nothing is widened to head_dim and
nothing is decoded to float32 beyond one tile per worker.

Heads have different ranks, so a head's codes, scales and minimums are passed as
tuples of arrays, one per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from ...attention.masks import bool_mask
from ...codecs.base import Codec, Fp16, Packed
from ...codecs.quant import IntQuant
from ...kernels.backend import TRITON, triton_for
from ...kernels.tiles import (
    FAST,
    HALF,
    accumulate,
    announce,
    as_u8,
    channel_logits,
    dots,
    fold_values,
    half_to_float,
    halves,
    log_sum,
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
def _fold_dense(q1, keys, values, vt, m, lsum, acc, lr, kk, cap):
    """One query row over float keys (n, w) and values (n, wv) of one dense segment: returns the
    new (max, sum); acc (head_dim,) is rescaled whole, the values land in its first wv entries."""
    n, w = keys.shape
    if n == 0:
        return m, lsum
    wv = values.shape[1]
    dots(q1[:w], keys.ravel(), n, np.float32(0.0), lr)
    mx, corr, t = weights(lr, vt, n, m, kk, cap)
    if mx == -np.inf:
        return m, lsum
    for c in range(acc.shape[0]):
        acc[c] *= corr
    if wv:
        accumulate(acc[:wv], lr, values.ravel(), n, wv)
    return mx, lsum * corr + t


@numba.njit(cache=True, fastmath=FAST)
def _dense(q, vis, t, offs, sink_k, sink_v, mid_k, mid_v, win_k, win_v, new_k, new_v, cap, pm, pl, pacc):
    """The dense split of one (sequence, head): sink, the float16 tokens between body and window,
    window (float16 bytes, each read once into floats) and this call's tokens (float32), in that
    order; offs: where each starts in the visibility row."""
    keys = (halves(sink_k), halves(mid_k), halves(win_k), new_k)
    values = (halves(sink_v), halves(mid_v), halves(win_v), new_v)
    nmax = 1
    for s in range(4):
        nmax = max(nmax, keys[s].shape[0])
    lr = np.empty(nmax, dtype=np.float32)
    kk = np.empty(nmax, dtype=np.int32)
    for r in range(q.shape[0]):
        vrow = vis[r % t]
        m, lsum = -np.inf, np.float32(0.0)
        for s in range(4):
            m, lsum = _fold_dense(q[r], keys[s], values[s], vrow[offs[s]:], m, lsum, pacc[r], lr, kk, cap)
        pm[r], pl[r] = m, lsum


@numba.njit(cache=True, fastmath=FAST)
def _body_tiles(q, vis, t, kc, vc, kmn, kstep, vmn, vstep, kd, vd, kbits, vbits, kb, tile, n, lo, hi, cap, pm, pl,
                pacc):
    """Tiles lo..hi of one (sequence, head)'s coded body for its query rows q (R, head_dim); kc / vc
    its codes (float16 bytes when kbits is HALF), kmn / kstep (blocks, 2 kd) and vmn / vstep
    (n, 2 groups) the float16 bytes of its int minimums and steps; vis (t, n) from the body's start."""
    nr = q.shape[0]
    krow = kc.shape[0] // n
    vrow = vc.shape[0] // n
    half = kbits == HALF
    vgroups = max(vmn.shape[1] // 2, 1)
    nkb = (tile + kb - 1) // kb + 1
    ksym = np.empty(tile * kd, dtype=np.uint8)
    vsym = np.empty(tile * vd, dtype=np.uint8)
    kf = np.empty(tile * kd, dtype=np.float32)
    vf = np.empty(tile * vd, dtype=np.float32)
    kst = np.empty((nkb, kd), dtype=np.float32)
    kmf = np.empty((nkb, kd), dtype=np.float32)
    vst = np.empty((tile, vgroups), dtype=np.float32)
    vmf = np.empty((tile, vgroups), dtype=np.float32)
    lg = np.empty((nr, tile), dtype=np.float32)
    kk = np.empty(tile, dtype=np.int32)
    wt = np.empty(tile, dtype=np.float32)
    qs = np.empty(max(kd, 1), dtype=np.float32)
    accb = np.zeros((nr, vgroups), dtype=np.float32)
    m = np.full(nr, -np.inf, dtype=np.float32)
    lsum = np.zeros(nr, dtype=np.float32)
    vsb, vmb = vstep.reshape(-1), vmn.reshape(-1)
    for j in range(lo, hi):
        t0 = j * tile
        cnt = min(tile, n - t0)
        b0 = t0 // kb
        nb = (t0 + cnt - 1) // kb - b0 + 1
        if half:
            half_to_float(kc[t0 * krow:], cnt * kd, kf)
            half_to_float(vc[t0 * vrow:], cnt * vd, vf)
        else:
            unpack_codes(kc[t0 * krow:], cnt * kd, kbits, ksym)
            unpack_codes(vc[t0 * vrow:], cnt * vd, vbits, vsym)
            for i in range(nb):  # the scales this tile uses, as floats
                half_to_float(kstep[b0 + i], kd, kst[i])
                half_to_float(kmn[b0 + i], kd, kmf[i])
            half_to_float(vsb[t0 * 2 * vgroups:], cnt * vgroups, vst.reshape(-1))
            half_to_float(vmb[t0 * 2 * vgroups:], cnt * vgroups, vmf.reshape(-1))
        for r in range(nr):
            q1 = q[r, :kd]
            lr = lg[r]
            acc = pacc[r, :vd]
            if half:
                dots(q1, kf, cnt, np.float32(0.0), lr)
            else:
                for i in range(nb):
                    a = max(t0, (b0 + i) * kb) - t0
                    z = min(t0 + cnt, (b0 + i + 1) * kb) - t0
                    channel_logits(q1, kst[i], kmf[i], ksym[a * kd:], z - a, qs, lr[a:])
            mx, corr, s = weights(lr, vis[r % t, t0:], cnt, m[r], kk, cap)
            if mx == -np.inf:
                continue
            m[r] = mx
            lsum[r] = lsum[r] * corr + s
            if half:
                for c in range(vd):
                    acc[c] *= corr
                accumulate(acc, lr, vf, cnt, vd)
            else:
                fold_values(acc, accb[r], wt, lr, vsym, vst, vmf, cnt, corr)
    vw = vd // vgroups
    for r in range(nr):
        pm[r] = m[r]
        pl[r] = lsum[r]
        if not half:
            for c in range(vd):
                pacc[r, c] += accb[r, c // vw]


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _fused(q, vis, offs, sinks_k, sinks_v, mids_k, mids_v, wins_k, wins_v, new, kcs, vcs, kmns, ksteps, vmns, vsteps,
           kbits, vbits, kb, tile, n, splits, cap, nw, out, lse):
    nb_, nh, nr, d = q.shape
    t = vis.shape[1]
    new_k, new_v = new
    ntiles = (n + tile - 1) // tile
    pm, pl, pacc = partial_buffers(nb_, nh, splits + 1, nr, d)
    items = nb_ * nh * (splits + 1)
    for w in numba.prange(nw):
        for i in range(w, items, nw):  # tiles.split_item's order: the body's ranges first, shared evenly
            b, h, sp = split_item(i, nb_, nh, splits, splits + 1)
            if sp == splits:
                _dense(q[b, h], vis[b], t, offs, sinks_k[h][b], sinks_v[h][b], mids_k[h][b], mids_v[h][b], wins_k[h][b],
                       wins_v[h][b], new_k[b, h], new_v[b, h], cap, pm[b, h, sp], pl[b, h, sp], pacc[b, h, sp])
                continue
            lo = sp * ntiles // splits
            hi = (sp + 1) * ntiles // splits
            if lo < hi:
                kd, vd = mids_k[h].shape[2] // 2, mids_v[h].shape[2] // 2
                _body_tiles(q[b, h], vis[b, :, offs[0] + sinks_k[h].shape[1]:], t, kcs[h][b], vcs[h][b], kmns[h][b],
                            ksteps[h][b], vmns[h][b], vsteps[h][b], kd, vd, kbits, vbits, kb, tile, n, lo, hi, cap,
                            pm[b, h, sp], pl[b, h, sp], pacc[b, h, sp])
    merge(pm, pl, pacc, out)
    if lse.shape[0]:  # each row's log-sum-exp, for a caller that scores tokens outside the kernel
        log_sum(pm, pl, lse)


def supported(key_codec: Codec, value_codec: Codec, block: int, ranks_k, ranks_v) -> bool:
    """Bodies the kernel reads: float16 keys and values, or int keys per channel over the block with
    int values per token (one group per token, or groups dividing every value rank), every rank a
    whole number of bytes of codes (so a tile unpacks in one flat pass)."""
    if isinstance(key_codec, Fp16) and isinstance(value_codec, Fp16):
        return True
    if not (isinstance(key_codec, IntQuant) and isinstance(value_codec, IntQuant)):
        return False
    if key_codec.rotate or value_codec.rotate or key_codec.axis != "channel" or value_codec.axis != "token":
        return False
    if not (key_codec.uniform and value_codec.uniform):  # the kernel reads codes as their integers
        return False
    if key_codec.derope:  # one query per key: no per-offset queries here
        return False
    if block % key_codec.group:
        return False
    g = value_codec.group
    return (all(r * key_codec.bits % 8 == 0 for r in ranks_k)
            and all(r * value_codec.bits % 8 == 0 and (g is None or r % g == 0) for r in ranks_v))


def _bytes(x: torch.Tensor) -> np.ndarray:
    """The bytes of a float16 tensor as uint8 (..., 2 * last), no copy when contiguous."""
    return x.contiguous().view(torch.uint8).numpy()


def _views(codec: Codec, packed: Packed):
    """(codes, min, step) of one head's body as the kernel reads them: bytes (B, n * row bytes), and
    the float16 bytes of the int minimums / steps (B, n // tg, 2 * params), empty for float16. Views
    of the packed tensors, no copies, built once per Packed (a grown body is a new Packed)."""
    views = getattr(packed, "_kernel_views", None)
    if views is None:
        b = next(iter(packed.tensors.values())).shape[0]
        if isinstance(codec, Fp16):
            none = np.empty((b, 0, 0), dtype=np.uint8)
            views = (_bytes(packed.tensors["x"]).reshape(b, -1), none, none)
        else:
            t = packed.tensors
            rows = packed.num_tokens // (codec.group if codec.axis == "channel" else 1)
            views = (t["codes"].reshape(b, -1).numpy(), _bytes(t["min"]).reshape(b, rows, -1),
                     _bytes(t["scale"]).reshape(b, rows, -1))
        packed._kernel_views = views
    return views


def _bits(codec: Codec) -> int:
    return HALF if isinstance(codec, Fp16) else codec.bits


@dataclass
class LowRankStates:
    """What a ZdcLayer hands the attention for a decode step the kernel reads (see the module doc).

    Per head (keys, values): sinks and windows (B, n, sink_rank) float16; mids (B, n, r_k) and
    (B, n, r_v) float16, the tokens between body and window; bodies Packed, or None when the body
    is empty. new: this call's (keys, values) (B, H, t, head_dim) float32 in the reduced bases."""

    sinks: list
    bodies: list | None
    mids: list
    windows: list
    new: tuple
    key_codec: Codec
    value_codec: Codec
    block: int
    splits: int = 4
    scored: bool = False  # keep each query row's log-sum-exp (`lse`, (B, H, R)) and the query `q` after `attend`
    lse: torch.Tensor | None = None
    q: torch.Tensor | None = None  # (B, H, R, head_dim) in the keys' dual coordinates, scaled

    @property
    def length(self) -> int:
        n_body = self.bodies[0][0].num_tokens if self.bodies else 0
        return (self.sinks[0][0].shape[1] + n_body + self.mids[0][0].shape[1] + self.windows[0][0].shape[1]
                + self.new[0].shape[2])

    def attend(self, module, query: torch.Tensor, mask, scaling=None, softcap=None):
        announce("low-rank")
        b, hq, t, d = query.shape
        h = len(self.mids)
        g = hq // h
        s = self.length
        scale = scaling if scaling is not None else d ** -0.5
        q = torch.matmul(query.float().reshape(b, h, g * t, d), module.zdc_qk.float()).mul_(scale)
        if self.scored:
            self.q = q
        vis = bool_mask(mask)
        if vis is None:
            vis = torch.ones(b, t, s, dtype=torch.bool, device=query.device).tril_(s - t)
        else:
            vis = vis[:, 0, :, -s:].expand(b, t, s)
        out = attend(q, vis, self, softcap or 0.0)
        return out.view(b, h, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hq, d).to(query.dtype), None


def attend(q: torch.Tensor, vis: torch.Tensor, st: LowRankStates, cap: float = 0.0) -> torch.Tensor:
    """q (B, H, R, head_dim) float32 in the keys' dual coordinates, already scaled (rows in
    (group, token) order); vis (B, t, S) bool over sink, body, mids, window, this call's tokens
    -> (B, H, R, head_dim) float32, the value sums in the values' reduced coordinates; cap: the
    logits' soft-cap (0: none)."""
    if triton_for(q):
        out = gpu.attend(q, vis, st, cap)
        if st.scored:
            out, st.lse = out
        return out
    b, h, r, d = q.shape
    n = st.bodies[0][0].num_tokens if st.bodies else 0
    n_sink, n_mid = st.sinks[0][0].shape[1], st.mids[0][0].shape[1]
    offs = np.array([0, n_sink + n, n_sink + n + n_mid, n_sink + n + n_mid + st.windows[0][0].shape[1]],
                    dtype=np.int64)
    if st.bodies:
        ko = [_views(st.key_codec, bk) for bk, _ in st.bodies]
        vo = [_views(st.value_codec, bv) for _, bv in st.bodies]
    else:
        ko = vo = [(np.empty((b, 0), dtype=np.uint8), np.empty((b, 0, 0), dtype=np.uint8),
                    np.empty((b, 0, 0), dtype=np.uint8))] * h
    kb = st.key_codec.group if isinstance(st.key_codec, IntQuant) else 1
    splits = max(1, min(st.splits, -(-n // st.block))) if n else 1
    out = np.empty((b, h, r, d), dtype=np.float32)
    lse = np.empty((b, h, r) if st.scored else (0, 0, 0), dtype=np.float32)
    _fused(q.contiguous().numpy(), as_u8(vis), offs, *(_heads(_bytes(p[i]) for p in parts)
                                                       for parts in (st.sinks, st.mids, st.windows) for i in (0, 1)),
           (st.new[0].float().contiguous().numpy(), st.new[1].float().contiguous().numpy()),
           _heads(o[0] for o in ko), _heads(o[0] for o in vo), _heads(o[1] for o in ko), _heads(o[2] for o in ko),
           _heads(o[1] for o in vo), _heads(o[2] for o in vo), _bits(st.key_codec), _bits(st.value_codec), kb,
           st.block, n, splits, np.float32(cap), workers(b * h * (splits + 1)), out, lse)
    if st.scored:
        st.lse = torch.from_numpy(lse)
    return torch.from_numpy(out)


def _heads(arrays) -> tuple:
    """Per-head arrays (their shapes differ with the heads' ranks) as a tuple padded with its first
    array to 8, 16, 32, ... entries: numba compiles the kernel once per tuple length, so models of 1 to 8
    KV heads share one compile (about 25 s) instead of one each. The padding is never read."""
    t = tuple(arrays)
    size = 8
    while size < len(t):
        size *= 2
    return t + t[:1] * (size - len(t))
