"""Codecs: how the compressed body of a cache layer stores tokens."""

from .base import Codec, Fp16, Packed
from .quant import IntQuant

__all__ = ["Codec", "Fp16", "IntQuant", "Packed"]
