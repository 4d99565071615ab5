"""Options and presets of the eviction family over a PagedCache (cache.py).

  kvc-{2..64}x     KV-Compress: variable per-head budgets ranked across layers and heads,
                   squared attention scores (Rehg, arXiv 2410.00161)
  snapkv-{2..64}x  SnapKV: the same budget split evenly over heads, summed attention
                   pooled over 5 neighbours (Li et al., arXiv 2404.14469)
  kvc-8x+int4      eviction, then the kept rows as 4-bit codes (Hadamard-rotated, per token)

The options are the fields of `EvictConfig` (`kvshrink methods` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KvshrinkError
from ...registry import Config, Method, check_int, option, register

RATIOS = (2, 4, 8, 16, 32, 64)
ALLOCS = ("variable", "uniform")
SCORES = ("square", "sum")
NORMS = ("none", "head", "layer")
POOLINGS = ("avg", "max")
ATTENDS = ("fused", "decode")
DEFAULT = ("kvc-8x", "snapkv-8x", "kvc-8x+int4")


@dataclass(frozen=True)
class EvictConfig(Config):
    """Paged per-head eviction (KV-Compress, Rehg, arXiv 2410.00161; SnapKV, Li et al., arXiv 2404.14469)."""

    family = "evict"
    ratio: float = option(8.0, "compression ratio: real tokens x layers x heads / ratio are kept", preset=True)
    bits: int | None = option(None, "kept rows as per-token int codes of this many bits (rotated)", preset=True)
    tokens: int | None = option(None, "absolute budget instead of the ratio: tokens per head on average")
    alloc: str = option("variable", "variable: budgets ranked across layers and heads; uniform: one per head",
                        ALLOCS)
    score: str = option("square", "token score: squared (KV-Compress) or summed (SnapKV) attention",
                        SCORES)
    pool: int = option(0, "pooling width over neighbouring tokens' scores (0: none)")
    obs: int = option(32, "observation window: the last queries of a call that score the tokens")
    sink: int = option(4, "first tokens never evicted")
    window: int = option(8, "most recent tokens never evicted")
    block: int = option(16, "tokens per paged block")
    interval: int | None = option(None, "decode steps between evictions (None: one block)")
    defer: int = option(0, "the first N multi-token calls are stored whole, evicted after the next")
    norm: str = option("none", "scores divided by each head's or layer's total before ranking",
                       NORMS)
    pooling: str = option("avg", "pooling of neighbours' scores (max keeps spans whole)", POOLINGS)
    attend: str = option("fused", "decode steps: fused (kernel reads kept rows in place) or decode (gather)",
                         ATTENDS)

    def check(self):
        if not (isinstance(self.ratio, (int, float)) and self.ratio >= 1):
            raise KvshrinkError(f"compression ratio must be a number >= 1, got {self.ratio!r}")
        check_int("tokens", self.tokens, 1, none=True)
        check_int("bits", self.bits, 1, none=True)
        for name, low in (("pool", 0), ("obs", 1), ("sink", 0), ("window", 0), ("block", 1), ("defer", 0)):
            check_int(name, getattr(self, name), low)
        check_int("interval", self.interval, 1, none=True)


for _r in RATIOS:
    register(Method(f"kvc-{_r}x", EvictConfig(ratio=_r), f"KV-Compress: evict to 1/{_r} of the tokens, variable "
                    "per-head budgets, squared attention scores, paged blocks of 16", default=f"kvc-{_r}x" in DEFAULT))
    register(Method(f"snapkv-{_r}x", EvictConfig(ratio=_r, alloc="uniform", score="sum", pool=5),
                    f"SnapKV: evict to 1/{_r} of the tokens, the same budget for every head, attention pooled "
                    "over 5 tokens", default=f"snapkv-{_r}x" in DEFAULT))
for _r in (4, 8):
    register(Method(f"kvc-{_r}x+int4", EvictConfig(ratio=_r, bits=4), f"kvc-{_r}x with kept rows as 4-bit codes "
                    "(Hadamard-rotated, per token)", default=f"kvc-{_r}x+int4" in DEFAULT))
