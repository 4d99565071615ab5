"""Peers measured in the same run: transformers' own `QuantizedCache`.

Registered as `hf-quanto-int{4,2}` and `hf-hqq-int{8,4,3,2}` when their
backend (optimum-quanto, hqq) imports. Settings: transformers' defaults (group
64, residual window of 128 tokens kept in the model's dtype); axis 0 for
quanto (its default), axis 1 for HQQ (HQQ's recommended setting). Note that
QuantizedCache re-quantizes its whole history from the dequantized one each
time the residual window fills. Their bytes are read from the tensors they
hold (`cache_nbytes`), the same way as ours.
"""

from __future__ import annotations

import importlib.util

import torch

from ..codecs.base import tensor_nbytes
from ..methods import REGISTRY, Method, register

PEERS = {"quanto": (4, 2), "hqq": (8, 4, 3, 2)}
_MODULES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def backend_available(backend: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULES[backend]) is not None
    except ModuleNotFoundError:
        return False


_AXIS = {"quanto": 0, "hqq": 1}


def _hf_quantized(config, backend: str, bits: int, **_):
    from transformers import QuantizedCache

    axis = _AXIS[backend]
    return QuantizedCache(backend=backend, config=config, nbits=bits, axis_key=axis, axis_value=axis)


for _backend, _widths in PEERS.items():
    for _bits in _widths:
        _name = f"hf-{_backend}-int{_bits}"
        if _name not in REGISTRY and backend_available(_backend):
            register(Method(
                _name,
                f"transformers QuantizedCache, {_backend} backend, {_bits} bits (axis {_AXIS[_backend]}, group 64, residual 128)",
                _hf_quantized,
                family="peer",
                options={"backend": _backend, "bits": _bits},
            ))


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
