"""Attention logits beyond SDPA: soft-capping (Gemma 2), and the eager attention that applies it
to plain tensors (SDPA cannot cap)."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from .masks import mask_bias


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(scores / softcap) (in place unless autograd records it); unchanged when softcap is None."""
    if softcap is None:
        return scores
    if scores.requires_grad:
        return torch.tanh(scores / softcap) * softcap
    return scores.div_(softcap).tanh_().mul_(softcap)


def plain_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """Attention over plain tensors: SDPA, or eager attention where logits are soft-capped."""
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return eager_attention(module, query, key, value, attention_mask, scale, softcap)


def eager_attention(module, query, key, value, attention_mask, scaling: float, softcap: float | None):
    """(output (B, T, Hq, d), weights): softmax(cap(q k^T * scaling) + mask) v, as Gemma 2's eager path."""
    group = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, group), repeat_kv(value, group)
    probs = _probs(torch.matmul(query, k.transpose(2, 3)) * scaling, attention_mask, softcap, query.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


def recent_attention(module, query, key, value, key_hat, value_hat, attention_mask, recent: int, scaling=None,
                     softcap=None, **kwargs):
    """Attention in which each query reads the keys and values of the `recent` positions before it (and its own) as
    given, and older ones as key_hat, value_hat: what a cache's coded history, a float16 window and a prompt's
    own chunk give it (core/sensitivity.py's Perturbed). (output (B, T, Hq, d), None)."""
    group = query.shape[1] // key.shape[1]
    k, kh, v, vh = (repeat_kv(x, group) for x in (key, key_hat, value, value_hat))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    t, n = query.shape[2], k.shape[2]
    pos_q = torch.arange(n - t, n, device=query.device)[:, None]
    old = torch.arange(n, device=query.device)[None] < pos_q - recent  # (T, S): read from the coded history
    scores = torch.where(old, query @ kh.transpose(2, 3), query @ k.transpose(2, 3)) * scale
    probs = _probs(scores, attention_mask, softcap, query.dtype)
    return ((probs * old) @ vh + (probs * ~old) @ v).transpose(1, 2).contiguous(), None


def _probs(scores: torch.Tensor, attention_mask, softcap: float | None, dtype: torch.dtype) -> torch.Tensor:
    """softmax(cap(scores) + mask) in `dtype`; a row that sees nothing (padding) gets zeros."""
    scores = soft_cap(scores, softcap)
    bias = mask_bias(attention_mask, scores.shape[2], scores.shape[3], scores.device)
    if bias is not None:
        scores = scores + bias[..., :scores.shape[3]]
    return torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(dtype)
