"""Vector levels for per-token values: runs of rotated coordinates coded to the nearest codeword of a codebook.

The Gaussian levels of codecs/levels.py code each coordinate of a rotated, normalized head vector alone. Coded
`dim` at a time, to one of 256 codewords of a k-means codebook of N(0, I) (the vector quantizers of QuIP#, AQLM
and TurboQuant build on the same fact: after a rotation the coordinates are close to independent Gaussians), the
same bits take 11% (1 bit: 8 coordinates a codeword) to 17% (2 bits: 4 a codeword) off the squared error
(docs/budget.md, "Vector levels for values").

`VectorQuant` keeps IntQuant's per-token layout with Gaussian levels and 8-bit scales: a token's values are
rotated (Hadamard), its mean and deviation take a byte each, and its codes one byte per run of coordinates, so a
head vector of 64 values takes 8 bytes of codes at 1 bit a value and 16 at 2, as the scalar codes do. The kernel
reads them in place (families/quant/kernel.py: each tile's codewords formed from the book before the weighted
sums). The book is the codec's: fitted once by a calibration (`gauss_book`) and counted by every cache that
holds the codec (`shared_tensors`).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from ..errors import KvshrinkError
from .base import Packed
from .levels import GAUSS
from .quant import IntQuant

CODEWORDS = 256  # a codeword's index is one byte
RUN = {1: 8, 2: 4}  # bits a value -> coordinates a codeword (8 bits a codeword)
# runs searched at once: a (CHUNK, 256) float32 distance matrix, 4 MB (65,536 added 130 MB to a prefill's peak)
CHUNK = 4096


def gauss_book(bits: int, seed: int = 0, samples: int = 1000) -> torch.Tensor:
    """A (256, RUN[bits]) float32 k-means codebook of the standard Gaussian in RUN[bits] dimensions (faiss), from
    `samples` draws a codeword."""
    if bits not in RUN:
        raise KvshrinkError(f"vector levels have {' or '.join(map(str, RUN))} bits a value, not {bits!r}")
    dim = RUN[bits]
    x = np.random.default_rng(seed).standard_normal((samples * CODEWORDS, dim)).astype(np.float32)
    km = faiss.Kmeans(dim, CODEWORDS, niter=40, seed=seed + 1, max_points_per_centroid=samples)
    km.train(x)
    return torch.from_numpy(np.ascontiguousarray(km.centroids, dtype=np.float32))


def nearest(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest codeword of `book` (K, r) to each run z (..., r)."""
    runs = z.reshape(-1, book.shape[1])
    norms = (book * book).sum(1)
    out = torch.empty(runs.shape[0], dtype=torch.uint8, device=z.device)
    for a in range(0, runs.shape[0], CHUNK):
        dist = torch.addmm(norms, runs[a:a + CHUNK], book.T, alpha=-2.0)
        out[a:a + CHUNK] = dist.argmin(1).to(torch.uint8)
    return out.reshape(z.shape[:-1])


class VectorQuant(IntQuant):
    """Per-token values at `bits` (1 or 2) a value over the whole head, Hadamard-rotated, each run of RUN[bits]
    normalized coordinates one byte: the index of its nearest codeword in `book` (256, RUN[bits]); a token's mean
    and deviation in 8-bit scales (codecs/scales.py)."""

    def __init__(self, bits: int, book: torch.Tensor, seed: int = 2):
        if bits not in RUN:
            raise KvshrinkError(f"vector levels have {' or '.join(map(str, RUN))} bits a value, not {bits!r}")
        book = torch.as_tensor(book, dtype=torch.float32)
        if tuple(book.shape) != (CODEWORDS, RUN[bits]):
            raise KvshrinkError(f"a {bits}-bit vector codebook is ({CODEWORDS}, {RUN[bits]}), not {tuple(book.shape)}")
        if not torch.isfinite(book).all():
            raise KvshrinkError("a vector codebook holds NaN or infinite codewords")
        super().__init__(bits, "token", None, rotate=True, seed=seed, levels=GAUSS, scales="8bit")
        self.book, self.run = book.contiguous(), RUN[bits]
        self.name = f"vq{bits}"

    def describe(self) -> str:
        return f"vq{self.bits} per-token whole-head +hadamard {self.run}-dim codebook 8-bit-scales"

    def shared_tensors(self) -> list[torch.Tensor]:
        return [self.book]

    def _fast(self, x: torch.Tensor) -> bool:  # IntQuant's compiled path codes scalar levels only
        return False

    def _fast_decode(self, packed: Packed) -> bool:
        return False

    def _level_codes(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A byte a run of a normalized head vector z (..., d): the index of its nearest codeword."""
        d = z.shape[-1]
        if d % self.run:
            raise KvshrinkError(f"head_dim {d} is not a multiple of the vector codebook's {self.run} coordinates")
        return nearest(z.reshape(*z.shape[:-1], d // self.run, self.run), self.book.to(z.device)), d // self.run

    def _levels_of(self, packed: Packed) -> torch.Tensor:
        codes = packed.tensors["codes"]
        return self.book.to(codes.device)[codes.long()].reshape(*codes.shape[:-1], packed.head_dim)
