"""MixedBudgetCache: one budget's per-layer codecs (families/budget) as the body of importance-aware layers
(cache.py): `mix-auto-6x`, `mix-auto:budget=N` (issue 23: `auto-Nx` with a priced high class).

A share of each KV head's tokens, those attention picked out while they sat in the float16 observation window, keep
per-token `high`-bit codes; the rest go to the body in the codecs the allocation chose for their layer. The
allocator pays for the high class, its scores and the float16 window from the same bytes (budget/allocate.HighClass),
so the whole cache meets the named ratio at `context` tokens, as `auto-Nx` does; the body is therefore allocated a
little tighter than `auto-Nx`'s. The calibration is the budget's: the high class's gain is not in its proxy.
"""

from __future__ import annotations

from ...attention.function import use_kvshrink_attention
from ..budget import cache as budget
from ..budget.allocate import HighClass, window_codec
from .cache import Classes, MixedLayer
from .config import MixedBudgetConfig


class MixedBudgetCache(Classes, budget.BudgetCache):
    """A BudgetCache of MixedLayers: the allocation's codecs for the low class, `high`-bit codes for the high."""

    layer_cls = MixedLayer

    def __init__(self, config, chosen: budget.Chosen, mixed: MixedBudgetConfig, method: str | None = None):
        super().__init__(config, chosen.allocation, chosen.path, mixed.block, chosen.data, chosen.found, chosen.tables,
                         chosen.vectors, sink=mixed.sink, window=0, attend="fused", splits=mixed.splits,
                         method=method)
        self.setup_classes(high_codec(mixed), mixed)

    def _describe(self) -> str:
        return f"{self.classes_described()}; {self.window_described()}; the rest: {super()._describe()}"


def high_codec(config: MixedBudgetConfig):
    """The high class's per-token codes: rotated, over the whole head (the budget's window codec of that width)."""
    return window_codec(config.high)


def build(config: MixedBudgetConfig, model, method: str) -> MixedBudgetCache:
    """Every call attends through MixedStates (they score the window): the model uses the kvshrink attention."""
    chosen = budget.allocation_for(config, model, method, HighClass(config.share, high_codec(config)))
    return MixedBudgetCache(model.config, chosen, config, method)


def prepare(config: MixedBudgetConfig, model, tokenizer=None, corpus=None):
    """The budget's calibrations loaded or measured, and the model on the kvshrink attention."""
    budget.prepare(config, model, tokenizer, corpus)
    use_kvshrink_attention(model)
    return model
