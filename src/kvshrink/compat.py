"""The transformers 5.x API as it moves (a leaf): later 5.x releases take a model's cache as
`cache=` and deprecate `past_key_values=` (earlier ones know only the old name), and name each
layer's type with a helper that early ones lack."""

from __future__ import annotations

import functools
import inspect

try:
    from transformers.cache_utils import get_layer_types_and_kwargs as _layer_types_and_kwargs
except ImportError:  # early 5.x releases
    _layer_types_and_kwargs = None
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The keyword argument that hands `cache` to `model(...)` or `model.generate(...)` in this
    transformers release: {"cache": cache} where it is known, else {"past_key_values": cache}."""
    return {_cache_keyword(type(model).forward): cache}


def layer_types(text_config) -> tuple[list[str], list]:
    """(layer type per layer, the sliding window of each sliding layer or None), as the installed
    transformers sees them; early 5.x releases without its helper read `layer_types` or a
    `sliding_window` on every layer."""
    if _layer_types_and_kwargs is not None:
        types, kwargs = _layer_types_and_kwargs(text_config)
        return list(types), [kw.get("sliding_window") for kw in kwargs]
    n = text_config.num_hidden_layers
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * n
    return list(types), [window if t == "sliding_attention" else None for t in types]


def rope_frequencies(text_config) -> tuple[float, ...]:
    """The rotary inverse frequencies of a config's full-attention layers (rotate-half pairs (i, i + n) of
    the first 2n channels), as transformers computes them for its RoPE type; () where the config names no
    RoPE. What a key codec undoes within a group (codecs/spin.py): a wrong guess costs only quality."""
    params = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(params.get("full_attention"), dict):  # one set per layer type (Gemma 3)
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    if not theta:
        return ()
    heads = getattr(text_config, "num_attention_heads", 1)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    partial = params.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", 1.0)) or 1.0
    dim = int(head_dim * partial) // 2 * 2
    kind = params.get("rope_type", "default")
    if kind != "default":
        try:  # scaled RoPE types change some frequencies (llama3, yarn, ...)
            freqs = ROPE_INIT_FUNCTIONS[kind](text_config, None)[0]
            if freqs.numel() * 2 <= head_dim:
                return tuple(float(f) for f in freqs)
        except Exception:  # an unknown type or signature: the unscaled frequencies below are close
            pass
    return tuple(float(theta) ** (-i / dim) for i in range(0, dim, 2))
