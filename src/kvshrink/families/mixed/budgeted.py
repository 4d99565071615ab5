"""MixedBudgetCache: one budget's per-layer codecs (families/budget) as the body of importance-aware layers
(cache.py): `mix-auto-6x`, `mix-auto:budget=N` (issue 23: `auto-Nx` with a priced high class).

A share of each KV head's tokens, those attention picked out while they sat in the observation window, keep
per-token `high`-bit codes; the rest go to the body in the codecs the allocation chose for their layer. The
allocator pays for the high class, its scores and the window (8-bit codes, or float16) from the same bytes
(budget/allocate.HighClass), so the whole cache meets the named ratio at `context` tokens, as `auto-Nx` does; the
body is therefore allocated a little tighter than `auto-Nx`'s. The body's calibration is the budget's: the high class's gain is not in its proxy.
With `shares=allocated` the share is then spread over layers by a calibration of that gain over this body
(autoshares.py), within the same high-class bytes.
"""

from __future__ import annotations

import weakref

from ...attention.function import use_kvshrink_attention
from ...spec import spec_from_config
from ..budget import cache as budget
from ..budget.allocate import HighClass, window_codec
from . import allocate, autoshares
from .cache import Classes, MixedLayer
from .config import MixedBudgetConfig

_CALIBS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {body digest: share calibration}


class MixedBudgetCache(Classes, budget.BudgetCache):
    """A BudgetCache of MixedLayers: the allocation's codecs for the low class, `high`-bit codes for the high."""

    layer_cls = MixedLayer

    def __init__(self, config, chosen: budget.Chosen, mixed: MixedBudgetConfig, method: str | None = None,
                 shares: list[float] | None = None):
        """shares: one per layer (allocate.choose over autoshares' calibration), else `mixed.share` everywhere."""
        super().__init__(config, chosen.allocation, chosen.path, mixed.block, chosen.data, chosen.found, chosen.tables,
                         chosen.vectors, chosen.shares, sink=mixed.sink, window=0, attend="fused", splits=mixed.splits,
                         method=method)
        self.setup_classes(high_codec(mixed), mixed, shares)

    def _describe(self) -> str:
        return f"{self.classes_described()}; {self.window_described()}; the rest: {super()._describe()}"


def high_codec(config: MixedBudgetConfig):
    """The high class's per-token codes: rotated, over the whole head (the budget's window codec of that width)."""
    return window_codec(config.high)


def chosen_for(config: MixedBudgetConfig, model, method: str) -> budget.Chosen:
    """The body's allocation, the uniform share's high class paid for from the same bytes."""
    return budget.allocation_for(config, model, method, HighClass(config.share, high_codec(config), config.crop))


def shares_for(model, config: MixedBudgetConfig, chosen: budget.Chosen, tokenizer=None, corpus=None,
               name: str = "mix-auto") -> allocate.ShareCalibration:
    """The share calibration over this allocation's body: memo; else, with a tokenizer, the file for the budget's
    calibration tokens (measured first if missing); else any file for this body; else a clear error."""
    key = autoshares.digest(chosen, config.high, config.block, config.sink)
    memo = _CALIBS.setdefault(model, {})
    if key not in memo:
        spec = spec_from_config(model.config)
        pairs = budget.layer_codecs(chosen.allocation, config.block, spec.rope, chosen.found, chosen.tables,
                                    chosen.vectors)
        calib = allocate.load_or_measure(
            model, tokenizer, corpus, lambda data: autoshares.default_path(model, data, key),
            lambda: autoshares.found(model, key),
            lambda ids, data, go: autoshares.calibrate(model, ids, pairs, high_codec(config), config.sink,
                                                       config.block, key, data, go), name, autoshares.GRID)
        calib.check(model, name, body=key)
        memo[key] = calib
    return memo[key]


def build(config: MixedBudgetConfig, model, method: str) -> MixedBudgetCache:
    """Every call attends through MixedStates (they score the window): the model uses the kvshrink attention."""
    chosen = chosen_for(config, model, method)
    shares = None
    if config.shares == "allocated":
        calib = shares_for(model, config, chosen, name=method.split(":")[0])
        shares = allocate.choose(calib, config.share, autoshares.extra(chosen.allocation, high_codec(config),
                                                                       spec_from_config(model.config)))
    return MixedBudgetCache(model.config, chosen, config, method, shares)


def prepare(config: MixedBudgetConfig, model, tokenizer=None, corpus=None):
    """The budget's calibrations loaded or measured, the model on the kvshrink attention, and allocated shares'
    calibration loaded or measured (150 forward passes: half an hour on 2 cores for the bundled model)."""
    budget.prepare(config, model, tokenizer, corpus)
    use_kvshrink_attention(model)
    if config.shares == "allocated":
        shares_for(model, config, chosen_for(config, model, "mix-auto"), tokenizer, corpus)
    return model
