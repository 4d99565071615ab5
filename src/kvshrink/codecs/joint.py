"""JointKeys: keys in a calibrated basis per KV head, each axis at its own width (transform coding of keys,
KVTC's idea with the query as the metric).

A key's coding error reaches the model as q . (k - k_hat). Per layer and KV head a calibration
(families/budget/joint.py) finds a basis in which that error is plain squared error and the axes are
uncorrelated, with falling variances; widths are then spent per axis where the variance is large (0 bits:
the block's mean only). Keys are first turned back within their group (codecs/spin.py), so the basis meets
keys as they were before RoPE.

Layout per block of `group` tokens and head, axes in the basis's order (falling variance), one width per
axis for all heads of the layer, widths not rising along the axes, so that every head's codes have one size:
- `codes`: per width class (the consecutive axes of one width), the class's axes x the block's tokens,
  axis-major (each axis's `group` codes end to end, a whole number of bytes), packed at that width; classes
  end to end: sum(widths) bits a token, nothing padded (whole bytes a group). Axis-major
  because the kernel forms a block's keys per axis, one (min, step) pair over all its tokens: token-major
  classes of a few axes each made `auto-6x` decode 1.3x slower than with the menu's keys;
- `min`: float16 per axis (uniform codes over the block, rounded down as IntQuant's; a 0-bit axis holds its
  mean); `scale`: float16 per coded axis (the first `coded` ones, rounded up): a 0-bit axis holds no step. At
  J0.5 about 52 of 64 axes are uncoded, and their zero steps took 14% of its bytes.
The codec holds the map from basis coordinates back to keys, (kv_heads, head_dim, head_dim), as int8 rows
with a float16 scale each (4.2 KB a head where float16 took 8 KB; on the bundled model at 2,048 tokens the
float16 maps took 9% of an `auto-6x` cache). Decoding and the kernel's query map read it (`inverse()`), and
encoding inverts it once per call, so a round trip goes through exactly the stored map: its rounding changes
the basis a little, not the error. It is counted by every cache that uses the codec (`shared_tensors`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..errors import KvshrinkError
from .base import Codec, Packed
from .packing import pack, unpack
from .quant import _half_down, _half_up
from .spin import turn


class JointKeys(Codec):
    """Per-head basis keys with per-axis widths (module docstring). inverse: (H, D, D) with
    key = coordinates @ inverse[h]; widths: D ints, 0 or 1..8, not rising; rate: the average width the widths
    were spent for (sum(widths) <= rate * D; in halves: J0.5, J1.5 and J2.5 give the budget finer steps), `bits`
    its whole bits up (what a still-filling group is staged for, core/layer.stage_codec)."""

    axis, rotate, seed, levels, scales, uniform = "channel", False, 0, "uniform", "fp16", True

    def __init__(self, inverse: torch.Tensor, widths, group: int, derope: tuple, rate: float):
        widths = [int(w) for w in widths]
        d = inverse.shape[-1]
        if inverse.dim() != 3 or inverse.shape[-2] != d or len(widths) != d:
            raise KvshrinkError(f"joint keys need a (heads, {d}, {d}) inverse and {d} widths, "
                                f"got {tuple(inverse.shape)} and {len(widths)}")
        if any(not 0 <= w <= 8 for w in widths) or any(a < b for a, b in zip(widths, widths[1:])):
            raise KvshrinkError(f"joint key widths must be 0..8 and not rising, got {widths}")
        if (not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 8 or rate * 2 % 1
                or sum(widths) > rate * d):
            raise KvshrinkError(f"joint keys of widths summing to {sum(widths)} do not fit {rate!r} bits a channel "
                                "(a rate of 0.5 to 8 in halves)")
        if not derope or group < 1:
            raise KvshrinkError("joint keys are turned back within token groups: they need RoPE frequencies and a group")
        inverse = inverse.float()
        scale = (inverse.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12).to(torch.float16)
        self.inverse_rows = (inverse / scale.float()).round().clamp(-127, 127).to(torch.int8)
        self.inverse_scale = scale
        self.widths, self.group, self.rate = widths, group, float(rate)
        self.bits = int(np.ceil(rate))
        self.derope = tuple(float(f) for f in derope)
        self.block_tokens = group
        self.name = f"joint{rate:g}"
        # (first axis, axes, width) of each coded class, in order
        self.classes = []
        for j, w in enumerate(widths):
            if w and (not self.classes or self.classes[-1][2] != w):
                self.classes.append([j, 0, w])
            if w:
                self.classes[-1][1] += 1
        self.classes = [tuple(c) for c in self.classes]
        self.coded = sum(c[1] for c in self.classes)  # axes with codes: the first ones
        if any(group * n * w % 8 for _, n, w in self.classes):  # the kernel and decode step over classes in bytes
            raise KvshrinkError(f"joint keys in groups of {group} tokens leave a width class of {widths} in part of "
                                "a byte")

    @property
    def class_table(self) -> np.ndarray:
        """The classes as the int kernel reads them; never empty (an empty class where no axis is coded): the kernel
        tells joint keys by a table with rows. Made per call: held, it would be an array the cache does not count."""
        return np.array(self.classes or [(0, 0, 0)], dtype=np.int64).reshape(-1, 3)

    def describe(self) -> str:
        return f"joint-basis keys, {self.rate:g} bits a channel ({self.coded} of {len(self.widths)} axes coded) -rope"

    def shared_tensors(self) -> list[torch.Tensor]:
        return [self.inverse_rows, self.inverse_scale]

    def calibrated(self) -> list[torch.Tensor]:
        return [*self.shared_tensors(), torch.tensor(self.widths)]  # two choices of equal bits differ by widths

    def heads(self, first: int, stop: int) -> JointKeys:
        """The same codec over KV heads first..stop-1: its own copy of their maps back to keys (counted as its), made
        once per slice, so that caches of one allocation share it as they share the whole codec (a server batches
        bodies whose joint keys are one object: kernel.py's batch_key)."""
        parts = self.__dict__.setdefault("_parts", {})
        if (first, stop) not in parts:
            part = copy.copy(self)
            del part._parts  # the copy's own attribute: its slices are its own
            part.inverse_rows = self.inverse_rows[first:stop].clone()
            part.inverse_scale = self.inverse_scale[first:stop].clone()
            parts[first, stop] = part
        return parts[first, stop]

    def inverse(self, device=None) -> torch.Tensor:
        """(H, D, D) float32 map from coordinates back to keys, from its stored rows (made per call, not kept)."""
        return (self.inverse_rows.float() * self.inverse_scale.float()).to(device or "cpu")

    def basis(self, device) -> torch.Tensor:
        """(H, D, D) float32 map from keys to coordinates: the inverse of the stored map, so that a round trip
        goes through exactly what decoding reads."""
        return torch.linalg.inv(self.inverse()).to(device)

    def quantize(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (B, H, blocks, D, group) uint8, each axis's codes end to end; min (B, H, blocks, D) and step
        (B, H, blocks, coded) float16) of x (B, H, tokens, D): the symbols and parameters every layout of these keys
        stores."""
        b, h, t, d = x.shape
        if block % self.group or t % block or d != len(self.widths) or h != self.inverse_rows.shape[0]:
            raise KvshrinkError(f"joint keys of {self.inverse_rows.shape[0]} heads x {len(self.widths)} channels in groups of "
                                f"{self.group} cannot code {h} heads x {d} channels x {t} tokens in blocks of {block}")
        if not torch.isfinite(x).all():
            raise KvshrinkError("cannot quantize NaN or infinite key/value states")
        y = turn(x.float(), self.derope, self.group, -1) @ self.basis(x.device)[None]
        y = y.reshape(b, h, t // self.group, self.group, d)
        w = torch.tensor(self.widths, device=x.device)
        lo = _half_down(y.amin(3))
        qmax = (2.0 ** w - 1).clamp_min(1)
        step = torch.where(w > 0, _half_up((y.amax(3) - lo.float()) / qmax), torch.zeros_like(lo))
        mn = torch.where(w > 0, lo, y.mean(3).to(torch.float16))
        if not (torch.isfinite(mn).all() and torch.isfinite(step).all()):
            raise KvshrinkError("key states exceed the float16 range of the quantization scales")
        safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
        codes = ((y - mn.float()[:, :, :, None]) / safe[:, :, :, None]).round_().clamp_(min=0)
        codes = torch.minimum(codes, qmax).to(torch.uint8)
        # a copy of the coded axes' steps: a slice (even an empty one) would hold the whole step tensor's storage
        return (codes.transpose(-1, -2).contiguous(), mn.contiguous(),
                step[..., :self.coded].clone(memory_format=torch.contiguous_format))

    def encode(self, x: torch.Tensor, block: int) -> Packed:
        axes, mn, step = self.quantize(x, block)
        b, h, nb = mn.shape[:3]
        parts = [pack(axes[..., a:a + n, :].reshape(b, h, nb, n * self.group), bits) for a, n, bits in self.classes]
        body = torch.cat(parts, -1) if parts else axes.new_zeros(b, h, nb, 0)  # sum(widths) x group bits, unpadded
        return Packed({"codes": body.contiguous(), "min": mn, "scale": step}, block, len(self.widths))

    def params(self, tensors: dict, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(min per block and axis, step per block and coded axis), as stored."""
        return tensors["min"].to(dtype), tensors["scale"].to(dtype)

    def decode(self, packed: Packed, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        t = packed.tensors
        b, h, nb, _ = t["min"].shape
        g, at, symbols = self.group, 0, []
        for _, n, bits in self.classes:
            size = g * n * bits // 8
            symbols.append(unpack(t["codes"][..., at:at + size], bits, g * n).reshape(b, h, nb, n, g))
            at += size
        return self.dequantize(symbols, t, dtype, out)

    def dequantize(self, symbols: list, tensors: dict, dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Keys (B, H, tokens, D) from each width class's codes (B, H, blocks, axes, group) and the parameters."""
        b, h, nb, d = tensors["min"].shape
        g = self.group
        mn, step = self.params(tensors)
        y = mn[:, :, :, None, :].expand(b, h, nb, g, d).clone()
        for (a, n, _), c in zip(self.classes, symbols):
            y[..., a:a + n] += c.to(y.device).transpose(-1, -2).float() * step[:, :, :, None, a:a + n]
        x = y.reshape(b, h, nb * g, d) @ self.inverse(y.device)[None]
        x = turn(x, self.derope, self.group, 1).to(dtype)
        return x if out is None else out.copy_(x)
