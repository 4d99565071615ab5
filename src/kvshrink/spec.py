"""Architecture facts of a decoder that a KV cache needs (a leaf: imports nothing of the package
but errors)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.cache_utils import get_layer_types_and_kwargs

from .errors import KvshrinkError

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
