"""Builds the peers' caches: transformers' own `QuantizedCache`, measured in the same run as ours."""

from __future__ import annotations

from transformers import QuantizedCache

from ...errors import KvshrinkError
from ...spec import spec_from_config
from .config import AXIS, PeerConfig


def build(config: PeerConfig, target, method: str) -> QuantizedCache:
    model_config = getattr(target, "config", target)
    spec = spec_from_config(model_config)
    if spec.has_sliding:
        raise KvshrinkError(f"{method}: transformers' QuantizedCache serves full-attention layers only, and "
                            f"{spec.model_type!r} has sliding-window layers")
    axis = AXIS[config.backend]
    return QuantizedCache(backend=config.backend, config=model_config, nbits=config.bits, axis_key=axis,
                          axis_value=axis)


def prepare(config: PeerConfig, model, tokenizer=None, corpus=None):
    """Nothing to change: transformers' own cache under the model's own attention."""
    return model
