"""kvshrink: compressed KV caches for Hugging Face causal language models.

The names below load on first use, so `kvshrink methods` and option checks start without torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "prepare": "api", "from_method": "api", "load_cache": "api", "saved_method": "api",
    "CompressedCache": "families.quant.cache", "KVCache": "core.cache",
    "Codec": "codecs", "Fp16": "codecs", "IntQuant": "codecs",
    "KvshrinkError": "errors", "ModelSpec": "spec", "load_model": "models",
    "get_method": "families", "method_names": "families",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvshrink' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
