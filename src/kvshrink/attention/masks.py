"""transformers' attention masks in the forms the kvshrink states read (the one place they are converted)."""

from __future__ import annotations

import torch


def bool_mask(mask):
    """True where a query may see a key; None (causal, nothing padded) stays None."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0  # additive float mask: 0 where visible


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
