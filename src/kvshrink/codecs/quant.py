"""Group-wise asymmetric integer quantization with KIVI's layout.

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", arXiv 2402.02750) quantizes keys per channel over groups of tokens
(key outliers sit in fixed channels) and values per token over groups of
channels. Codes are packed densely (`packing.py`); each group stores a float16
scale and minimum. The optional randomized Hadamard rotation (QuaRot, arXiv
2404.00456) spreads outlier channels before quantizing.

Error guarantee: the stored minimum is rounded down and the scale up to the
next float16, so every element decodes within half a (stored) step of its
input.

With levels="gauss" (codecs/levels.py) a group stores its float16 mean and standard deviation in
place of the minimum and step, and a code indexes the Lloyd-Max levels of N(0, 1): every element
decodes to the level nearest to it under the stored mean and deviation.

With scales="8bit" (Gaussian levels only) the mean and deviation take a byte each (codecs/scales.py):
at 1 or 2 bits a value that saves a sixth to a tenth of a 64-channel head vector's bytes. With scales="rms8"
the levels sit about zero and the group keeps one byte, its root mean square's log code: a rotated head vector's
mean is small, and the budget's values measured the same loss with that byte less (codecs/scales.py).

With `derope` (per-channel keys: the model's RoPE frequencies) each token of a group is turned back
by its offset's RoPE angles before coding and forward after decoding (codecs/spin.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import KvshrinkError
from .base import Codec, Packed
from .fastquant import dequantize_rows, gauss_rows, quantize_rows
from .fewrows import few_rows
from .hadamard import rotation_on
from .levels import GAUSS, GAUSS_BITS, KINDS, UNIFORM, levels, levels_on, thresholds_on
from .packing import pack, unpack
from .scales import OUT_OF_RANGE, pack_rms, unpack_rms, unpack_rms_numpy
from .scales import pack as pack_scales
from .scales import unpack as unpack_scales
from .scales import unpack_numpy as unpack_scales_numpy
from .spin import turn

AXES = ("channel", "token")
SCALES = ("fp16", "8bit", "rms8")
FAST_ELEMENTS = 4096  # per-token coding of at most this many values takes the compiled path
FAST_DECODE_ELEMENTS = 1 << 16  # per-token decoding of at most this many (an unfinished block) likewise
_CPU = torch.device("cpu")


def _half_down(t: torch.Tensor) -> torch.Tensor:
    h = t.to(torch.float16)
    return torch.where(h.float() > t, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _half_up(t: torch.Tensor) -> torch.Tensor:
    h = t.to(torch.float16)
    return torch.where(h.float() < t, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


class IntQuant(Codec):
    """`bits`-bit asymmetric quantization, one (scale, min) per group.

    axis="channel": each channel over `group` consecutive tokens (KIVI keys).
    axis="token": each token over `group` consecutive channels (KIVI values);
    group=None means the whole head vector. levels: "uniform" (min + step * code) or "gauss"
    (mean + deviation * the Gaussian's Lloyd-Max level; 1 to 4 bits). derope: RoPE inverse
    frequencies to undo within each token group (per-channel only; codecs/spin.py), before the rotation.
    scales: "fp16", "8bit" (Gaussian levels only: mean and deviation a byte each, codecs/scales.py), or "rms8"
    (Gaussian levels about zero, the group's root mean square in a byte; no "min" tensor).
    """

    same_per_head = True

    def __init__(self, bits: int, axis: str = "token", group: int | None = None, rotate: bool = False, seed: int = 0,
                 levels: str = UNIFORM, derope: tuple = (), scales: str = "fp16"):
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise KvshrinkError(f"impossible bit width {bits!r}: integer quantization supports 1 to 8 bits")
        if axis not in AXES:
            raise KvshrinkError(f"unknown quantization axis {axis!r}; use one of {', '.join(AXES)}")
        if group is not None and (not isinstance(group, int) or group < 1):
            raise KvshrinkError(f"group size must be a positive integer, got {group!r}")
        if axis == "channel" and group is None:
            raise KvshrinkError("per-channel quantization needs a token group size")
        if levels not in KINDS:
            raise KvshrinkError(f"unknown quantization levels {levels!r}; use one of {', '.join(KINDS)}")
        if levels == GAUSS and bits > GAUSS_BITS:
            raise KvshrinkError(f"Gaussian levels have 1 to {GAUSS_BITS} bits, not {bits}")
        if derope and axis != "channel":
            raise KvshrinkError("undoing RoPE needs per-channel codes over token groups")
        if scales not in SCALES:
            raise KvshrinkError(f"unknown scales {scales!r}; use one of {', '.join(SCALES)}")
        if scales != "fp16" and levels != GAUSS:
            raise KvshrinkError("8-bit scales need Gaussian levels (a uniform code's minimum and step must cover "
                                "its group exactly)")
        self.scales = scales
        self.bits, self.axis, self.group, self.rotate, self.seed = bits, axis, group, rotate, seed
        self.derope = tuple(float(f) for f in derope)
        self.levels = levels
        self.qmax = (1 << bits) - 1
        self.block_tokens = group if axis == "channel" else 1
        self.name = f"int{bits}"

    @property
    def uniform(self) -> bool:
        return self.levels == UNIFORM

    def table(self) -> torch.Tensor:
        """The float32 level each code stands for (0 .. 2^bits - 1 for uniform codes)."""
        return levels(self.levels, self.bits)

    def describe(self) -> str:
        g = f"g{self.group}" if self.group else "whole-head"
        lv = " gauss-levels" if not self.uniform else ""
        spin = " -rope" if self.derope else ""
        sc = {"fp16": "", "8bit": " 8-bit-scales", "rms8": " rms-8-bit-scales"}[self.scales]
        return f"int{self.bits} per-{self.axis} {g}{spin}{' +hadamard' if self.rotate else ''}{lv}{sc}"

    def _grouped(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
        """View x as groups; returns (view, dim reduced over)."""
        b, h, t, d = x.shape
        if self.axis == "channel":
            if block % self.group:
                raise KvshrinkError(f"cache block {block} is not a multiple of the key group {self.group}")
            return x.reshape(b, h, t // block, block // self.group, self.group, d), 4
        g = self.group or d
        if d % g:
            raise KvshrinkError(f"head_dim {d} is not a multiple of the channel group {g}")
        return x.reshape(b, h, t // block, block, d // g, g), 5

    def encode(self, x: torch.Tensor, block: int) -> Packed:
        if self._fast(x):
            return self._encode_compiled(x, block)
        if not torch.isfinite(x).all():
            raise KvshrinkError("cannot quantize NaN or infinite key/value states")
        x = x.float()
        d = x.shape[-1]
        if self.derope:
            if 2 * len(self.derope) > d or x.shape[-2] % self.group:
                raise KvshrinkError(f"cannot undo {len(self.derope)} RoPE pairs over {x.shape[-2]} tokens of "
                                    f"{d} channels in groups of {self.group}")
            x = turn(x, self.derope, self.group, -1)
        if self.rotate:
            x = few_rows(x, rotation_on(d, self.seed, x.device))
        xg, dim = self._grouped(x, block)
        if not self.uniform:
            return self._encode_levels(xg, dim, block, d)
        mn = _half_down(xg.amin(dim, keepdim=True))
        scale = _half_up((xg.amax(dim, keepdim=True) - mn.float()) / self.qmax)
        if not (torch.isfinite(mn).all() and torch.isfinite(scale).all()):
            raise KvshrinkError("key/value states exceed the float16 range of the quantization scales")
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        codes = ((xg - mn.float()) / safe).round_().clamp_(0, self.qmax).to(torch.uint8)
        tensors = {"codes": pack(codes, self.bits), "scale": scale, "min": mn}
        return Packed(tensors, block, d, {"last": codes.shape[-1]})

    def _encode_levels(self, xg: torch.Tensor, dim: int, block: int, d: int) -> Packed:
        """Each element's nearest level under the group's stored mean and deviation (float16, or the
        8-bit codes' decoded values)."""
        if self.scales == "rms8":  # levels about zero: no mean stored
            stored = {"scale": pack_rms(xg.square().mean(dim, keepdim=True).sqrt())}
        elif self.scales == "8bit":
            stored = dict(zip(("scale", "min"), pack_scales(xg.mean(dim, keepdim=True),
                                                             xg.std(dim, keepdim=True, unbiased=False))))
        else:
            stored = {"scale": xg.std(dim, keepdim=True, unbiased=False).to(torch.float16),
                      "min": xg.mean(dim, keepdim=True).to(torch.float16)}
        mean, dev = self.params(stored)
        if not (torch.isfinite(mean).all() and torch.isfinite(dev).all()):
            raise KvshrinkError("key/value states exceed the float16 range of the quantization scales")
        safe = torch.where(dev > 0, dev, torch.ones_like(dev))
        codes, last = self._level_codes((xg - mean) / safe)
        return Packed({"codes": codes, **stored}, block, d, {"last": last})

    def _level_codes(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(packed codes, codes a group holds) of normalized groups z (..., g): each element's nearest level."""
        codes = torch.bucketize(z, thresholds_on(self.levels, self.bits, z.device)).to(torch.uint8)
        return pack(codes, self.bits), codes.shape[-1]

    def _levels_of(self, packed: Packed) -> torch.Tensor:
        """A body's codes as the numbers that min + step * x (or mean + deviation * x) decodes, grouped: the codes,
        or the levels they stand for."""
        codes = unpack(packed.tensors["codes"], self.bits, packed.meta["last"])
        return codes if self.uniform else self.table().to(codes.device)[codes.long()]

    def params(self, tensors: dict, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, step) of uniform codes, (mean, deviation) of Gaussian ones, in `dtype`, from a body's tensors
        (zeros for the mean of root-mean-square scales)."""
        if self.scales == "rms8":
            return unpack_rms(tensors["scale"], dtype)
        if self.scales == "8bit":
            return unpack_scales(tensors["scale"], tensors["min"], dtype)
        return tensors["min"].to(dtype), tensors["scale"].to(dtype)

    def _fast(self, x: torch.Tensor) -> bool:
        """A few tokens coded per token on the CPU, no padding inside a group: the compiled path
        (codecs/fastquant.py; the same codes, bit for bit, Gaussian ones from PyTorch's mean and deviation)."""
        d = x.shape[-1]
        g = self.group or d
        return (self.axis == "token" and x.device.type == "cpu" and x.numel() <= FAST_ELEMENTS and d % g == 0
                and g * self.bits % 8 == 0)

    def _encode_compiled(self, x: torch.Tensor, block: int) -> Packed:
        b, h, t, d = x.shape
        x = x.float()
        if self.rotate:
            x = few_rows(x, rotation_on(d, self.seed, x.device))
        g = self.group or d
        rows = x.reshape(-1, d).contiguous().numpy()
        codes = np.empty((rows.shape[0], d * self.bits // 8), dtype=np.uint8)
        step = np.empty((rows.shape[0], d // g), dtype=np.uint16)
        mn = np.empty_like(step)
        if self.uniform:
            err = quantize_rows(rows, self.bits, d // g, codes, step, mn)
        else:  # the group's mean and deviation by PyTorch's reductions, as the PyTorch path takes them
            xg = x.reshape(-1, d // g, g)
            if self.scales == "rms8":  # a zero mean, coded by gauss_rows as the 8-bit scales' ratio 0 (not kept)
                mean, dev = torch.zeros_like(xg[..., 0]), xg.square().mean(-1).sqrt()
            else:
                mean, dev = xg.mean(-1), xg.std(-1, unbiased=False)
            err = gauss_rows(rows, mean.numpy(), dev.numpy(), self.bits, thresholds_on(self.levels, self.bits, _CPU).numpy(),
                             self.scales != "fp16", codes, step, mn)
        if err == 1:
            raise KvshrinkError("cannot quantize NaN or infinite key/value states")
        if err == 2 and self.scales != "fp16":
            raise KvshrinkError(OUT_OF_RANGE)
        if err == 2:
            raise KvshrinkError("key/value states exceed the float16 range of the quantization scales")
        lead = (b, h, t // block, block, d // g)
        if self.scales != "fp16":
            step, mn = (torch.from_numpy(a.astype(np.uint8)) for a in (step, mn))
        else:
            step, mn = (torch.from_numpy(a).view(torch.float16) for a in (step, mn))
        tensors = {"codes": torch.from_numpy(codes).view(*lead, -1), "scale": step.view(*lead, 1), "min": mn.view(*lead, 1)}
        if self.scales == "rms8":
            del tensors["min"]
        return Packed(tensors, block, d, {"last": g})

    def _fast_decode(self, packed: Packed) -> bool:
        """A few per-token codes on the CPU, whole bytes per group: the compiled path (the same values, to
        float32 rounding). Longer runs stay on PyTorch, whose ops use every core."""
        codes = packed.tensors["codes"]
        d = packed.head_dim
        return (self.axis == "token" and codes.device.type == "cpu" and (self.group or d) * self.bits % 8 == 0
                and packed.num_tokens * codes.shape[0] * codes.shape[1] * d <= FAST_DECODE_ELEMENTS)

    def _decode_compiled(self, packed: Packed, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        t = packed.tensors
        d = packed.head_dim
        b, h = t["codes"].shape[:2]
        codes = t["codes"].reshape(-1, d * self.bits // 8).numpy()
        groups = d // (self.group or d)
        if self.scales == "rms8":
            mn, sc = unpack_rms_numpy(t["scale"].numpy())
        elif self.scales == "8bit":
            mn, sc = unpack_scales_numpy(t["scale"].numpy(), t["min"].numpy())
        else:
            mn, sc = (t[k].numpy().astype(np.float32) for k in ("min", "scale"))
        x = np.empty((codes.shape[0], d), dtype=np.float32)
        lut = levels_on(self.levels, self.bits, _CPU).numpy()
        dequantize_rows(codes, self.bits, lut, mn.reshape(-1, groups), sc.reshape(-1, groups), x)
        y = torch.from_numpy(x).view(b, h, -1, d)
        if self.rotate:
            y = few_rows(y, rotation_on(d, self.seed, y.device).T)
        y = y.to(dtype)
        return y if out is None else out.copy_(y)

    def in_basis(self, packed: Packed) -> torch.Tensor:
        """(B, H, n, d) float32: per-token codes decoded in the rotated basis they were coded in, not turned back.
        A dot product with a query turned by `to_basis` equals the decoded key's (the rotation is orthogonal), so a
        few keys' logits skip the rotation of every key for one of the query."""
        if self.derope or self.axis != "token":
            raise KvshrinkError("in_basis reads per-token codes without RoPE turned back")
        mn, sc = self.params(packed.tensors)
        codes = self._levels_of(packed).float()
        return torch.addcmul(mn, codes, sc).reshape(*codes.shape[:2], -1, packed.head_dim)

    def to_basis(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) float32 in the basis `in_basis` decodes to."""
        return few_rows(x, rotation_on(x.shape[-1], self.seed, x.device)) if self.rotate else x

    def decode(self, packed: Packed, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._fast_decode(packed):
            return self._decode_compiled(packed, dtype, out)
        t = packed.tensors
        codes = self._levels_of(packed)
        b, h = codes.shape[:2]
        flat = (b, h, -1, packed.head_dim)
        if self.derope:  # turned back within groups: decode, then turn forward
            mn, sc = self.params(t)
            x = torch.addcmul(mn, codes.float(), sc).reshape(flat)
            if self.rotate:
                x = few_rows(x, rotation_on(packed.head_dim, self.seed, x.device).T)
            x = turn(x, self.derope, self.group, 1).to(dtype)
            return x if out is None else out.copy_(x)
        mn, sc = self.params(t, dtype)
        if self.rotate:
            x = torch.addcmul(mn, codes.to(dtype), sc).reshape(flat)
            r = rotation_on(packed.head_dim, self.seed, x.device).to(dtype).T
            return x @ r if out is None else out.copy_(x @ r)
        if out is None:
            return torch.addcmul(mn, codes.to(dtype), sc).reshape(flat)
        # write through a grouped view of the caller's slice: no temporary for the result
        torch.addcmul(mn, codes.to(dtype), sc, out=out.view(codes.shape))
        return out
