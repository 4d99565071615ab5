"""Decode attention that reads a paged cache's kept rows in place (eviction: families/evict/cache.py),
compiled with numba.

Each (sequence, KV head) keeps its own rows in blocks of the shared pool, listed by its block
table. For a decode step the kernel walks the table and reads every kept row where it lies: a
float16 row from its bits, an int row (per-token codes, `kvc-8x+int4`) unpacked to uint8 and
taken as q . (min + step * code) = step (q . code) + min sum(q) per channel group. Nothing is
gathered or decoded into a (B, H, S, d) copy, which the PyTorch path builds every step.

Eviction scores need every kept row's attention weight, so the kernel keeps the step's logits of
a head in one row (a head keeps at most a few thousand rows) and returns the softmax weights
beside the output: a plain two-pass softmax rather than the online one of the other kernels.
This call's token is exact (float32) and comes last. A Hadamard-rotated codec is read as
families/quant/kernel.py reads it: the query rotated once, the past value sum rotated back once.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ...codecs.base import Codec, Fp16
from ...codecs.hadamard import rotation
from ...codecs.quant import IntQuant
from ...kernels.backend import TRITON, triton_for
from ...kernels.tiles import FAST, HALF, as_u8, half_to_float, rotate_back, unpack_codes, weights

if TRITON:
    from . import gpu


@numba.njit(cache=True, fastmath=FAST)
def _row(codes, step, mn, bits, sym, sc, mf, x):
    """One kept row into x (d,) float32: float16 bits, or int codes + the float16 bytes of their
    per-group step and minimum."""
    d = x.shape[0]
    if bits == HALF:
        half_to_float(codes, d, x)
        return
    groups = sc.shape[0]
    unpack_codes(codes, d, bits, sym)
    half_to_float(step, groups, sc)
    half_to_float(mn, groups, mf)
    gw = d // groups
    for gi in range(groups):
        s, m = sc[gi], mf[gi]
        xs = x[gi * gw:(gi + 1) * gw]
        ys = sym[gi * gw:(gi + 1) * gw]
        for c in range(gw):
            xs[c] = m + s * np.float32(ys[c])


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def _attend(q, qr, table, n_past, block, kc, ks, km, kbits, vc, vs, vm, vbits, new_k, new_v, pos, seen, vrot,
            probs, out):
    """q (B, H, G, d) scaled; qr the same in the key codec's rotated basis; table (B, H, W) block ids;
    n_past (B, H) kept rows; kc / vc (slots, row bytes), ks, km, vs, vm (slots, 2 groups) float16
    bytes (empty for float16 rows); new_k / new_v (B, H, d) this call's token; pos (slots,) each
    row's original position and seen (B, K) which positions the query may see (0 x 0: all; a
    kept row's visibility is that of its position); vrot the value rotation (0 x 0: none).
    Writes probs (B, H, G, S + 1) and out (B, H, G, d). One (sequence, head) per worker: splitting
    a head's rows over workers measured no faster (4x eviction at 8k, 2k rows per head)."""
    nb_, nh, ng, d = q.shape
    s = probs.shape[3] - 1
    kgroups = max(ks.shape[1] // 2, 1)
    vgroups = max(vs.shape[1] // 2, 1)
    masked = seen.shape[1] > 0
    for u in numba.prange(nb_ * nh):
        b = u // nh
        h = u % nh
        n = n_past[b, h]
        sym = np.empty(d, dtype=np.uint8)
        x = np.empty(d, dtype=np.float32)
        ksc = np.empty(kgroups, dtype=np.float32)
        kmf = np.empty(kgroups, dtype=np.float32)
        vsc = np.empty(vgroups, dtype=np.float32)
        vmf = np.empty(vgroups, dtype=np.float32)
        kk = np.empty(s + 1, dtype=np.int32)
        vt = np.zeros(s + 1, dtype=np.uint8)
        tmp = np.empty(d, dtype=np.float32)
        lg = probs[b, h]
        for j in range(n):  # logits of the kept rows
            slot = table[b, h, j // block] * block + j % block
            vt[j] = seen[b, pos[slot]] if masked else 1
            _row(kc[slot], ks[slot], km[slot], kbits, sym, ksc, kmf, x)
            for g in range(ng):
                qg = qr[b, h, g]
                t = np.float32(0.0)
                for c in range(d):
                    t += qg[c] * x[c]
                lg[g, j] = t
        vt[s] = seen[b, seen.shape[1] - 1] if masked else 1
        for g in range(ng):  # this call's token, then the softmax of each query row
            qg = q[b, h, g]
            t = np.float32(0.0)
            for c in range(d):
                t += qg[c] * new_k[b, h, c]
            lg[g, s] = t
            for j in range(n, s):
                lg[g, j] = -np.inf
            mx, _, tot = weights(lg[g], vt, s + 1, -np.inf, kk, np.float32(0.0))
            if mx == -np.inf:  # nothing visible (cannot happen: a token sees itself)
                lg[g, :] = 0.0
                continue
            inv = np.float32(1.0) / tot
            for j in range(s + 1):
                lg[g, j] *= inv
        acc = out[b, h]
        acc[:, :] = 0.0
        for j in range(n):  # weighted value sums
            slot = table[b, h, j // block] * block + j % block
            _row(vc[slot], vs[slot], vm[slot], vbits, sym, vsc, vmf, x)
            for g in range(ng):
                p = lg[g, j]
                a = acc[g]
                for c in range(d):
                    a[c] += p * x[c]
        for g in range(ng):
            if vrot.shape[0]:
                rotate_back(acc[g], vrot, tmp)
            p = lg[g, s]
            for c in range(d):
                acc[g, c] += p * new_v[b, h, c]


def supported(key_codec: Codec, value_codec: Codec, head_dim: int) -> bool:
    """Rows the kernel reads: float16, or per-token int codes whose channel groups are whole bytes."""
    def whole(c):
        if isinstance(c, Fp16):
            return True
        return (isinstance(c, IntQuant) and c.axis == "token" and c.uniform  # codes read as their integers
                and (c.group or head_dim) * c.bits % 8 == 0 and head_dim % (c.group or head_dim) == 0)

    return whole(key_codec) and whole(value_codec)


def _bytes(x: torch.Tensor, slots: int) -> np.ndarray:
    return x.reshape(slots, -1).view(torch.uint8).numpy()


_NONE = np.empty((0, 0), dtype=np.uint8)


def _fields(pool, prefix: str, codec: Codec, slots: int):
    """(row bytes, step bytes, min bytes) of one codec's rows in the pool: views, no copies."""
    st = pool.storage
    if isinstance(codec, Fp16):
        return _bytes(st[prefix + "x"], slots), _NONE, _NONE
    return (st[prefix + "codes"].reshape(slots, -1).numpy(), _bytes(st[prefix + "scale"], slots),
            _bytes(st[prefix + "min"], slots))


def attend(q: torch.Tensor, layer, n_past: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
           seen: torch.Tensor | None):
    """q (B, H, G, d) float32, already scaled; layer a PagedLayer (its block table and the cache's
    pool); n_past (B, H) kept rows before this call's token; new_k / new_v (B, H, d) that token;
    seen (B, K) bool, the positions the query may see, or None (all) -> (out (B, H, G, d),
    probs (B, H, G, S + 1)) float32, S the most rows a head keeps."""
    if triton_for(q):
        return gpu.attend(q, layer, n_past, new_k, new_v, seen)
    owner = layer.owner
    pool = owner.pool
    kcodec, vcodec = owner.key_codec, owner.value_codec
    b, h, g, d = q.shape
    s = int(n_past.max()) if n_past.numel() else 0
    slots = pool.capacity * pool.block
    kc, ks, km = _fields(pool, "k.", kcodec, slots)
    vc, vs, vm = _fields(pool, "v.", vcodec, slots)
    qr = q @ rotation(d, kcodec.seed) if getattr(kcodec, "rotate", False) else q
    vrot = rotation(d, vcodec.seed).numpy() if getattr(vcodec, "rotate", False) else np.empty((0, 0), np.float32)
    kbits = HALF if isinstance(kcodec, Fp16) else kcodec.bits
    vbits = HALF if isinstance(vcodec, Fp16) else vcodec.bits
    probs = np.empty((b, h, g, s + 1), dtype=np.float32)
    out = np.empty((b, h, g, d), dtype=np.float32)
    _attend(q.contiguous().numpy(), qr.contiguous().numpy(), layer.table.contiguous().numpy(),
            n_past.contiguous().numpy(), pool.block, kc, ks, km, kbits, vc, vs, vm, vbits,
            new_k.float().contiguous().numpy(), new_v.float().contiguous().numpy(), pool.flat("pos").numpy(),
            _NONE if seen is None else as_u8(seen), vrot, probs, out)
    return torch.from_numpy(out), torch.from_numpy(probs)


@numba.njit(cache=True)
def _add_scores(table, n_past, block, scores, new_slot, flat):
    """flat[slot of row j of (b, h)] += scores[b, h, j] for the kept rows, and the last score to the
    slot of this call's token."""
    nb_, nh, s1 = scores.shape
    for b in range(nb_):
        for h in range(nh):
            for j in range(n_past[b, h]):
                flat[table[b, h, j // block] * block + j % block] += scores[b, h, j]
            flat[new_slot[b, h]] += scores[b, h, s1 - 1]


def add_scores(layer, n_past: torch.Tensor, new_slot: torch.Tensor, scores: torch.Tensor) -> None:
    """Add a decode step's (B, H, S + 1) eviction scores to the pool's score of every row it read."""
    if triton_for(scores):
        return gpu.add_scores(layer, n_past, new_slot, scores)
    pool = layer.owner.pool
    _add_scores(layer.table.contiguous().numpy(), n_past.contiguous().numpy(), pool.block,
                scores.float().contiguous().numpy(), new_slot.contiguous().numpy(), pool.flat("score").numpy())
