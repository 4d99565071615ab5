"""Options and presets of the budget family (allocate.py, cache.py): `auto-4x` .. `auto-8x`, `auto`.

A user names a target ratio against an fp16 cache; one allocator spends it across layers and
keys/values (bits 1 to 8, Hadamard rotation or not, key groups of 128 or 64 tokens, keys turned back
by their offset's RoPE angles or not, value groups of the whole head or 32 channels, uniform or
Gaussian value levels, the latter with 8-bit scales; for keys also a calibrated basis per KV head with
bits per axis, `joint`; for values also vector levels, `vector`) where the calibration's loss proxy says it
matters least. The ratio is met at `context` tokens after a prefill, counting everything the cache holds
there (float16 sink, the partial block's keys at the stage's width, scales), so the bench's figure is the
target and not a nominal one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KvshrinkError
from ...registry import Config, Method, check_int, option, register

PRESETS = (4, 5, 6, 8)
CONTEXT = 2048  # tokens at which a ratio is met by default: the bench's segment
# A measured choice's KL is taken with each query reading the RECENT positions before it unchanged
# (attention/logits.recent_attention), as a cache's queries read their own chunk, float16 tokens and window. 16: a
# generated token's own span (a window of 16). Against every position coded (0) it cut auto-6x's KL by 22% on the
# protocol and by 11% token by token; 32 cut the protocol's more but raised the token-by-token KL by 30%, the
# positions 17-32 back being coded when generating: docs/budget.md, "Proxies that see the recent tokens".
# A change of RECENT needs a FORMAT change in allocate.py and joint.py (the joint file's name follows it).
RECENT = 16


@dataclass(frozen=True)
class BudgetConfig(Config):
    """Integer codes (KIVI layout) with widths allocated per layer and K/V under one budget."""

    family = "budget"
    can_save = True  # core/saved.py
    calibrated = True
    budget: float = option(6.0, "target compression ratio against an fp16 cache, met at `context` tokens")
    context: int = option(CONTEXT, "tokens at which the ratio is met (sink, partial block and scales counted)")
    sink: int = option(4, "first tokens kept in float16 (attention sinks)")
    window: int = option(0, "most recent tokens kept at `window_bits`, paid for from the budget (16 in auto-6x, auto-8x)")
    window_bits: int = option(8, "the window's width: per-token codes of 4 to 8 bits (rotated), or 16 (float16)")
    block: int = option(128, "tokens per coded block (the key quantization group)")
    attend: str = option("auto", "decode steps: fused (compiled kernel reads the codes), decode, or auto",
                         ("auto", "fused", "decode"))
    splits: int = option(4, "parallel ranges of blocks per head in the fused kernel")
    joint: bool = option(False, "offer joint-basis keys (a calibrated basis per KV head, bits per axis; 0.5 to 4 bits "
                                "a channel in steps of half a bit) beside the menu's key codes (on in auto-6x and "
                                "auto-8x, where they measured better; at 4x the allocator over-trusts them, "
                                "docs/budget.md)")
    joint1: bool = option(False, "offer joint-basis keys at one bit a channel (about 24 of 64 axes coded, the rest their "
                                 "block's mean; on in auto-8x, where it halved the perplexity change; needs joint=true)")
    entropy: bool = option(False, "entropy-code the joint-basis keys' symbols and the turned 2- and 3-bit menu keys' "
                                  "(one Huffman code per width, fitted at "
                                  "calibration), and allocate on their coded bytes (needs joint=true)")
    vector: bool = option(False, "offer values in vector levels (runs of 8 or 4 rotated coordinates a byte, a "
                                 "k-means codebook of the Gaussian: 11-17% less squared error at 1 and 2 bits) "
                                 "beside the menu's value codes")

    heads: int = option(0, "allocate per KV head in the N layers whose calibrated loss sits most in one head (0: per "
                           "layer everywhere): each head's loss is its layer's times its measured share, and a layer "
                           "whose heads differ is held in head groups, a kernel call per group (8 in auto-6x and "
                           "auto-8x; entropy=true and vector=true need heads=0)")

    def check(self):
        if not isinstance(self.budget, (int, float)) or not 1.0 <= self.budget <= 32.0:
            raise KvshrinkError(f"budget must be a ratio between 1 and 32 (x fp16), got {self.budget!r}")
        check_int("sink", self.sink)
        check_int("window", self.window)
        if self.window_bits not in (4, 5, 6, 8, 16):
            raise KvshrinkError(f"window_bits must be 4, 5, 6, 8 or 16 (float16), got {self.window_bits!r}")
        check_int("block", self.block, 1)
        check_int("splits", self.splits, 1)
        check_int("context", self.context, 1)
        check_int("heads", self.heads)
        if self.joint1 and not self.joint:
            raise KvshrinkError("joint1=true offers a joint-basis key choice: it needs joint=true")
        if self.entropy and not self.joint:
            raise KvshrinkError("entropy=true codes the joint-basis keys: it needs joint=true")
        if self.heads and (self.entropy or self.vector):
            raise KvshrinkError("heads=N codes a layer's KV heads apart: entropy-coded keys and vector values "
                                "cannot be split by heads yet (use heads=0 with them)")
        if self.context <= self.sink + self.window + self.block:
            raise KvshrinkError(f"context {self.context} leaves no coded block after {self.sink} sink tokens, "
                                f"a window of {self.window} and a block of {self.block}")


register(Method("auto", BudgetConfig(), "one budget for the whole cache (auto:budget=N): int widths, rotation, "
                "groups and value levels allocated per layer and K/V by a calibrated loss proxy"))
JOINT_PRESETS = (6, 8)  # joint keys measured better there (docs/budget.md), worse at 4x
# one bit a channel (joint.ONE_BIT): at 8x +5.50% against +11.86%; at 6x 4% less KL but +2.15% against +1.76%
# (docs/budget.md, "One bit a channel")
JOINT1_PRESETS = (8,)
# the recent window: 13-15% less KL at 6x and 8x in the protocol, 33% token by token at 6x; none at 4x, where
# its decode cost (4% at 8k) buys nothing (docs/budget.md, "The recent window")
WINDOW_PRESETS = {6: 16, 8: 16}
# one choice per KV head in the 8 layers whose loss sits most in one head: auto-6x +0.81% against +1.76%, auto-8x
# +4.60% against +5.50%, decode at 8k 1.07x and 1.06x against 1.13x and 1.16x (all 30 layers: +0.98% and +4.69% at
# 0.96x and 0.99x; docs/budget.md, "One choice per KV head")
HEADS_PRESETS = {6: 8, 8: 8}
for _r in PRESETS:
    _w = WINDOW_PRESETS.get(_r, 0)
    register(Method(f"auto-{_r}x", BudgetConfig(budget=float(_r), joint=_r in JOINT_PRESETS, window=_w,
                                                joint1=_r in JOINT1_PRESETS, heads=HEADS_PRESETS.get(_r, 0)),
                    f"one budget: {_r}x fp16 at 2,048 tokens, int widths allocated per layer and K/V by a calibrated "
                    f"loss proxy{', joint-basis keys on offer' if _r in JOINT_PRESETS else ''}"
                    f"{' (down to one bit a channel)' if _r in JOINT1_PRESETS else ''}"
                    f"{f', the {_w} most recent tokens in 8-bit codes' if _w else ''}"
                    f"{f', per KV head in {HEADS_PRESETS[_r]} layers' if _r in HEADS_PRESETS else ''}",
                    default=_r in (4, 6)))
