"""Non-uniform scalar levels: the Lloyd-Max quantizer of a standard Gaussian.

After a Hadamard rotation, the coordinates of a head vector are close to Gaussian (TurboQuant,
arXiv 2504.19874, builds on this). Scaled by a group's mean and standard deviation, the
Lloyd-Max levels of N(0, 1) (Max, 1960) give a smaller mean squared error than evenly spaced
levels between the group's minimum and maximum, at the same bytes per group: a float16 mean and
deviation take the place of the float16 minimum and step. On the bundled model this cuts the KL
of 2-bit rotated values by about 40% (docs/budget.md). At 3 bits and more the gain fades, and
the uniform grid wins where a group's tails matter, so the allocator measures both. A mean and
deviation also fit in a byte each (codecs/scales.py), which a uniform code's exact range does not.

`UNIFORM` and `GAUSS` name the two kinds of level; the uniform kind's levels are the integers
0 .. 2^bits - 1, so one decode (min + step * levels[code]) serves both.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

UNIFORM, GAUSS = "uniform", "gauss"
KINDS = (UNIFORM, GAUSS)
GAUSS_BITS = 4  # Lloyd-Max tables up to this width; wider codes gain nothing over the uniform grid


def _pdf(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _cdf(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.special.erf(t / math.sqrt(2)))


@lru_cache(maxsize=None)
def gauss(bits: int) -> torch.Tensor:
    """The 2^bits Lloyd-Max levels of N(0, 1), ascending, float32: Lloyd's iteration (each level
    the mean of the Gaussian between its thresholds, each threshold the midpoint of its levels)
    in float64 until it moves less than 1e-12."""
    n = 1 << bits
    lv = torch.linspace(-2.0, 2.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(10000):
        t = torch.cat([-inf, (lv[1:] + lv[:-1]) / 2, inf])
        new = (_pdf(t[:-1]) - _pdf(t[1:])) / (_cdf(t[1:]) - _cdf(t[:-1]))
        done = float((new - lv).abs().max()) < 1e-12
        lv = new
        if done:
            break
    return lv.float()


def levels(kind: str, bits: int) -> torch.Tensor:
    """The float32 levels a code indexes: 0 .. 2^bits - 1 (uniform) or the Gaussian's."""
    return gauss(bits) if kind == GAUSS else torch.arange(1 << bits, dtype=torch.float32)


def thresholds(kind: str, bits: int) -> torch.Tensor:
    """The midpoints between neighbouring levels: a value's nearest level is the count of thresholds below it."""
    lv = levels(kind, bits)
    return (lv[1:] + lv[:-1]) / 2


@lru_cache(maxsize=64)
def thresholds_on(kind: str, bits: int, device: torch.device) -> torch.Tensor:
    """`thresholds(kind, bits)` held on `device`: a decode step codes a token's values with them at every layer."""
    return thresholds(kind, bits).to(device)


@lru_cache(maxsize=64)
def levels_on(kind: str, bits: int, device: torch.device) -> torch.Tensor:
    """`levels(kind, bits)` held on `device` (a decode step on a GPU reads it there, no copy each step)."""
    return levels(kind, bits).to(device)
