"""transformers' attention masks in the forms the kvshrink states read (the one place they are converted)."""

from __future__ import annotations

import torch


def bool_mask(mask):
    """True where a query may see a key; None (causal, nothing padded) stays None."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0  # additive float mask: 0 where visible


def band(first: int, stop: int, keys: int, window: int | None = None) -> torch.Tensor:
    """(1, 1, stop - first, keys) bool: query i (first <= i < stop) sees keys j with i - window < j <= i
    (every earlier key where window is None)."""
    i = torch.arange(first, stop)[:, None]
    j = torch.arange(keys)[None]
    seen = j <= i
    if window is not None:
        seen &= j > i - window
    return seen[None, None]


def sliding_mask(layer, t: int, window: int) -> torch.Tensor:
    """(1, 1, t, held + t) bool: a cache layer's held tokens and t new ones, each query seeing the keys at
    most window - 1 positions behind it (and none ahead); what transformers builds for a sliding layer."""
    n = layer.get_mask_sizes(t)[0] if layer.is_initialized else t
    return band(n - t, n, n, window)


def mask_bias(mask, t: int, s: int, device) -> torch.Tensor | None:
    """Additive (B or 1, 1, T, S) float bias from transformers' mask (bool, float or None = causal)."""
    if mask is None:
        if t == 1:
            return None
        keep = torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)
        mask = keep[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
    return mask
