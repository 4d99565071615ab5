"""Triton kernels every family's GPU path shares (imported only where Triton is installed).

They follow the numba kernels (kernels/tiles.py): a program owns one (sequence, KV head) and one
range of tiles (split-K, flash-decoding style), reads each tile's compressed storage where it lies,
dequantizes it in registers and keeps an online softmax; the partials are merged with the dense
tokens' partial in PyTorch (kernels/partials.py). Nothing decoded is written to memory.

`coded_body` reads a body of int codes (KIVI layout: keys per channel over token groups or per
token over channel groups, values per token; any bit width 1-8, codes may straddle bytes), of
float16 numbers (bits 16), or of RVQ codes (per token and channel group, one code per level: the
sum of the levels' codewords times the token's scale), at key and value widths of their own (ZDC's
reduced ranks) below the query's width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..codecs.hadamard import rotation
from ..codecs.levels import levels_on
from ..codecs.spin import angles


@triton.jit
def unpack(base, sym, bits: tl.constexpr, mask):
    """The `bits`-bit codes at flat symbol indices `sym` of a little-endian packed byte run starting
    at `base` (packing.pack's layout), as int32."""
    bit = sym * bits
    byte = bit >> 3
    sh = (bit & 7).to(tl.int32)  # every return int32 (Triton refuses mixed return types; sym may be int64)
    lo = tl.load(base + byte, mask=mask, other=0).to(tl.int32)
    if bits == 8:
        return lo
    if 8 % bits == 0:  # 1, 2, 4 bits: a code never straddles two bytes
        return ((lo >> sh) & ((1 << bits) - 1)).to(tl.int32)
    hi = tl.load(base + byte + 1, mask=mask & (sh + bits > 8), other=0).to(tl.int32)
    return (((lo | (hi << 8)) >> sh) & ((1 << bits) - 1)).to(tl.int32)


@triton.jit
def split_bytes(base, toks, tmask, NB: tl.constexpr, CB: tl.constexpr, bits: tl.constexpr):
    """(N, CB * 8 // bits) int32 codes of tokens `toks` whose NB bytes each start at base + tok * NB (4 or 2
    bits, low bits first): the bytes are loaded as one contiguous tile (vector loads, not a gather per
    code) and split in registers; CB >= NB byte columns, those past NB read as zero codes."""
    bc = tl.arange(0, CB)
    by = tl.load(base + toks[:, None] * NB + bc[None, :], mask=tmask[:, None] & (bc[None, :] < NB), other=0)
    by = by.to(tl.int32)
    if bits == 4:  # (N, CB, 2): [n, c, i] is code 2c + i
        x = tl.join(by & 15, by >> 4)
    else:  # (N, CB, 2, 2): [n, c, i, j] is code 4c + 2i + j
        x = tl.join(tl.join(by & 3, (by >> 4) & 3), tl.join((by >> 2) & 3, by >> 6))
    return tl.reshape(x, (toks.shape[0], CB * 8 // bits))


@triton.jit
def capped(s, cap, CAP: tl.constexpr):
    """Gemma 2's logit soft-cap cap * tanh(s / cap), tanh written with exp."""
    if CAP:
        s = cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))
    return s


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b accumulated in float32, its inputs at `PREC` (`Tuning`): "ieee" float32, "tf32", or "fp16"
    (both cast to float16 for the tensor cores, as flash attention does)."""
    if PREC == "fp16":  # if/else: Triton compiles what follows an early return too
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def online(s, m, l, acc, v, PREC: tl.constexpr):
    """One tile of an online softmax: logits s (R, N) (-inf where not visible), running max m (R,),
    sum l (R,), weighted values acc (R, W), the tile's values v (N, W) float32 -> new (m, l, acc);
    PREC the product's input precision (`Tuning`)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    corr = tl.exp(m - m_safe)
    l = l * corr + tl.sum(p, 1)
    acc = acc * corr[:, None] + mm(p, v, PREC)
    return m_new, l, acc


@triton.jit
def dequant(codes, mn, scale, lut, toks, cols, tmask, c_off, p_off, W: tl.constexpr, BITS: tl.constexpr,
            TG: tl.constexpr, GW: tl.constexpr, DEPTH: tl.constexpr, SIZE: tl.constexpr, LUT: tl.constexpr,
            N: tl.constexpr):
    """(N, C) float32 of tokens `toks` and channels `cols` (< W) of one body: int codes at c_off bytes
    of `codes` with (min, step) rows at p_off of `mn` / `scale`, one per TG tokens and GW channels (with
    LUT, a code stands for its float32 level in `lut`: Gaussian levels, codecs/levels.py);
    float16 numbers (BITS 16) at c_off elements; or, with DEPTH levels, RVQ codes (GW channels a
    group, the codebooks (DEPTH, SIZE, GW) float16 at `mn`, one scale per token at p_off); tmask the
    tokens that exist, N the tile's tokens."""
    ok = tmask[:, None] & (cols[None, :] < W)
    if DEPTH > 0:
        ncode = (W // GW) * DEPTH
        x = tl.zeros(ok.shape, tl.float32)
        for lv in tl.static_range(DEPTH):
            c = unpack(codes + c_off, toks[:, None] * ncode + (cols[None, :] // GW) * DEPTH + lv, BITS, ok)
            x += tl.load(mn + (lv * SIZE + c) * GW + cols[None, :] % GW, mask=ok, other=0.0).to(tl.float32)
        return x * tl.load(scale + p_off + toks[:, None], mask=ok, other=0.0).to(tl.float32)
    sym = toks[:, None] * W + cols[None, :]
    if BITS == 16:
        return tl.load(codes + c_off + sym, mask=ok, other=0.0).to(tl.float32)
    if BITS == 8:
        c = tl.load(codes + c_off + sym, mask=ok, other=0).to(tl.int32)
    elif (BITS == 4 or BITS == 2) and W % (8 // BITS) == 0:  # whole bytes per token: load them, split in registers
        c = split_bytes(codes + c_off, toks, tmask, W * BITS // 8, cols.shape[0] * BITS // 8, BITS)
    else:
        c = unpack(codes + c_off, sym, BITS, ok)
    if LUT:
        c = tl.load(lut + c, mask=ok, other=0.0)
    else:
        c = c.to(tl.float32)
    # the (min, step) numbers loaded once per distinct one, not per code
    if TG % N == 0:  # one row for the whole tile (keys per channel over token groups)
        p = p_off + (tl.min(toks) // TG) * (W // GW) + cols[None, :] // GW
        pok = cols[None, :] < W
    elif GW >= W:  # one per token (values per token over the whole head vector)
        p = p_off + toks[:, None] // TG
        pok = tmask[:, None]
    else:
        p = p_off + (toks[:, None] // TG) * (W // GW) + cols[None, :] // GW
        pok = ok
    x = tl.load(mn + p, mask=pok, other=0.0).to(tl.float32) + tl.load(scale + p, mask=pok, other=0.0).to(
        tl.float32) * c
    return tl.where(ok, x, 0.0)


@triton.jit
def _coded_body(q, vis, nbody, kc, kmn, ksc, klut, vc, vmn, vsc, vlut, ka, kb, kcos, ksin, pm, pl, pacc, H, R, T, vis_b,
                vis_t, kc_s, kp_s, vc_s, vp_s, cap, SPLITS, TURN: tl.constexpr, KBITS: tl.constexpr,
                VBITS: tl.constexpr, KTG: tl.constexpr, KGW: tl.constexpr, VGW: tl.constexpr, KDEPTH: tl.constexpr,
                VDEPTH: tl.constexpr, KSIZE: tl.constexpr, VSIZE: tl.constexpr, KLUT: tl.constexpr, VLUT: tl.constexpr,
                QD: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr,
                BLOCK_KD: tl.constexpr, BLOCK_VD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                CAP: tl.constexpr, PREC: tl.constexpr):
    # SPLITS is a run-time number: as a compile-time constant every new split count (it grows with the context until
    # the device is full) compiled the kernel again
    bh = tl.program_id(0).to(tl.int64)  # offsets past 2 GiB (long contexts, big batches)
    sp = tl.program_id(1)
    b = bh // H
    n = tl.load(nbody + b).to(tl.int32)  # token indices in int32; byte offsets (bh * strides) stay int64
    rows = tl.arange(0, BLOCK_R)
    kcols = tl.arange(0, BLOCK_KD)
    vcols = tl.arange(0, BLOCK_VD)
    qrow = tl.load(q + (bh * R + rows[:, None]) * QD + kcols[None, :], mask=(rows[:, None] < R) & (kcols[None, :] < KD),
                   other=0.0)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_VD), tl.float32)
    if TURN:  # keys turned back within groups (codecs/spin.py): k = (x A) * cos_j + (x B) * sin_j
        sq = (kcols[:, None] < KD) & (kcols[None, :] < KD)
        turn_a = tl.load(ka + kcols[:, None] * KD + kcols[None, :], mask=sq, other=0.0)
        turn_b = tl.load(kb + kcols[:, None] * KD + kcols[None, :], mask=sq, other=0.0)
    nt = tl.cdiv(n, BLOCK_N)
    used = tl.maximum(1, tl.minimum(SPLITS, nt))
    lo = sp * nt // used
    hi = tl.where(sp < used, (sp + 1) * nt // used, lo)
    for j in range(lo, hi):
        toks = j * BLOCK_N + tl.arange(0, BLOCK_N)
        tmask = toks < n
        k = dequant(kc, kmn, ksc, klut, toks, kcols, tmask, bh * kc_s, bh * kp_s,
                    KD, KBITS, KTG, KGW, KDEPTH, KSIZE, KLUT, BLOCK_N)
        if TURN:
            at = (toks % KTG)[:, None] * KD + kcols[None, :]
            tok = tmask[:, None] & (kcols[None, :] < KD)
            k = (mm(k, turn_a, PREC) * tl.load(kcos + at, mask=tok, other=0.0)
                 + mm(k, turn_b, PREC) * tl.load(ksin + at, mask=tok, other=0.0))
        s = capped(mm(qrow, tl.trans(k), PREC), cap, CAP)
        seen = tl.load(vis + b * vis_b + (rows % T)[:, None] * vis_t + toks[None, :],
                       mask=(rows[:, None] < R) & tmask[None, :], other=0) != 0
        s = tl.where(seen, s, float("-inf"))
        v = dequant(vc, vmn, vsc, vlut, toks, vcols, tmask, bh * vc_s, bh * vp_s,
                    VD, VBITS, 1, VGW, VDEPTH, VSIZE, VLUT, BLOCK_N)
        m, l, acc = online(s, m, l, acc, v, PREC)
    u = bh * (SPLITS + 1) + sp
    rmask = rows < R
    tl.store(pm + u * R + rows, m, mask=rmask)
    tl.store(pl + u * R + rows, l, mask=rmask)
    tl.store(pacc + (u * R + rows[:, None]) * QD + vcols[None, :], acc, mask=rmask[:, None] & (vcols[None, :] < VD))


@dataclass
class Tuning:
    """How the kernels are launched, chosen from timings on an H200 (docs/gpu.md;
    `scripts/gpu_bench.py --precision --warps` sweeps the first two):

    - `precision` of the products' inputs: "fp16" (float16 tensor-core inputs, float32 sums, as flash
      attention does; within float16 rounding of the exact result), "tf32", or "ieee" (float32 on FMA
      units, what the numba kernels compute; 6-7x slower on an H200);
    - `num_warps` per program, `tile` tokens per tile of the coded body on a GPU (`cpu_tile` in Triton's
      interpreter, where each step of the tile loop costs Python time: 64 takes a third less time in
      the CPU tests), and `programs_per_sm`, the split-K target: programs per multiprocessor
      (`splits_for`)."""

    precision: str = "fp16"
    num_warps: int = 4
    tile: int = 32
    cpu_tile: int = 64
    programs_per_sm: int = 8


TUNING = Tuning()


@functools.lru_cache(maxsize=8)
def sms(device: torch.device) -> int:
    """The device's streaming multiprocessors: how many programs keep it busy."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(splits: int, device: torch.device, rows: int, tiles: int) -> int:
    """Programs per (sequence, KV head) over `rows` of them: at least `splits`, on CUDA enough to give the
    device `TUNING.programs_per_sm` programs per multiprocessor (long contexts at small batch split
    further), at most one per tile."""
    if device.type == "cuda":
        splits = max(splits, -(-TUNING.programs_per_sm * sms(device) // rows))
    return max(1, min(splits, tiles))


@dataclass
class Body:
    """One side (keys or values) of a coded body as `coded_body` reads it: codes (B * H, bytes) uint8,
    or (B * H, n * width) float16 when bits is 16; min / scale (B * H, rows * params) in their stored
    dtype (unused for float16); width: numbers per token; tg: tokens per (min, step) row; gw:
    channels per (min, step) number; lut: the float32 level of each code where the levels are not the
    integers (None: they are). RVQ (depth > 0): min holds the codebooks (depth, size, gw), scale one
    number per token, gw the channels of a group."""

    codes: torch.Tensor
    min: torch.Tensor
    scale: torch.Tensor
    bits: int
    width: int
    tg: int = 1
    gw: int = 1
    depth: int = 0
    size: int = 0
    lut: torch.Tensor | None = None
    turn: tuple | None = None  # turned keys: (A, B, cos, sin), `turn_operands`


@functools.lru_cache(maxsize=16)
def turn_operands(freqs: tuple, group: int, width: int, seed: int | None, device: torch.device) -> tuple:
    """(A, B (width, width), cos, sin (group, width)) float32 with x A * cos[j] + x B * sin[j] the key at
    offset j of a group from its stored row x (codecs/spin.py's turn forward, after undoing the
    Hadamard rotation of `seed`; None: no rotation): A = R^T, B = R^T P, P the pair swap (a, b) -> (-b, a)."""
    n = len(freqs)
    a = rotation(width, seed).T.contiguous() if seed is not None else torch.eye(width)
    p = torch.zeros(width, width)
    p[torch.arange(n) + n, torch.arange(n)] = -1.0
    p[torch.arange(n), torch.arange(n) + n] = 1.0
    cos, sin = angles(freqs, group, torch.device("cpu"))
    c = torch.ones(group, width)
    sn = torch.zeros(group, width)
    c[:, :n], c[:, n:2 * n], sn[:, :n], sn[:, n:2 * n] = cos, cos, sin, sin
    return tuple(t.contiguous().to(device) for t in (a, a @ p, c, sn))


def int_body(codec, tensors: dict, rows: int, width: int) -> Body:
    """An IntQuant body's "codes", "min" and "scale" as the kernel reads them: `rows` rows (one per
    sequence and head), `width` numbers per token (views; a copy only if not contiguous)."""
    tg, gw = (codec.group, 1) if codec.axis == "channel" else (1, codec.group or width)
    dev = tensors["codes"].device
    lut = None if codec.uniform else levels_on(codec.levels, codec.bits, dev)
    turn = (turn_operands(codec.derope, codec.group, width, codec.seed if codec.rotate else None, dev)
            if getattr(codec, "derope", ()) else None)
    # 8-bit scales (codecs/scales.py) are decoded to float32 rows first: a few numbers per token
    mn, sc = codec.params(tensors) if codec.scales != "fp16" else (tensors["min"], tensors["scale"])
    return Body(tensors["codes"].reshape(rows, -1), mn.reshape(rows, -1), sc.reshape(rows, -1), codec.bits, width,
                tg, gw, lut=lut, turn=turn)


def block(width: int) -> int:
    """Columns a tile holds for `width` numbers: a power of two, and at least 16, the least inner size
    `tl.dot` takes on a GPU (ZDC ranks can be lower; the interpreter takes any)."""
    return max(16, triton.next_power_of_2(width))


def _lut(body: Body) -> torch.Tensor:
    return body.lut if body.lut is not None else body.scale  # unread without LUT: any pointer will do


def coded_body(q: torch.Tensor, vis: torch.Tensor, nbody: torch.Tensor, keys: Body, values: Body, splits: int,
               cap: float = 0.0):
    """Partials of query rows q (B, H, R, QD) float32 (scaled; the first keys.width coordinates are
    used) over the bodies' tokens: vis (B, T, n_max) bool, query row r seeing what token r % T sees;
    nbody (B,) int64 each sequence's own body tokens (its split edges follow them). Returns m, l
    (B, H, splits + 1, R) and acc (B, H, splits + 1, R, QD), the last slot left for the dense
    partial; acc holds the value sums in its first values.width coordinates, zeros after."""
    b, h, r, qd = q.shape
    dev = q.device
    n_max = vis.shape[2]
    tile = TUNING.tile if dev.type == "cuda" else TUNING.cpu_tile
    splits = splits_for(splits, dev, b * h, -(-n_max // tile))
    pm = torch.empty(b * h, splits + 1, r, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.zeros(b * h, splits + 1, r, qd, device=dev)
    q = q.float().contiguous()
    vis8 = vis.to(torch.uint8).contiguous()
    turn = keys.turn or (keys.scale,) * 4  # unread without TURN: any pointer will do
    _coded_body[(b * h, splits)](q, vis8, nbody, keys.codes, keys.min, keys.scale, _lut(keys), values.codes,
                                 values.min, values.scale, _lut(values), *turn, pm, pl, pacc, h, r, vis.shape[1],
                                 vis8.stride(0), vis8.stride(1), keys.codes.stride(0), keys.scale.stride(0),
                                 values.codes.stride(0), values.scale.stride(0), float(cap), splits,
                                 TURN=keys.turn is not None, KBITS=keys.bits, VBITS=values.bits, KTG=keys.tg,
                                 KGW=keys.gw, VGW=values.gw, KDEPTH=keys.depth, VDEPTH=values.depth,
                                 KSIZE=keys.size, VSIZE=values.size, KLUT=keys.lut is not None,
                                 VLUT=values.lut is not None, QD=qd, KD=keys.width,
                                 VD=values.width,
                                 BLOCK_KD=block(keys.width), BLOCK_VD=block(values.width),
                                 BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_N=tile, CAP=bool(cap),
                                 PREC=TUNING.precision, num_warps=TUNING.num_warps)
    return tuple(x.view(b, h, splits + 1, *x.shape[2:]) for x in (pm, pl, pacc))
