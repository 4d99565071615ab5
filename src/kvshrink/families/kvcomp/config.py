"""Options and presets of the KVComp family (cache.py): error-bounded quantization + Huffman codes.

  kvcomp-eb{B}   relative error bound B for keys and values, keys per channel in blocks of
                 64 tokens, values per token in blocks of 128, Huffman tables per layer and
                 keys/values, float16 sink of 4 tokens; decode steps decompress each block
                 inside the attention kernel

The options are the fields of `KVCompConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KvshrinkError
from ...registry import Config, Method, check_int, option, register

BOUNDS = (0.05, 0.1, 0.2, 0.3)
DEFAULT = ("kvcomp-eb0.1",)


@dataclass(frozen=True)
class KVCompConfig(Config):
    """Error-bounded block quantization + Huffman codes, decoded inside attention ("KVComp", arXiv 2509.00579)."""

    family = "kvcomp"
    can_save = True
    eb: float = option(0.1, "relative error bound for keys and values")
    keb: float | None = option(None, "error bound for keys alone")
    veb: float | None = option(None, "error bound for values alone")
    entropy: bool = option(True, "Huffman-code the symbols (0: the same symbols as fixed-width packed integers)")
    attend: str = option("fused", "decode steps: fused (kernel decodes each block where it is used) or decode",
                         ("fused", "decode"))
    drift: float = option(0.05, "Huffman table refresh threshold (relative code length growth)")
    sink: int = option(4, "first tokens kept in float16")
    window: int = option(0, "recent tokens kept in float16 at least")
    key_block: int = option(64, "tokens per key block (quantized per channel)")
    value_block: int = option(128, "tokens per value block (a multiple of key_block)")
    splits: int = option(4, "parallel ranges per head in the fused kernel")
    background: bool = option(True, "code filled value blocks on a worker thread, off the decode step")

    def check(self):
        for name in ("eb", "keb", "veb", "drift"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise KvshrinkError(f"{name} must be a non-negative number, got {v!r}")
        for name, low in (("sink", 0), ("window", 0), ("key_block", 1), ("value_block", 1), ("splits", 1)):
            check_int(name, getattr(self, name), low)
        for name, v in (("keys", self.eb if self.keb is None else self.keb),
                        ("values", self.eb if self.veb is None else self.veb)):
            # the codec refuses these too (codecs/errbound.py); here they fail before torch and the model load
            if not 1 / 255 <= v <= 1:
                raise KvshrinkError(f"impossible error bound {v!r} for {name}: use a relative bound from 1/255 "
                                    "(0.004) to 1")
        if self.value_block % self.key_block:
            raise KvshrinkError(f"value_block {self.value_block} is not a multiple of key_block {self.key_block}")


for _b in BOUNDS:
    register(Method(f"kvcomp-eb{_b}", KVCompConfig(eb=_b), f"KVComp: error bound {_b} (keys per channel, values "
                    "per token), Huffman-coded blocks decoded inside attention", default=f"kvcomp-eb{_b}" in DEFAULT))
