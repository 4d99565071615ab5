"""The one attention function of the project, registered with transformers as "kvshrink".

Every kvshrink layer's `update` returns either plain tensors (a prefill, a perplexity chunk, any
cache that decodes before attending) or a states object that attends by itself: it has
`attend(module, query, mask, scaling, softcap) -> (output (B, T, Hq, d), None)` and holds whatever it
reads in place (integer codes, paged rows, low-rank segments, RVQ codes, Huffman blocks). Plain
tensors get exactly SDPA (eager attention where logits are soft-capped, which SDPA cannot do), so a
model can keep this implementation for every cache, ours or not.
No family is named here: a new family brings its own states.

`prepare` (api.py) switches a model to it; making a cache never does.
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..errors import KvshrinkError
from .logits import plain_attention

NAME = "kvshrink"
CAPTURE = "kvshrink_capture"
CAPTURED_QUERIES = 64  # the largest observation window a shared prefill can serve


def kvshrink_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                       **kwargs):
    if hasattr(key, "attend"):
        return key.attend(module, query, attention_mask, scaling, softcap)
    needs = getattr(module, "kvshrink_needs_cache", None)  # set by a transform (ZDC) whose layers need its cache
    if needs:
        raise KvshrinkError(needs)
    return plain_attention(module, query, key, value, attention_mask, scaling, softcap, dropout=dropout, **kwargs)


_captured: dict | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    if _captured is not None:
        _captured[module.layer_idx] = query[:, :, -CAPTURED_QUERIES:].clone()
    return plain_attention(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, kvshrink_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
AttentionInterface.register(CAPTURE, _capture_attention)
AttentionMaskInterface.register(CAPTURE, sdpa_mask)


def uses_kvshrink_attention(config) -> bool:
    return getattr(config, "_attn_implementation", None) == NAME


def use_kvshrink_attention(model) -> None:
    """Switch `model` to "kvshrink" in place (plain SDPA for every cache that needs nothing else)."""
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def require_kvshrink_attention(config, method: str) -> None:
    """One line, not a confusing failure inside transformers, when the model was not prepared."""
    if not uses_kvshrink_attention(config):
        raise KvshrinkError(f"{method} attends through the 'kvshrink' attention: call "
                            f"kvshrink.prepare(model, {method!r}) before making its cache")


@contextmanager
def capturing_queries(model):
    """Within the block, forward passes of `model` record each layer's last queries (post-RoPE)."""
    global _captured
    prev = model.config._attn_implementation
    _captured = {}
    model.set_attn_implementation(CAPTURE)
    try:
        yield _captured
    finally:
        _captured = None
        model.set_attn_implementation(prev)
