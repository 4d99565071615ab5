"""Options and presets of the RVQ family (codecs/rvq.py): learned residual codebooks per layer.

  rvq-d{1..8}        depth 1 to 8, groups of 16 channels (strided for keys, contiguous for
                     values), 256 codewords (one byte per code), float16 sink of 4 tokens;
                     decode steps attend straight from the codes (a compiled kernel on the
                     CPU, kernel.py)
  rvq-d{2,4}+window  the same with the 64 most recent tokens kept in float16

The options are the fields of `RvqConfig`; the codebooks are learned on first use (`kvshrink
calibrate --method rvq` does it ahead).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KvshrinkError
from ...registry import Config, Method, check_int, option, register

LAYOUT = dict(group=16, size=256, key_grouping="strided", value_grouping="contiguous")
GROUPINGS = ("strided", "contiguous")
WINDOW = 64
DEFAULT = ("rvq-d4", "rvq-d8")


@dataclass(frozen=True)
class RvqConfig(Config):
    """Residual vector quantization of scaled channel groups (Kumar, arXiv 2410.15704)."""

    family = "rvq"
    can_save = True  # core/saved.py
    calibrated = True
    depth: int = option(4, "residual codebook levels (1 to 8)", preset=True)
    group: int = option(16, "channels per vector")
    size: int = option(256, "codewords per level (a power of two, at most 256)")
    key_grouping: str = option("strided", "channel groups of keys", GROUPINGS)
    value_grouping: str = option("contiguous", "channel groups of values", GROUPINGS)
    attend: str = option("fused", "decode steps: fused (compiled kernel from the codes), codes (PyTorch from the "
                                  "codes) or decode (decode the history, then attend)", ("fused", "codes", "decode"))
    sink: int = option(4, "first tokens kept in float16")
    window: int = option(0, "most recent tokens kept in float16")

    def check(self):
        if not (isinstance(self.depth, int) and 1 <= self.depth <= 8):
            raise KvshrinkError(f"RVQ depth must be 1 to 8, got {self.depth!r}")
        check_int("group", self.group, 1)
        check_int("size", self.size, 2)
        check_int("sink", self.sink)
        check_int("window", self.window)


for _d in range(1, 9):
    register(Method(f"rvq-d{_d}", RvqConfig(depth=_d), f"RVQ depth {_d}: learned residual codebooks per layer, "
                    "16-channel groups (keys strided, values contiguous), 256 codewords, attention from the codes",
                    default=f"rvq-d{_d}" in DEFAULT))
for _d in (2, 4):
    register(Method(f"rvq-d{_d}+window", RvqConfig(depth=_d, window=WINDOW),
                    f"rvq-d{_d} with the {WINDOW} most recent tokens in float16"))
