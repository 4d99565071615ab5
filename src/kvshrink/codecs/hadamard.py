"""Randomized Hadamard rotation of head vectors (as in QuaRot, arXiv 2404.00456).

x -> x @ R with R = diag(signs) @ H / sqrt(n): orthogonal, so it spreads a few
outlier channels over all channels before quantization and is undone exactly
(up to float rounding) by x @ R.T after. For a head_dim that is not a power of
two, R is block-diagonal with Hadamard blocks of the largest power-of-two size
dividing it.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=32)
def signs(dim: int, seed: int = 0) -> torch.Tensor:
    """The float32 (dim,) random signs of `rotation(dim, seed)`: R = diag(signs) @ blocks of H / sqrt(block),
    so x @ R is a fast Walsh-Hadamard transform of x * signs within each block (the kernels' shortcut)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (dim,), generator=gen).float() * 2 - 1


def hadamard_block(dim: int) -> int:
    """The size of R's Hadamard blocks: the largest power of two dividing dim."""
    return dim & (-dim)


@lru_cache(maxsize=32)
def rotation(dim: int, seed: int = 0) -> torch.Tensor:
    """The float32 (dim, dim) orthogonal matrix R; the same for the same seed."""
    block = hadamard_block(dim)
    h = _sylvester(block) / block**0.5
    r = torch.block_diag(*([h] * (dim // block)))
    return signs(dim, seed)[:, None] * r


@lru_cache(maxsize=64)
def rotation_on(dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """`rotation(dim, seed)` held on `device`: a decode step on a GPU reads it there, with no copy from
    the host each step."""
    return rotation(dim, seed).to(device)
