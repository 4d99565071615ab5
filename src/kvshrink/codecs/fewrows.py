"""A few rows times a small matrix, compiled on the calling thread: a decode step's query rows or one token
per head turned into a rotated basis (x @ R, x @ R^T).

PyTorch hands even a 9 x 64 x 64 product to MKL, whose OpenMP driver opens a parallel region for it. In a decode
step that interleaves these products with numba's parallel kernels on 2 cores, the region waits at a barrier for
a thread that the other OpenMP runtime's spinning workers keep off the core: py-spy put a quarter of `auto-6x`'s
decode step at 8k tokens in that barrier, for arithmetic of a few microseconds. Here it never leaves the thread.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

FEW = 64  # rows at most computed here; more go to PyTorch, whose threads then pay for themselves


@numba.njit(cache=True)  # no reduction in the inner loop: it vectorizes without fast math
def _matmul(x, m, out):
    n, k = x.shape
    for i in range(n):
        o = out[i]
        o[:] = 0.0
        for j in range(k):
            a = x[i, j]
            row = m[j]
            for c in range(o.shape[0]):
                o[c] += a * row[c]


def few_rows(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x (..., k) @ m (k, c) as float32: on the calling thread for up to FEW rows of CPU tensors, else PyTorch."""
    k, c = m.shape
    rows = x.numel() // k if k else 0
    if x.device.type != "cpu" or m.device.type != "cpu" or rows > FEW or x.dtype != torch.float32 or m.dtype != torch.float32:
        return x @ m
    out = np.empty((rows, c), dtype=np.float32)
    _matmul(x.reshape(rows, k).contiguous().numpy(), np.ascontiguousarray(m.numpy()), out)
    return torch.from_numpy(out).view(*x.shape[:-1], c)
