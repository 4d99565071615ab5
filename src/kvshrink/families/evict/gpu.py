"""The paged rows' decode attention as Triton kernels (CUDA; the interpreter on a CPU).

As the numba kernel (kernel.py) does, each (sequence, KV head) walks its own block table and reads
every kept row where it lies in the pool, float16 or per-token int codes (any bit width, one
float16 step and minimum per channel group), dequantized in registers. Eviction scores need every
row's softmax weight, so the step is two kernels around one softmax in PyTorch over the logits
(a head's logits are a few KB, its rows far more): `_logits` writes q . k for every kept row,
`_values` sums the weighted rows. This call's token is exact (float32) and comes last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...codecs.base import Codec, Fp16
from ...codecs.hadamard import rotation_on
from ...kernels.backend import CALLS
from ...kernels.gpu import TUNING, block, mm, sms, unpack

TILE = 64


@triton.jit
def _row_tile(codes, scale, mn, slot, ok, cols, row_bytes, groups, BITS: tl.constexpr, D: tl.constexpr,
              GW: tl.constexpr):
    """(N, BLOCK_D) float32 rows at pool slots `slot` (N,): float16 (BITS 16) or int codes."""
    if BITS == 16:
        return tl.load(codes + slot[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    sym = cols[None, :] + slot[:, None] * 0
    c = unpack(codes + slot[:, None] * row_bytes, sym, BITS, ok).to(tl.float32)
    p = slot[:, None] * groups + cols[None, :] // GW
    return tl.load(mn + p, mask=ok, other=0.0).to(tl.float32) + tl.load(scale + p, mask=ok, other=0.0).to(
        tl.float32) * c


@triton.jit
def _slots(table, n_past, u, j0, W, block, BLOCK_N: tl.constexpr):
    """(rows, kept, pool slot) of rows j0.. of program u = b * H + h, through its block table."""
    rows = j0 + tl.arange(0, BLOCK_N)
    kept = rows < tl.load(n_past + u)
    slot = tl.load(table + u * W + rows // block, mask=kept, other=0) * block + rows % block
    return rows, kept, slot


@triton.jit
def _logits(q, table, n_past, pos, seen, kc, ks, km, logits, H, G, W, S, seen_stride, block, row_bytes, groups,
            BITS: tl.constexpr, MASKED: tl.constexpr, D: tl.constexpr, GW: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)  # offsets past 2 GiB (long contexts, big batches)
    j0 = tl.program_id(1) * BLOCK_N
    gs = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    qg = tl.load(q + (u * G + gs[:, None]) * D + cols[None, :], mask=(gs[:, None] < G) & cmask[None, :], other=0.0)
    rows, kept, slot = _slots(table, n_past, u, j0, W, block, BLOCK_N)
    vis = kept
    if MASKED:  # a kept row is visible as its original position is
        p = tl.load(pos + slot, mask=kept, other=0)
        vis = kept & (tl.load(seen + (u // H) * seen_stride + p, mask=kept, other=0) != 0)
    k = _row_tile(kc, ks, km, slot, kept[:, None] & cmask[None, :], cols, row_bytes, groups, BITS, D, GW)
    s = mm(qg, tl.trans(k), PREC)
    s = tl.where(vis[None, :], s, float("-inf"))
    tl.store(logits + (u * G + gs[:, None]) * (S + 1) + rows[None, :], s,
             mask=(gs[:, None] < G) & (rows[None, :] < S))


@triton.jit
def _values(probs, table, n_past, vc, vs, vm, out, H, G, W, S, block, row_bytes, groups, SPLITS, BITS: tl.constexpr,
            D: tl.constexpr, GW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
            BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Weighted value sums of program (u, split)'s range of tiles into out (B * H, SPLITS, G, D)."""
    u = tl.program_id(0).to(tl.int64)  # offsets past 2 GiB (long contexts, big batches)
    sp = tl.program_id(1)
    gs = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    nt = tl.cdiv(tl.load(n_past + u), BLOCK_N)
    for j in range(sp * nt // SPLITS, (sp + 1) * nt // SPLITS):
        rows, kept, slot = _slots(table, n_past, u, j * BLOCK_N, W, block, BLOCK_N)
        v = _row_tile(vc, vs, vm, slot, kept[:, None] & cmask[None, :], cols, row_bytes, groups, BITS, D, GW)
        p = tl.load(probs + (u * G + gs[:, None]) * (S + 1) + rows[None, :],
                    mask=(gs[:, None] < G) & kept[None, :], other=0.0)
        acc += mm(p, v, PREC)
    tl.store(out + ((u * SPLITS + sp) * G + gs[:, None]) * D + cols[None, :], acc,
             mask=(gs[:, None] < G) & cmask[None, :])


def _fields(pool, prefix: str, codec: Codec, slots: int):
    """(bits, rows, steps, minimums, row bytes, groups) of one codec's rows in the pool (views)."""
    st = pool.storage
    if isinstance(codec, Fp16):
        x = st[prefix + "x"].reshape(slots, -1)
        return 16, x, x, x, 0, 1
    codes = st[prefix + "codes"].reshape(slots, -1)
    scale = st[prefix + "scale"].reshape(slots, -1)
    return codec.bits, codes, scale, st[prefix + "min"].reshape(slots, -1), codes.shape[1], scale.shape[1]


def attend(q: torch.Tensor, layer, n_past: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
           seen: torch.Tensor | None):
    """kernel.attend on the tensors' device: -> (out (B, H, G, d), probs (B, H, G, S + 1)) float32."""
    owner = layer.owner
    pool = owner.pool
    kcodec, vcodec = owner.key_codec, owner.value_codec
    b, h, g, d = q.shape
    dev = q.device
    s = int(n_past.max()) if n_past.numel() else 0
    slots = pool.capacity * pool.block
    table = layer.table.contiguous()
    w = table.shape[2]
    n_past = n_past.contiguous()
    qr = q @ rotation_on(d, kcodec.seed, dev) if getattr(kcodec, "rotate", False) else q
    kbits, kc, ks, km, kbytes, kgroups = _fields(pool, "k.", kcodec, slots)
    vbits, vc, vs, vm, vbytes, vgroups = _fields(pool, "v.", vcodec, slots)
    logits = torch.full((b, h, g, s + 1), float("-inf"), device=dev)
    seen8 = seen.to(torch.uint8).contiguous() if seen is not None else n_past
    bd, bg = block(d), max(16, triton.next_power_of_2(g))
    CALLS["paged-row"] += 1
    if s:
        _logits[(b * h, -(-s // TILE))](qr.float().contiguous(), table, n_past, pool.flat("pos"), seen8, kc, ks, km,
                                        logits, h, g, w, s, seen8.stride(0), pool.block, kbytes, kgroups,
                                        BITS=kbits, MASKED=seen is not None, D=d, GW=d // kgroups, BLOCK_D=bd,
                                        BLOCK_G=bg, BLOCK_N=TILE, PREC=TUNING.precision, num_warps=TUNING.num_warps)
    logits[..., s] = (q * new_k.float()[:, :, None]).sum(-1)  # this call's token, exact
    if seen is not None:
        logits[..., s] = logits[..., s].masked_fill(~seen[:, -1, None, None], float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num_(0.0)
    # enough programs to fill a GPU; two elsewhere, so the interpreter tests cover the split sums too
    splits = max(1, min(-(-s // TILE), -(-2 * sms(dev) // (b * h)) if dev.type == "cuda" else 2))
    parts = torch.empty(b, h, splits, g, d, device=dev)  # a head's rows over several programs, summed after
    _values[(b * h, splits)](probs, table, n_past, vc, vs, vm, parts, h, g, w, s, pool.block, vbytes, vgroups,
                             splits, BITS=vbits, D=d, GW=d // vgroups, BLOCK_D=bd, BLOCK_G=bg, BLOCK_N=TILE,
                             PREC=TUNING.precision, num_warps=TUNING.num_warps)
    out = parts.sum(2)
    if getattr(vcodec, "rotate", False):
        out = out @ rotation_on(d, vcodec.seed, dev).T
    return out + probs[..., s, None] * new_v.float()[:, :, None], probs


def add_scores(layer, n_past: torch.Tensor, new_slot: torch.Tensor, scores: torch.Tensor) -> None:
    """kernel.add_scores with PyTorch ops on the tensors' device."""
    pool = layer.owner.pool
    b, h, s1 = scores.shape
    rows = torch.arange(s1 - 1, device=scores.device)
    kept = rows < n_past[..., None]
    flat = pool.flat("score")
    if s1 > 1:  # rows past a head's own count index its table's -1 padding: clamped, then dropped by `kept`
        cols = (rows // pool.block).clamp_max(layer.table.shape[2] - 1).expand(b, h, -1)
        slot = layer.table.gather(2, cols) * pool.block + rows % pool.block
        flat.index_add_(0, slot[kept], scores[..., :-1][kept].float())
    flat.index_add_(0, new_slot.reshape(-1), scores[..., -1].reshape(-1).float())
