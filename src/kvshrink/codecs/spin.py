"""Undoing RoPE inside a key group: KVQuant's pre-RoPE keys (Hooper et al., arXiv 2401.18079),
without storing a position.

RoPE turns each channel pair (i, i + n) of a key at position p by the angle p * f_i. Over a group of
128 tokens a fast-turning pair sweeps its whole circle, so a per-channel range covers the circle
rather than the key. Turning each token back by its offset j in its group (angle j * f_i) leaves
every token of a group turned by one angle, the group's start position: channel ranges follow the
keys as they were before RoPE, and the cache needs no positions. The turn is orthogonal and exact:
decoding turns forward by the same angles. Measured on the bundled model (scripts/turn_study.py:
all 30 layers' keys, Hadamard-rotated, 2 x 2048 tokens): KL 0.590 -> 0.289 at 2 bits, 0.078 -> 0.041
at 3 bits.

A wrong frequency (a RoPE type the config misdescribes) costs quality only, never correctness.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def angles(freqs: tuple, group: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (group, n) float32 of offset j times frequency i (computed in float64)."""
    ang = torch.arange(group, dtype=torch.float64)[:, None] * torch.tensor(freqs, dtype=torch.float64)[None]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def turn(x: torch.Tensor, freqs: tuple, group: int, sign: int) -> torch.Tensor:
    """x (..., t, d) float32, t a multiple of group, with token j of each group turned by sign * j * f on the
    pairs (i, i + n), n = len(freqs): sign -1 undoes RoPE's turn, +1 redoes it. A new tensor."""
    n = len(freqs)
    cos, sin = angles(freqs, group, x.device)
    *lead, t, d = x.shape
    g = x.reshape(*lead, t // group, group, d)
    a, b = g[..., :n], g[..., n:2 * n]
    s = sin if sign > 0 else -sin
    parts = [a * cos - b * s, b * cos + a * s]
    if d > 2 * n:  # channels RoPE leaves alone (partial rotary)
        parts.append(g[..., 2 * n:])
    return torch.cat(parts, -1).reshape(*lead, t, d)
