"""An observation window's probabilities in one compiled call (core/importance.py's `window_probs`, on the CPU).

A decode step scores at most window + gather tokens per KV head against a few query rows, given each row's
log-sum-exp from the decode kernel: p = exp(q . k - lse). As PyTorch ops (a batched product, the exponent, the mask;
for a coded window the decoding of its codes and the turn of the query) that took 0.1 ms a layer for a float16
window and 0.4 ms for a coded one, nearly all of it dispatch. Here it is one call: 8-bit per-token codes over the
whole head read in place (a key is min + step * code in the rotated basis, against the query turned in the call),
then the float16 tokens after them, which end with the call's own (causal).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ..codecs.hadamard import rotation

_NO_TURN = np.empty((0, 0), dtype=np.float32)


@numba.njit(cache=True, fastmath=True)  # dot products in any order: float rounding only
def _probs(q, turn, codes, mn, sc, dense, lse, cap, out):
    """q (B, H, G, R, d) scaled rows, the last R of a call whose tokens end `dense`; turn (d, d) or empty: the
    codes' basis; codes (B, H, n, d) uint8 with mn, sc (B, H, n); dense (B, H, m, d) float32 after them; lse
    (B, H, G, R); out (B, H, G, R, n + m)."""
    nb, nh, ng, nr, d = q.shape
    n, m = codes.shape[2], dense.shape[2]
    qb = np.empty(d, dtype=np.float32)
    for b in range(nb):
        for h in range(nh):
            for g in range(ng):
                for r in range(nr):
                    row = q[b, h, g, r]
                    top = lse[b, h, g, r]
                    if n:
                        if turn.shape[0]:  # q @ turn, the inner loop over columns (it vectorizes)
                            qb[:] = 0.0
                            for k in range(d):
                                a = row[k]
                                for c in range(d):
                                    qb[c] += a * turn[k, c]
                        else:
                            qb[:] = row
                        total = qb.sum()
                        for j in range(n):
                            dot = 0.0
                            for c in range(d):
                                dot += qb[c] * codes[b, h, j, c]
                            s = mn[b, h, j] * total + sc[b, h, j] * dot
                            if cap > 0.0:
                                s = cap * math.tanh(s / cap)
                            out[b, h, g, r, j] = math.exp(s - top)
                    last = m - nr + r  # the last dense token this row sees (the call's own tokens end `dense`)
                    for j in range(m):
                        if j > last:
                            out[b, h, g, r, n + j] = 0.0
                            continue
                        s = 0.0
                        for c in range(d):
                            s += row[c] * dense[b, h, j, c]
                        if cap > 0.0:
                            s = cap * math.tanh(s / cap)
                        out[b, h, g, r, n + j] = math.exp(s - top)


def reads(codec) -> bool:
    """Whether `probs` reads this window codec's codes in place (None: a float16 window only)."""
    return codec is None or (codec.bits == 8 and codec.axis == "token" and codec.group is None and codec.uniform
                             and codec.scales == "fp16" and not codec.derope)


def probs(q: torch.Tensor, lse: torch.Tensor, softcap, dense: torch.Tensor, coded=None, codec=None):
    """(B, H, G, rows, n + m) float32: exp(q . k - lse) over `coded` (a Packed of `codec`'s per-token codes, n tokens,
    or None) then `dense` (B, H, m, d), which ends with the call's own tokens (so the rows, its last ones, see dense
    token j up to m - rows + row); q (B, H, G, rows, d) float32, scaled; lse (B, H, G, rows, 1). CPU tensors, a codec
    `reads` takes."""
    b, h, g, r, d = q.shape
    if coded is not None:
        n = coded.num_tokens
        codes = coded.tensors["codes"].reshape(b, h, n, d).numpy()
        mn, sc = (coded.tensors[k].reshape(b, h, n).float().numpy() for k in ("min", "scale"))
        turn = rotation(d, codec.seed).numpy() if codec.rotate else _NO_TURN
    else:
        n, turn = 0, _NO_TURN
        codes, mn = np.empty((b, h, 0, d), np.uint8), np.empty((b, h, 0), np.float32)
        sc = mn
    out = np.empty((b, h, g, r, n + dense.shape[2]), dtype=np.float32)
    _probs(q.contiguous().numpy(), turn, codes, mn, sc, dense.float().contiguous().numpy(),
           lse.reshape(b, h, g, r).contiguous().numpy(), float(softcap or 0.0), out)
    return torch.from_numpy(out)
