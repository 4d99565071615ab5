"""kvshrink: compressed KV caches for Hugging Face causal language models."""

from .cache import CompressedCache, CompressedLayer
from .codecs import Codec, Fp16, IntQuant
from .errors import KvshrinkError
from .methods import get_method, method_names
from .models import ModelSpec, load_model

__all__ = [
    "Codec", "CompressedCache", "CompressedLayer", "Fp16", "IntQuant", "KvshrinkError",
    "ModelSpec", "get_method", "load_model", "method_names",
]
__version__ = "0.1.0"
