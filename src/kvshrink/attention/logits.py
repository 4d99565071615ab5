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
    scores = soft_cap(torch.matmul(query, k.transpose(2, 3)) * scaling, softcap)
    bias = mask_bias(attention_mask, query.shape[2], k.shape[2], query.device)
    if bias is not None:
        scores = scores + bias[..., :k.shape[2]]
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)  # padding rows see nothing
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs
