"""Peers measured in the same run: transformers' own `QuantizedCache`.

Registered as `hf-quanto-int{4,2}` and `hf-hqq-int{8,4,3,2}` when their
backend (optimum-quanto, hqq) imports. Settings: transformers' defaults (group
64, residual window of 128 tokens kept in the model's dtype); axis 0 for
quanto (its default), axis 1 for HQQ (HQQ's recommended setting). Note that
QuantizedCache re-quantizes its whole history from the dequantized one each
time the residual window fills. Their bytes are read from the tensors they
hold (`core.cache.cache_nbytes`), the same way as ours.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ...registry import Config, Method, option, register

PEERS = {"quanto": (4, 2), "hqq": (8, 4, 3, 2)}
AXIS = {"quanto": 0, "hqq": 1}
_MODULES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def backend_available(backend: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULES[backend]) is not None
    except ModuleNotFoundError:
        return False


@dataclass(frozen=True)
class PeerConfig(Config):
    """transformers' `QuantizedCache` with its defaults (group 64, a residual of 128 tokens)."""

    family = "peer"
    backend: str = option("quanto", "QuantizedCache backend", tuple(PEERS), preset=True)
    bits: int = option(4, "bits per code", preset=True)


for _backend, _widths in PEERS.items():
    if backend_available(_backend):
        for _bits in _widths:
            register(Method(f"hf-{_backend}-int{_bits}", PeerConfig(_backend, _bits),
                            f"transformers QuantizedCache, {_backend} backend, {_bits} bits (axis {AXIS[_backend]}, "
                            "group 64, residual 128)"))
