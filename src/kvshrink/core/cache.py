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
from . import hostmem, saved
from .calibfile import model_header


class KVCache(Cache):
    # every update replaces the tensors it changes (cat, slices cloned), none is written in place:
    # a structural copy that shares them (serve/park.py's fork) grows apart from its original safely
    forkable = True

    def __init__(self, layers: list, config=None, method: str | None = None):
        self.spec: ModelSpec | None = spec_from_config(config) if config is not None else None
        self.method = method
        self.ids = None  # the token ids of a loaded cache, when they were saved
        # what cache.save writes beside its tokens: the model it was built for, the options given as arguments
        self.model_header: dict | None = None
        self.options: dict = {}
        if self.spec is not None and self.spec.has_sliding:
            if len(layers) != self.spec.num_layers:
                raise KvshrinkError(f"{len(layers)} cache layers for a model of {self.spec.num_layers}")
            for i, layer in enumerate(layers):
                if self.spec.is_sliding(i):
                    layer.slide(self.spec.sliding_window)
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        hostmem.after_update(key_states)  # a long prompt's freed temporaries would stay in the process
        return out

    def bytes_by_kind(self) -> dict:
        """{"full" / "sliding": (bytes held, fp16 bytes of the same tokens)} over the layers of each kind."""
        self.settle()
        out: dict = {}
        for layer in self.layers:
            kind = "sliding" if layer.is_sliding else "full"
            held, fp16 = out.get(kind, (0, 0))
            out[kind] = (held + layer.nbytes(), fp16 + layer.fp16_nbytes())
        return out

    def settle(self) -> None:
        """Finish deferred work (background coding, a pending eviction); a no-op by default."""

    def share(self) -> None:
        """Freeze every store's coded blocks so that forks made from now on hold them with this cache,
        each growing its own blocks after them (core/store.py; serve/park.py's fork)."""
        self.settle()
        for layer in self.layers:
            for store in layer.stores():
                store.share()

    def shareable_nbytes(self) -> int:
        """Bytes of the coded blocks and the sink tokens: what a fork of this cache goes on sharing with
        it however long the fork grows (its other tensors are replaced as it grows)."""
        self.settle()
        return tensor_nbytes([t for layer in self.layers for s in layer.stores()
                              for t in [s.sink, *(x for p in s.body_parts() for x in p.tensors.values())]])

    def payload(self) -> list[torch.Tensor]:
        """The tensors that hold this cache's tokens (what it counts in `nbytes`), apart from what it
        shares with other caches (codecs' matrices, a calibrated model's projections)."""
        self.settle()
        return [t for layer in self.layers for t in layer.tensors()]

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
        """The method's layout and how it attends, then what the model's layers change about it."""
        notes = []
        if self.spec is not None and self.spec.has_sliding:
            n = sum(layer.is_sliding for layer in self.layers)
            notes.append(f"{n} of {len(self.layers)} layers slide over {self.spec.sliding_window} tokens "
                         "(their oldest blocks freed)")
        return "; ".join([self._describe(), *notes])

    def _describe(self) -> str:
        raise NotImplementedError

    # -- a rank's share of a head-sharded cache (dist/) ------------------------------------------
    def head_agnostic(self) -> bool:
        """Whether every layer codes each KV head alike (no per-head bases or codebooks), so that a
        cache fed only some heads' states holds them as it would hold all of them."""
        return False

    def exchange_form(self, layer_idx: int):
        """How a sequence-parallel prefill sends this layer's states (dist/exchange.py's `Form`): None
        for the model's own tensors; a layout that keeps fewer coordinates says which."""
        return None

    def shard_heads(self, first: int, stop: int) -> None:
        """Keep KV heads first..stop-1 only (before the first update): from then on the cache is fed
        those heads' states alone (a rank of a head-sharded cache, dist/sp.py)."""
        if not self.head_agnostic():
            raise KvshrinkError(f"{self.method or type(self).__name__} caches cannot be split by KV heads yet: "
                                "sequence parallelism takes the int, fp16 and zdc methods")

    def head_module(self, module, first: int, stop: int):
        """The attention module as states of heads first..stop-1 read it (a layout with per-head
        buffers on the module slices them)."""
        return module

    def file_header(self, model=None) -> dict:
        """The model a saved file names: `model`'s, else the one the cache was built from."""
        header = model_header(model) if model is not None else self.model_header
        if header is None:
            raise KvshrinkError("this cache was not built from a model: pass it, cache.save(path, model)")
        return header

    def save(self, path: str, model=None, ids=None) -> int:
        """Write the cache to `path` (safetensors, core/saved.py), with the token ids it holds when given; returns
        the file's size in bytes. `kvshrink.load_cache(path, model)` reads it back."""
        return saved.save(self, path, self.file_header(model), ids)


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
