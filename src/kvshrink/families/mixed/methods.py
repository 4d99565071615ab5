"""The mixed family's builder (api.py): classes over fixed int widths (cache.py) or over one budget's per-layer
codecs (budgeted.py), by the config's kind."""

from __future__ import annotations

from . import budgeted, cache
from .config import MixedBudgetConfig


def build(config, target, method: str):
    if isinstance(config, MixedBudgetConfig):
        return budgeted.build(config, target, method)
    return cache.build(config, target, method)


def prepare(config, model, tokenizer=None, corpus=None):
    if isinstance(config, MixedBudgetConfig):
        return budgeted.prepare(config, model, tokenizer, corpus)
    return cache.prepare(config, model, tokenizer, corpus)
