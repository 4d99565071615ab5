"""Options and presets of the integer family (cache.py): `fp16`, `int8` .. `int2`, `int8-rot` .. `int2-rot`.

KIVI layout (Liu et al., arXiv 2402.02750): keys per channel over `block` tokens, values per
token; `-rot` applies a seeded randomized Hadamard rotation to each head vector first (QuaRot,
arXiv 2404.00456).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KvshrinkError
from ...registry import Config, Method, check_int, option, register, register_hint

BITS = (8, 4, 3, 2)  # registered widths; the codec packs any of 1..8
ATTENDS = ("auto", "fused", "decode")
LEVELS = ("uniform", "gauss")  # codecs/levels.py's KINDS: listing methods imports no torch


@dataclass(frozen=True)
class QuantConfig(Config):
    """Group-wise asymmetric integer codes, KIVI layout, float16 sink tokens."""

    family = "quant"
    can_save = True  # core/saved.py
    bits: int = option(4, "bits per key and value code (1 to 8)", preset=True)
    rotate: bool = option(False, "randomized Hadamard rotation of each head vector first", preset=True)
    sink: int = option(4, "first tokens kept in float16 (attention sinks)")
    window: int = option(0, "most recent tokens kept in float16")
    levels: str = option("uniform", "the levels a code stands for: uniform (min + step * code) or gauss (mean + "
                                    "deviation * a Gaussian's Lloyd-Max level; 1 to 4 bits)", LEVELS)
    scales: str = option("fp16", "a group's two numbers: fp16, or 8bit (with levels=gauss: a byte each, "
                                 "codecs/scales.py)", ("fp16", "8bit"))
    block: int = option(128, "tokens per coded block (the key quantization group)")
    key_axis: str = option("channel", "keys quantized per channel (KIVI) or per token", ("channel", "token"))
    prerope: bool = option(False, "per-channel keys coded as before RoPE: each token turned back by its offset's "
                                  "RoPE angles within its group (codecs/spin.py)")
    value_group: int | None = option(None, "channels per value group (None: the whole head vector)")
    attend: str = option("auto", "decode steps: fused (compiled kernel reads the codes), decode (decode, "
                                 "then attend), auto (fused where the model uses the kvshrink attention)", ATTENDS)
    splits: int = option(4, "parallel ranges of blocks per head in the fused kernel")
    background: bool = option(False, "code filled blocks on a worker thread (slower on 2 cores)")

    def check(self):
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise_bits(self.bits)
        check_int("sink", self.sink)
        check_int("window", self.window)
        check_int("block", self.block, 1)
        check_int("splits", self.splits, 1)
        check_int("value_group", self.value_group, 1, none=True)
        if self.prerope and self.key_axis != "channel":
            raise KvshrinkError("prerope keys need per-channel codes (key_axis=channel)")
        if self.scales == "8bit" and self.levels != "gauss":
            raise KvshrinkError("scales=8bit needs levels=gauss (a uniform code's minimum and step must cover "
                                "its group exactly)")
        if self.levels == "gauss" and self.bits > 4:  # codecs/levels.py's GAUSS_BITS
            raise KvshrinkError(f"Gaussian levels have 1 to 4 bits, not {self.bits}")


@dataclass(frozen=True)
class Fp16Config(Config):
    """The uncompressed reference: keys and values stored as float16, no sink or window."""

    family = "quant"
    can_save = True  # core/saved.py
    block: int = option(128, "tokens per stored block")

    def check(self):
        check_int("block", self.block, 1)


def raise_bits(bits):
    raise KvshrinkError(f"impossible bit width {bits!r}: integer codes have 1 to 8 bits")


register_hint(r"int(\d+)(-rot)?", lambda m: (
    f"unknown method {m.group(0)!r}: integer codes have 1 to 8 bits and the registered widths are "
    f"{', '.join(f'int{b}' for b in BITS)} (each also -rot); any width 1..8 through "
    f"CompressedCache(config, key_codec=IntQuant(bits, 'channel', 128))"))

register(Method("fp16", Fp16Config(), "uncompressed reference: keys and values stored as float16", default=True))
for _bits in BITS:
    register(Method(f"int{_bits}", QuantConfig(bits=_bits),
                    f"{_bits}-bit KIVI layout: keys per channel over 128 tokens, values per token; fp16 sink 4",
                    default=True))
    register(Method(f"int{_bits}-rot", QuantConfig(bits=_bits, rotate=True),
                    f"int{_bits} after a randomized Hadamard rotation of each head vector", default=True))
