"""Architecture facts of a decoder that a KV cache needs (a leaf: imports nothing of the package
but errors and compat).

A model is served when every layer's cache is per-token keys and values: full attention, or
sliding-window attention (`layer_types` in the config, or a `sliding_window` on every layer).
Everything else is refused here, by name, before any method looks at the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .compat import layer_types as read_layer_types
from .compat import rope_frequencies
from .errors import KvshrinkError

FULL, SLIDING = "full_attention", "sliding_attention"

# Models whose cache is not a list of per-layer full-attention keys and values, and why.
_UNSUPPORTED_TYPES = {
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba", "xlstm", "rwkv"), "a state-space / recurrent model"),
    **dict.fromkeys(("jamba", "zamba", "zamba2", "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "lfm2",
                     "recurrent_gemma", "minimax", "qwen3_next", "qwen3_5", "olmo_hybrid"),
                    "a hybrid of attention and linear-attention / state-space layers"),
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "kimi_k2", "longcat_flash"), "multi-head latent attention (MLA)"),
}
_LAYER_TYPES = {
    "chunked_attention": "chunked attention layers",
    "linear_attention": "linear-attention layers",
    "mamba": "state-space layers",
    "conv": "convolution layers",
    "dummy": "layers that share another layer's cache",
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
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer (empty: all full)
    sliding_window: int | None = None  # tokens a sliding layer sees (its own included)
    softcap: float | None = None  # attention logit soft-capping (Gemma 2)
    rope: tuple[float, ...] = ()  # rotary inverse frequencies (compat.rope_frequencies); () where none

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    @property
    def has_sliding(self) -> bool:
        return SLIDING in self.layer_types

    def fp16_bytes_per_token(self) -> int:
        """Keys and values of every layer for one token in float16."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def fp16_bytes(self, tokens: int, batch: int = 1) -> int:
        """What an fp16 cache holds after `tokens` tokens (DESIGN.md's reference for a ratio): every
        token in a full layer, the last window - 1 in a sliding one (transformers' own sliding layer)."""
        layer = 2 * self.num_kv_heads * self.head_dim * 2
        held = sum(min(tokens, self.sliding_window - 1) if self.is_sliding(i) else tokens
                   for i in range(self.num_layers))
        return batch * held * layer


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def spec_from_config(config) -> ModelSpec:
    """Architecture facts, or a KvshrinkError naming what the cache cannot serve."""
    text = _text_config(config)
    model_type = getattr(text, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise KvshrinkError(f"unsupported architecture {model_type!r}: encoder-decoder models are not served")
    if model_type in _UNSUPPORTED_TYPES:
        raise KvshrinkError(f"unsupported architecture {model_type!r}: {_UNSUPPORTED_TYPES[model_type]}")
    for field in ("kv_lora_rank", "q_lora_rank"):
        if getattr(text, field, None):
            raise KvshrinkError(f"unsupported architecture {model_type!r}: multi-head latent attention (MLA)")
    try:
        layer_types, layer_windows = read_layer_types(text)
    except Exception as err:  # configs without the usual fields
        raise KvshrinkError(f"unsupported architecture {model_type!r}: {err}") from None
    other = sorted(set(layer_types) - {FULL, SLIDING})
    if other:
        names = ", ".join(_LAYER_TYPES.get(t, f"layers of type {t}") for t in other)
        raise KvshrinkError(f"unsupported architecture {model_type!r}: {names} (full and sliding-window "
                            "attention layers are served)")
    windows = {w for t, w in zip(layer_types, layer_windows) if t == SLIDING}
    if len(windows) > 1:
        raise KvshrinkError(f"unsupported architecture {model_type!r}: sliding layers of different windows "
                            f"{sorted(windows)}")
    heads = getattr(text, "num_attention_heads", None)
    layers = getattr(text, "num_hidden_layers", None)
    if not heads or not layers:
        raise KvshrinkError(f"unsupported architecture {model_type!r}: no attention heads or layers in its config")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelSpec(
        model_type=model_type,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=getattr(text, "max_position_embeddings", None),
        layer_types=tuple(layer_types) if windows else (),
        sliding_window=windows.pop() if windows else None,
        softcap=getattr(text, "attn_logit_softcapping", None),
        rope=rope_frequencies(text),
    )
