"""Options and presets of the ZDC family: low-rank keys and values (transform.py), alone or
with integer codes on top of the kept coordinates.

Names: `zdc-<pct>` keeps pct% of key and value dimensions in every head (only
the 4 sink tokens keep all); `zdc-adaptive-<pct>` spends the same budget per
layer, head and K/V where the calibration's loss proxy says it matters, and
splits by token: the sink tokens and the 64 most recent keep every coordinate
(measured: README); `+int4` / `+int3` quantize the kept coordinates (KIVI
layout). `zdc-mix-50` splits by importance instead (important.py): 10% of each
head's tokens, the most attended in a float16 window, keep every coordinate,
the rest 44%, so 50% on average (`mean`: the rest's share follows from `share`, so
`zdc-mix-50:share=0.2` keeps the bytes with the rest at 37.5%). The options are the
fields of `ZdcConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KvshrinkError
from ...registry import Config, Method, check_int, option, register

ADAPTIVE_WINDOW = 64
# a plain `kvshrink bench` runs these; the rest by name (--methods)
_IN_DEFAULT_BENCH = ("zdc-50", "zdc-adaptive-50", "zdc-adaptive-75+int3", "zdc-adaptive-50+int4")


@dataclass(frozen=True)
class ZdcConfig(Config):
    """Zero-delay low rank ("Zero-Delay QKV Compression", Zhang and Shen, arXiv 2408.04107)."""

    family = "lowrank"
    calibrated = True
    can_save = True  # core/saved.py (importance-aware: the window and high class beside the stores)
    pct: int = option(50, "percent of key/value dimensions kept (the budget)", preset=True)
    mean: int | None = option(None, "importance-aware presets: percent of dimensions kept on average over both "
                                    "classes; the other tokens' share of dimensions follows from `share`, so a "
                                    "share sweep keeps the bytes (None: `pct` for the other tokens)", preset=True)
    bits: int | None = option(None, "int codes on the kept coordinates (KIVI layout)", preset=True)
    alloc: str = option("fisher", "ranks per layer, head and K/V: uniform, by energy, or by a Fisher loss proxy",
                        ("uniform", "energy", "fisher"))
    sink: int = option(4, "first tokens kept at sink_rank coordinates, float16")
    sink_rank: int | None = option(None, "coordinates of sink and window tokens (None: all)")
    window: int = option(0, "most recent tokens kept at sink_rank coordinates, float16")
    block: int = option(128, "tokens per coded block")
    attend: str = option("fused", "decode steps: fused (compiled kernel reads the body) or decode (PyTorch)",
                         ("fused", "decode"))
    splits: int = option(4, "parallel ranges of blocks per head in the fused kernel")
    share: float = option(0.0, "share of each KV head's tokens that keep sink_rank coordinates, the most attended "
                               "while in the float16 window (importance-aware; 0: tokens split by position only)")
    gather: int = option(16, "decode tokens that leave the window together (importance-aware: picked among them)")
    observe: int = option(64, "the last query rows of a call whose attention scores the window (importance-aware)")
    demote: bool = option(True, "re-rank the important tokens as decoding goes on: one whose recent attention falls "
                                "below a leaving token's is cut to its head's rank (never widened back)")
    memory: int = option(256, "query rows over which an important token's attention is averaged for demotion")
    shares: str = option("uniform", "how the share is spread over layers (importance-aware): uniform, or allocated "
                                     "(one budget: per-layer shares from a calibrated KL per layer and share, the "
                                     "same bytes; measured once per model and ranks, about half an hour on 2 cores "
                                     "for the bundled one)", ("uniform", "allocated"))
    select: str = option("attention", "how the important tokens are picked: attention (observed in the window) or "
                                      "random (an ablation: the same share, by a seeded draw)", ("attention", "random"))
    crop: bool = option(False, "keep what a crop below the window needs (importance-aware): the place of each high "
                               "and each demoted token (int32 per head, counted in the bytes); without it a crop "
                               "reaches only into the window")

    @property
    def kept(self) -> float:
        """The fraction of dimensions the ranks keep: `pct`, or with `mean` what the low class keeps when `share`
        of the tokens keep every dimension and the average is `mean`."""
        if self.mean is None:
            return self.pct / 100
        return (self.mean / 100 - self.share) / (1 - self.share)

    def check(self):
        if not (isinstance(self.pct, int) and 0 < self.pct <= 100):
            raise KvshrinkError(f"ZDC keeps a percentage of dimensions in 1..100, got {self.pct!r}")
        check_int("bits", self.bits, 1, none=True)
        check_int("sink_rank", self.sink_rank, 1, none=True)
        for name, low in (("sink", 0), ("window", 0), ("block", 1), ("splits", 1), ("gather", 1), ("observe", 1),
                          ("memory", 1)):
            check_int(name, getattr(self, name), low)
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0 <= self.share <= 1:
            raise KvshrinkError(f"share must be a number from 0 to 1, got {self.share!r}")
        if self.mean is not None and not (self.share and 0 < self.kept <= 1):
            raise KvshrinkError(f"{self.mean}% of dimensions on average needs a share of important tokens (every "
                                f"dimension) below {self.mean / 100}, got share={self.share!r}")
        if self.shares == "allocated" and not self.share:
            raise KvshrinkError("allocated shares spread the important tokens over layers: give share > 0")
        if self.shares == "allocated" and self.sink_rank is not None:
            raise KvshrinkError("allocated shares are calibrated with important tokens at every coordinate: leave "
                                "sink_rank unset")
        if self.share and not self.window:
            raise KvshrinkError("importance-aware ZDC (share > 0) observes attention in a float16 window: give it "
                                "window >= 1")


def _register(name: str, description: str, **options) -> None:
    register(Method(name, ZdcConfig(**options), description, default=name in _IN_DEFAULT_BENCH))


for _pct in (75, 50):
    _register(f"zdc-{_pct}", f"ZDC low-rank: {_pct}% of key/value dims in every head, float16", pct=_pct,
              alloc="uniform")
    _register(f"zdc-adaptive-{_pct}", f"ZDC low-rank: {_pct}% of dims, ranks by a Fisher loss proxy, sinks and "
              f"{ADAPTIVE_WINDOW} recent tokens full rank, float16", pct=_pct, window=ADAPTIVE_WINDOW)
_register("zdc-mix-50", "importance-aware ZDC: 10% of each head's tokens (most attended in a float16 window of 16) "
          "keep every coordinate, the rest 44% (uniform ranks): 50% of dims on average", mean=50, alloc="uniform",
          share=0.1, window=16)
_register("zdc-50+int4", "ZDC 50% uniform, kept coordinates int4 (KIVI layout)", pct=50, alloc="uniform", bits=4)
for _pct, _bits in ((75, 4), (50, 4), (75, 3)):
    _register(f"zdc-adaptive-{_pct}+int{_bits}", f"ZDC {_pct}% adaptive, kept coordinates int{_bits} (KIVI layout)",
              pct=_pct, bits=_bits, window=ADAPTIVE_WINDOW)
