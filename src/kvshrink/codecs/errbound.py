"""Error-bounded block quantization (KVComp, Jiang et al., arXiv 2508.18263).

A block of tokens is quantized with a step set by a relative error bound:
step = bound x the group's value range, so every element decodes within half a
step of its input. Keys form groups per channel over the block's tokens (key
outliers sit in fixed channels), values per token over its channels. The
symbols 0..ceil(1/bound - 1/2) are what the entropy coder (huffman.py) sees: a
group's maximum is at most 1/bound steps above its minimum, so 0.3 has 4
symbols, not ceil(1/0.3) + 1 = 5 (a symbol never used still takes code space).

Guarantee, tested: with the stored float16 minimum `mn` (rounded down) and
step `s` (rounded up from bound x (max - mn)), |x - (mn + q s)| <= s / 2 for
every element, and s <= bound x (max - mn) x (1 + 2**-10). A constant group
has s = 0 and decodes exactly when its value is a float16; otherwise its range
above the rounded-down minimum is tiny but not zero, and the same bound holds.
NaN and inf are refused, not coded.
"""

from __future__ import annotations

import math

import torch

from ..errors import KvshrinkError
from .quant import _half_down, _half_up

AXES = ("channel", "token")


class ErrorBound:
    """Quantize blocks (B, H, n, T, d) with relative bound `bound` along `axis`."""

    def __init__(self, bound: float, axis: str):
        if not isinstance(bound, (int, float)) or not (1 / 255 <= bound <= 1):
            raise KvshrinkError(f"impossible error bound {bound!r}: use a relative bound from 1/255 (0.004) to 1")
        if axis not in AXES:
            raise KvshrinkError(f"unknown quantization axis {axis!r}; use one of {', '.join(AXES)}")
        self.bound, self.axis = float(bound), axis
        self.qmax = math.ceil(1 / self.bound - 0.5 - 1e-9)  # what the largest (max - min) / step rounds to
        self.dim = 3 if axis == "channel" else 4

    @property
    def symbols(self) -> int:
        return self.qmax + 1

    def quantize(self, x: torch.Tensor):
        """x (B, H, n, T, d) float -> (symbols uint8 same shape, min fp16, step fp16) with the group
        statistics keeping a size-1 dim (channel: (B, H, n, 1, d); token: (B, H, n, T, 1))."""
        if not torch.isfinite(x).all():
            raise KvshrinkError("cannot quantize NaN or infinite key/value states")
        x = x.float()
        mn = _half_down(x.amin(self.dim, keepdim=True))
        step = _half_up((x.amax(self.dim, keepdim=True) - mn.float()) * self.bound)
        if not (torch.isfinite(mn).all() and torch.isfinite(step).all()):
            raise KvshrinkError("key/value states exceed the float16 range of the quantization steps")
        safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
        q = ((x - mn.float()) / safe).round_().clamp_(0, self.qmax).to(torch.uint8)
        return q, mn, step

    @staticmethod
    def dequantize(q: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return torch.addcmul(mn.to(dtype), q.to(dtype), step.to(dtype))
