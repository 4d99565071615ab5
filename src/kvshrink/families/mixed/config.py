"""Options and presets of importance-aware integer codes (cache.py): `mix-int2`, `mix-int3`, and over one budget's
per-layer codecs (budgeted.py): `mix-auto-6x`.

Every token is kept, at one of two precisions: a share of each KV head's tokens, those that received the most
attention while they were recent, keep `high`-bit per-token codes; the rest go to a KIVI `low`-bit body (keys per
channel over `block` tokens, values per token), as MiKV and ZipCache keep tokens at mixed precision by importance.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KvshrinkError
from ...registry import Config, Method, check_int, option, register
from ..budget.config import JOINT1_PRESETS, JOINT_PRESETS, BudgetConfig
from ..quant.config import ATTENDS

SELECTS = ("attention", "random")
SHARINGS = ("uniform", "allocated")


@dataclass(frozen=True)
class Observing:
    """How an importance-aware cache observes its window and picks and re-ranks its high class (both configs here)."""

    select: str = option("attention", "how the important tokens are picked: attention (the mean attention a token "
                                      "received from the queries after it while in the window) or random (an "
                                      "ablation: the same share, picked by a seeded draw)", SELECTS)
    demote: bool = option(True, "re-rank the important tokens as decoding goes on: one whose recent attention "
                                "falls below a leaving token's is re-coded down to the body (never back up)")
    memory: int = option(256, "query rows over which an important token's attention is averaged for demotion "
                              "(an exponential moving average)")
    window: int = option(16, "most recent tokens held while their attention is observed")
    window_bits: int = option(16, "the window's width: float16 (16), or the high class's (`high`: its per-token "
                                  "codes from arrival; a leaving token's codes move to the high class as they are)")
    gather: int = option(16, "decode tokens that leave the window together (the important ones picked among them)")
    observe: int = option(64, "the last query rows of a call whose attention scores the window (an observation "
                              "window, as SnapKV's)")
    crop: bool = option(False, "keep what a crop below the observation window needs: the place of each high and each "
                               "demoted token (int32 per head, counted in the bytes; demotions add 1-2% at 6x); "
                               "without it a crop reaches only into the window")
    shares: str = option("uniform", "how the share is spread over layers: uniform (every layer keeps `share`) or "
                                     "allocated (one budget: per-layer shares from a calibrated KL per layer and "
                                     "share, no more high-class bytes in all; measured once per model and body: "
                                     "half an hour on 2 cores for the bundled one)", SHARINGS)

    def check_observing(self):
        if self.window_bits not in (16, self.high):
            raise KvshrinkError(f"window_bits={self.window_bits!r}: the observation window is float16 (16) or in "
                                f"the high class's codes (high={self.high}): set window_bits={self.high} or 16")
        check_int("window", self.window, 1)
        check_int("gather", self.gather, 1)
        check_int("observe", self.observe, 1)
        check_int("memory", self.memory, 1)


@dataclass(frozen=True)
class MixedConfig(Observing, Config):
    """Two precision classes of tokens, chosen by the attention they receive in an observation window."""

    family = "mixed"
    can_save = True  # core/saved.py: the window and the high class beside the stores
    low: int = option(2, "bits of the body's codes (KIVI layout: keys per channel, values per token)", preset=True)
    high: int = option(4, "bits of the important tokens' per-token codes (keys and values, Hadamard-rotated)")
    share: float = option(0.1, "share of each KV head's tokens kept at `high` bits (0 to 1)")
    sink: int = option(4, "first tokens kept in float16 (attention sinks)")
    block: int = option(128, "tokens per coded block of the body (the key quantization group)")
    rotate: bool = option(False, "randomized Hadamard rotation of the body's head vectors first", preset=True)
    attend: str = option("auto", "decode steps: fused (compiled kernel reads both classes' codes), decode "
                                 "(decode, then attend), auto (fused where the model uses the kvshrink attention)",
                         ATTENDS)
    splits: int = option(4, "parallel ranges of blocks per head in the fused kernel")

    def check(self):
        for name in ("low", "high"):
            bits = getattr(self, name)
            if not (isinstance(bits, int) and 1 <= bits <= 8):
                raise KvshrinkError(f"impossible bit width {name}={bits!r}: integer codes have 1 to 8 bits")
        if self.high <= self.low:
            raise KvshrinkError(f"important tokens need more bits than the rest: high={self.high}, low={self.low}")
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0 <= self.share <= 1:
            raise KvshrinkError(f"share must be a number from 0 to 1, got {self.share!r}")
        self.check_observing()
        check_int("sink", self.sink)
        check_int("block", self.block, 1)
        check_int("splits", self.splits, 1)


register(Method("mix-int2", MixedConfig(low=2, high=4, rotate=True),
                "importance-aware int: 10% of each head's tokens (most attended while recent) at 4 bits per token, "
                "the rest int2-rot (KIVI); float16 sink 4 and window 16"))
register(Method("mix-int3", MixedConfig(low=3, high=6, rotate=True),
                "importance-aware int: 10% of each head's tokens at 6 bits per token, the rest int3-rot (KIVI)"))


@dataclass(frozen=True)
class MixedBudgetConfig(Observing, BudgetConfig):
    """One budget's per-layer codecs (families/budget) as the body, and a high class of the tokens attention picks out,
    paid for from the same bytes (budgeted.py)."""

    family = "mixed"
    share: float = option(0.01, "share of each KV head's tokens kept in `high`-bit per-token codes, picked by the "
                                 "attention they received in the observation window (0 to 1)")
    high: int = option(8, "bits of the important tokens' per-token codes (keys and values, Hadamard-rotated)")
    # the window in the high class's codes, as auto-Nx's 8-bit window: 10% less KL than float16 at 6x (docs/mixed.md)
    window_bits: int = option(8, "the window's width: the high class's (its per-token codes from arrival, a leaving "
                                 "token's codes moved to the high class as they are; set it with `high`) or 16 "
                                 "(float16)")

    def check(self):
        super().check()
        if not (isinstance(self.high, int) and 2 <= self.high <= 8):
            raise KvshrinkError(f"impossible bit width high={self.high!r}: the high class has 2 to 8 bits")
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0 <= self.share <= 1:
            raise KvshrinkError(f"share must be a number from 0 to 1, got {self.share!r}")
        self.check_observing()
        if self.heads and self.shares == "allocated":
            raise KvshrinkError("heads=N with shares=allocated is not built: the shares' calibration codes each "
                                "layer with one codec pair (use one of the two)")


register(Method("mix-auto", MixedBudgetConfig(), "one budget (auto:budget=N) with an importance-aware high class: "
                "1% of each head's tokens at 8 bits per token, picked by attention, paid for from the same bytes"))
# 6x only: at 8x the high class and the window take 3-6% of the bytes and the body's loss rises more than
# the class takes off (+5.88% against auto-8x's +5.50%, docs/mixed.md, "The observation window in 8-bit codes")
register(Method("mix-auto-6x", MixedBudgetConfig(budget=6.0, joint=6 in JOINT_PRESETS, joint1=6 in JOINT1_PRESETS),
                "auto-6x's one budget with 1% of each head's tokens (most attended while recent) at 8 bits per token "
                "and a window of 16 in 8-bit codes, all within the same bytes"))
