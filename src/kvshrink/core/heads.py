"""A layer whose KV heads are held in groups, each group a layer of its own kind with its own codecs.

A head's attention reads only its own keys and values (and, under grouped-query attention, its query heads read
only it), so a layer split by KV heads attends as the layer would: each part is given its heads' states and its
query heads' rows, and the outputs are laid side by side. No kernel changes; each part's states attend as they do
alone. Used where an allocation gives a layer's heads different codecs (families/budget's `heads=N`).
"""

from __future__ import annotations

import torch

from ..attention.logits import plain_attention
from ..errors import KvshrinkError
from .layer import StoreLayer


class HeadGroups(StoreLayer):
    """parts: layers, one per run of consecutive KV heads; bounds: (first, stop) of each run, covering the heads in
    order. Everything a layer is asked is asked of its parts (they hold the same tokens)."""

    def __init__(self, parts: list, bounds: list[tuple[int, int]]):
        super().__init__()
        if len(parts) != len(bounds) or not parts:
            raise KvshrinkError(f"{len(parts)} layer parts for {len(bounds)} head groups")
        if bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])) or any(a >= b for a, b in bounds):
            raise KvshrinkError(f"head groups must be consecutive runs from head 0, got {bounds}")
        self.parts, self.bounds = list(parts), list(bounds)
        # core/saved.py writes the parts' stores, and what they keep beside them through BesideGroups
        self.saved_by_stores = all(p.saved_by_stores for p in self.parts)
        if any(hasattr(p, "saved_parts") for p in self.parts) and not isinstance(self, BesideGroups):
            raise KvshrinkError("layers that keep tokens beside their stores are grouped by heads_of(), as "
                                "BesideGroups")

    def layer_parts(self) -> list:
        return self.parts

    # --- transformers layer API -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[1] != self.bounds[-1][1]:
            raise KvshrinkError(f"a layer of {self.bounds[-1][1]} KV heads in groups was given {key_states.shape[1]}")
        self._init_shape(key_states)
        for part, (a, b) in zip(self.parts, self.bounds):
            part.lazy_initialization(key_states[:, a:b], value_states[:, a:b])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, checked=None, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        outs = []
        for part, (a, b) in zip(self.parts, self.bounds):
            mine = None if checked is None else (checked[0][:, a:b], checked[1][:, a:b])
            outs.append(part.update(key_states[:, a:b], value_states[:, a:b], *args, checked=mine, **kwargs))
        if all(isinstance(k, torch.Tensor) for k, _ in outs):
            return torch.cat([k for k, _ in outs], 1), torch.cat([v for _, v in outs], 1)
        states = GroupStates([k if not isinstance(k, torch.Tensor) else (k, v) for k, v in outs], self.bounds)
        return states, states

    def slide(self, window: int) -> None:
        for part in self.parts:
            part.slide(window)
        self.is_sliding, self.sliding_window = True, window

    @property
    def dropped(self) -> int:
        return self.parts[0].dropped

    @dropped.setter
    def dropped(self, n: int) -> None:
        for part in self.parts:
            part.dropped = n

    def stores(self) -> list:
        return [s for part in self.parts for s in part.stores()]

    def held(self) -> int:
        return self.parts[0].held()

    def calibrated(self) -> list[torch.Tensor]:
        return [t for part in self.parts for t in part.calibrated()]

    def reset(self) -> None:
        for part in self.parts:
            part.reset()
        self.is_initialized = False

    def _keep_first(self, keep: int) -> None:
        for part in self.parts:
            part._keep_first(keep)

    def _batch_map(self, on_tensor, on_packed) -> None:
        for part in self.parts:
            part._batch_map(on_tensor, on_packed)

    def tensors(self) -> list[torch.Tensor]:
        return [t for part in self.parts for t in part.tensors()]


class BesideGroups(HeadGroups):
    """Head groups of layers that keep tokens beside their stores (a high class, core/importance.py): those written
    and read back part by part (core/saved.py's `saved_parts` / `restore_parts`, names prefixed by the part)."""

    def saved_parts(self) -> tuple[dict, dict]:
        parts, numbers = {}, {}
        for j, part in enumerate(self.parts):
            mine, nums = part.saved_parts()
            parts.update({f"{j}.{name}": x for name, x in mine.items()})
            numbers[str(j)] = nums
        return parts, numbers

    def restore_parts(self, parts: dict, numbers: dict) -> None:
        for j, part in enumerate(self.parts):
            mine = {name.split(".", 1)[1]: x for name, x in parts.items() if name.split(".", 1)[0] == str(j)}
            part.restore_parts(mine, numbers[str(j)])


def heads_of(parts: list, bounds: list[tuple[int, int]]) -> HeadGroups:
    """A layer in head groups of these parts: BesideGroups where they keep tokens beside their stores."""
    return (BesideGroups if any(hasattr(p, "saved_parts") for p in parts) else HeadGroups)(parts, bounds)


class GroupStates:
    """What a layer in head groups hands the attention: per group, its part's states (or its (keys, values) where
    the part returned plain tensors), each attended with its query heads' rows."""

    def __init__(self, parts: list, bounds: list[tuple[int, int]]):
        self.parts, self.bounds = parts, bounds

    def rows(self, query: torch.Tensor) -> list:
        """(part's states, its query heads' rows) per group, query (B, Hq, ...)."""
        g = query.shape[1] // self.bounds[-1][1]
        return [(part, query[:, a * g:b * g]) for part, (a, b) in zip(self.parts, self.bounds)]

    def attend(self, module, query: torch.Tensor, mask, scaling=None, softcap=None):
        outs = []
        for part, q in self.rows(query):
            if isinstance(part, tuple):
                out = plain_attention(module, q, part[0], part[1], mask, scaling, softcap)[0]
            else:
                out = part.attend(module, q, mask, scaling, softcap)[0]
            outs.append(out)
        return torch.cat(outs, 2), None

    def batch_key(self, t: int, mask) -> tuple | None:
        """Equal for layers whose groups `attend_many` serves together (the same bounds, and each part's own key: a
        server's sequences of one method), else None."""
        keys = [part.batch_key(t, mask) if hasattr(part, "batch_key") else None for part in self.parts]
        if any(key is None for key in keys):
            return None
        return GroupStates, tuple(self.bounds), tuple(keys)

    @staticmethod
    def attend_many(states: list, query: torch.Tensor, scaling=None, softcap=None) -> torch.Tensor:
        """One decode token for each of many sequences (equal `batch_key`s), query (B, Hq, 1, d) -> (B, 1, Hq, d): one
        call of the parts' own `attend_many` per group, over every sequence, where a call per sequence and group cost
        a server 31% of its decode throughput with `auto-6x`'s 8 layers in groups (docs/serve.md)."""
        outs = []
        for j, (part, q) in enumerate(states[0].rows(query)):
            parts = [s.parts[j] for s in states]
            outs.append(type(part).attend_many(parts, q, scaling, softcap))
        return torch.cat(outs, 2)
