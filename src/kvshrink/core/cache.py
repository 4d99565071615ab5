"""KVCache: the base of every kvshrink cache, a transformers `Cache` of `StoreLayer`s.

It adds what a user asks of any compressed cache, once: the bytes really held (`nbytes`, read
from the layers' tensors), the fp16 bytes of the same tokens and their ratio (DESIGN.md), the
method it was built for, `describe()`, and `settle()`: work a cache defers (blocks coded on a
worker thread, an eviction after a forward call) is finished before anything is reported.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..codecs.base import tensor_nbytes
from ..errors import KvshrinkError
from ..spec import ModelSpec, spec_from_config


class KVCache(Cache):
    def __init__(self, layers: list, config=None, method: str | None = None):
        self.spec: ModelSpec | None = spec_from_config(config) if config is not None else None
        self.method = method
        self.ids = None  # the token ids of a loaded cache, when they were saved
        super().__init__(layers=layers)

    def settle(self) -> None:
        """Finish deferred work (background coding, a pending eviction); a no-op by default."""

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (payload, scales, minimums, tables, sink, window)."""
        self.settle()
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        self.settle()
        return sum(layer.fp16_nbytes() for layer in self.layers)

    def compression_ratio(self) -> float:
        """float16 bytes for the same tokens / bytes really held (DESIGN.md)."""
        held = self.nbytes()
        return self.fp16_nbytes() / held if held else float("nan")

    def describe(self) -> str:
        raise NotImplementedError

    def save(self, path: str, model=None, ids=None) -> int:
        raise KvshrinkError(f"saving is implemented for kvcomp caches, not {self.method or type(self).__name__}")


def _flat_tensors(obj) -> list[torch.Tensor]:
    """Plain tensors inside obj: tensor subclasses (quanto) are unflattened, tuples/dicts walked."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return [t for n in names for t in _flat_tensors(getattr(obj, n))]
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flat_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat_tensors(v)]
    return []


def cache_nbytes(cache) -> int:
    """Bytes a cache really holds, for ours, DynamicCache and QuantizedCache alike."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()
    tensors = []
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            tensors.extend(_flat_tensors(getattr(layer, attr, None)))
    return tensor_nbytes(tensors)
