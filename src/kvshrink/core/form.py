"""What a sequence-parallel prefill sends of one layer's states (dist/exchange.py packs it).

A layout that keeps fewer coordinates than the model computes (ZDC's low-rank keys and values) says
which: the all-to-all then carries only those, so fewer bytes cross (FDC's point), and the rank
that receives them stores them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Form:
    """Per KV head h: keys mapped by `key_map[h]` (D, D) first (None: sent as they are), then a token
    at a position below `sink`, or among the prompt's last `window`, keeps its first `wide`
    coordinates; any other token keeps `keys[h]` (keys) or `values[h]` (values)."""

    key_map: torch.Tensor | None
    keys: list[int]
    values: list[int]
    wide: int
    sink: int
    window: int
