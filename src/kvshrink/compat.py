"""The transformers 5.x API as it moves (a leaf): later 5.x releases take a model's cache as
`cache=` and deprecate `past_key_values=`; earlier ones know only the old name."""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The keyword argument that hands `cache` to `model(...)` or `model.generate(...)` in this
    transformers release: {"cache": cache} where it is known, else {"past_key_values": cache}."""
    return {_cache_keyword(type(model).forward): cache}
