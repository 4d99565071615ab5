"""8-bit group scales: a group's (mean, deviation) in two bytes instead of two float16s.

At 1 or 2 bits a value, a head vector's float16 mean and deviation are a third to a fifth of its
bytes (4 bytes beside 8 or 16 of codes for 64 channels). Gaussian levels (codecs/levels.py) need no
exact range, only a scale and a centre, so both fit in a byte each:

- the deviation as a logarithm: dev = 2^(e / STEPS + LOW) for e in 1..255 (0: zero), steps of
  2^(1/10) (within 3.5% of the deviation), from 2^-16 to 2^9.5;
- the mean relative to that deviation, as a float8 e4m3 number (3 mantissa bits: within 6.25% of
  the mean). After a Hadamard rotation a token's mean is about a tenth of its deviation (bundled
  model: median 0.08, largest 1.2), so this error is a fraction of a percent of the deviation. The
  deviation is raised to at least |mean| / 448 (e4m3's largest number), so no ratio overflows.

On 2-bit Gaussian codes the two roundings add under 1% to the mean squared error (tests/test_codecs.py).

Root-mean-square scales (IntQuant's scales="rms8") keep the deviation's byte only: levels about zero, scaled by
the group's root mean square. A rotated head vector's mean is one coordinate of the vector before the rotation
divided by 8 (the Hadamard matrix's first row is flat), about a tenth of its deviation: left in the scale it
adds about 1% to the squared error, and the budget's values measured the same KL with a byte less a token
and head (docs/budget.md, "One scale byte for values").
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
import torch

from ..errors import KvshrinkError

STEPS = 10  # log2 steps per octave
LOW = -16.0  # log2 of the smallest deviation (code 1 is one step above)
E4M3_MAX = 448.0
OUT_OF_RANGE = (f"key/value states exceed the range of 8-bit scales (a deviation above {2 ** (255 / STEPS + LOW):.0f}); "
                "use float16 scales")


def _log_code(x: torch.Tensor, up: bool) -> torch.Tensor:
    t = (torch.log2(x) - LOW) * STEPS
    return torch.ceil(t) if up else torch.round(t)


def deviation(e: torch.Tensor) -> torch.Tensor:
    """The float32 deviation of each code (0 for code 0)."""
    dev = torch.exp2(e.float() / STEPS + LOW)
    return torch.where(e > 0, dev, torch.zeros_like(dev))


def pack(mean: torch.Tensor, dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, r) uint8 of float32 mean and deviation (any shape): the deviation's log code and the bits of
    mean / decoded deviation in float8 e4m3."""
    if not (torch.isfinite(mean).all() and torch.isfinite(dev).all()):
        raise KvshrinkError("cannot quantize NaN or infinite key/value states")
    e = torch.maximum(_log_code(dev, up=False), _log_code(mean.abs() / E4M3_MAX, up=True))
    if bool((e > 255).any()):
        raise KvshrinkError(OUT_OF_RANGE)
    live = (dev > 0) | (mean != 0)
    e = torch.where(live, e.clamp(1, 255), torch.zeros_like(e)).to(torch.uint8)
    d = deviation(e)
    ratio = torch.where(d > 0, mean / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    r = ratio.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return e, r


_CODES = torch.arange(256, dtype=torch.uint8)
DEV_TABLE = deviation(_CODES).numpy()  # what each byte stands for: table look-ups are 4x faster than the arithmetic
RATIO_TABLE = np.nan_to_num(_CODES.view(torch.float8_e4m3fn).float().numpy())  # (two NaN bytes, never written)


def unpack(e: torch.Tensor, r: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, deviation) in `dtype` from `pack`'s codes (a decode step reads every group's: about
    0.06 ms for 8k tokens of 3 heads on the CPU)."""
    if e.device.type == "cpu":
        m, d = unpack_numpy(e.numpy(), r.numpy())
        return torch.from_numpy(m).to(dtype), torch.from_numpy(d).to(dtype)
    dev_table, ratio_table = _tables_on(e.device)
    d = dev_table[e.long()]
    return (ratio_table[r.long()] * d).to(dtype), d.to(dtype)


@numba.njit(cache=True)
def _looked_up(e, r, dev, ratio, m, d):
    for i in range(e.shape[0]):
        x = dev[e[i]]
        d[i] = x
        m[i] = ratio[r[i]] * x


def unpack_numpy(e: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, deviation) float32 arrays from `pack`'s codes as numpy arrays: one compiled pass (a decode
    step reads every group's; numpy's two look-ups and a product took 3x as long)."""
    m, d = np.empty(e.shape, dtype=np.float32), np.empty(e.shape, dtype=np.float32)
    _looked_up(np.ascontiguousarray(e).reshape(-1), np.ascontiguousarray(r).reshape(-1), DEV_TABLE, RATIO_TABLE,
               m.reshape(-1), d.reshape(-1))
    return m, d


def pack_rms(rms: torch.Tensor) -> torch.Tensor:
    """The log codes (uint8) of root mean squares (any shape): `pack`'s deviation byte for a zero mean."""
    return pack(torch.zeros_like(rms), rms)[0]


def unpack_rms(e: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeros, root mean square) in `dtype` from `pack_rms`'s codes: `unpack`'s pair with no mean."""
    d = torch.from_numpy(DEV_TABLE[e.numpy()]) if e.device.type == "cpu" else _tables_on(e.device)[0][e.long()]
    return torch.zeros_like(d, dtype=dtype), d.to(dtype)


def unpack_rms_numpy(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(zeros, root mean square) float32 arrays from `pack_rms`'s codes as a numpy array."""
    d = DEV_TABLE[np.asarray(e)]
    return np.zeros_like(d), d


@lru_cache(maxsize=16)
def _tables_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tables held on `device` (a decode step on a GPU reads them there, no copy each step)."""
    return torch.from_numpy(DEV_TABLE).to(device), torch.from_numpy(RATIO_TABLE).to(device)
