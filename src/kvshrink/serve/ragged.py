"""One forward call over the new tokens of many sequences, each with its own cache.

The server packs every running sequence's new tokens (one for a decoding sequence, a chunk of the
prompt for one being prefilled) into one row of a batch of one, with each token's own position,
so the model's projections and MLPs run once over all of them. `RaggedCache` stands where the model
expects its cache: per layer, it hands each sequence's slice of the new keys and values to that
sequence's own cache (any kvshrink cache, compressed its own way), and returns `RaggedStates`,
which the "kvshrink" attention calls: each sequence's queries attend to what its own cache returned
(a states object that reads its codes in place, or plain tensors), causally, and to nothing else.
The outputs are laid back end to end, so a token never sees another sequence's tokens. The decode
tokens of sequences whose states allow it (their class's `attend_many`: attention/split.py's and
core/heads.py's, compiled kernels that take many sequences) are served by one kernel call per layer
(per head group), not one per sequence: on 2 cores the Python and dispatch around each call cost more
than the kernel itself (docs/serve.md).

A sliding-window layer gets, per sequence, the mask transformers would build for it alone: its
held tokens start at the layer's offset (`get_mask_sizes`, asked before the update, as transformers
asks), and a query sees the keys less than `window` positions behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.logits import plain_attention
from ..attention.masks import sliding_mask
from ..core.store import half_checked


@dataclass
class Segment:
    """`length` consecutive tokens of the packed row, starting at `start`, belong to `cache`."""

    cache: object
    start: int
    length: int


class RaggedCache:
    """Routes one packed forward call to per-sequence caches (see the module's text). windows: per
    layer, the sliding window (tokens a query sees, its own included) or None."""

    def __init__(self, segments: list[Segment], windows: list | None = None):
        self.segments, self.windows = segments, windows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        parts = []
        window = self.windows[layer_idx] if self.windows else None
        # checked once for every sequence: each store checking its own strided slice cost a third of the updates
        k16, v16 = half_checked(key_states), half_checked(value_states)
        for seg in self.segments:
            end = seg.start + seg.length
            mask = sliding_mask(seg.cache.layers[layer_idx], seg.length, window) if window else None
            k, v = seg.cache.update(key_states[:, :, seg.start:end], value_states[:, :, seg.start:end], layer_idx,
                                    checked=(k16[:, :, seg.start:end], v16[:, :, seg.start:end]))
            parts.append((k, v, seg.length, mask))
        states = RaggedStates(parts)
        return states, states


@dataclass
class RaggedStates:
    """Per sequence (keys or states object, values, new tokens), in the packed row's order."""

    parts: list

    def attend(self, module, query: torch.Tensor, mask, scaling=None, softcap=None):
        out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        many: dict = {}  # decode tokens whose states one call serves (their class's attend_many), by key
        at = 0
        for k, v, t, mask in self.parts:
            key = k.batch_key(t, mask) if hasattr(k, "batch_key") else None
            if key is not None:
                many.setdefault(key, []).append((k, at))
            else:
                out[:, at:at + t] = self._one(module, query[:, :, at:at + t], k, v, t, mask, scaling, softcap)
            at += t
        for group in many.values():
            states, rows = zip(*group)
            rows = torch.tensor(rows)
            out[0, rows] = type(states[0]).attend_many(list(states), query[0, :, rows].transpose(0, 1)[:, :, None],
                                                       scaling, softcap)[:, 0]
        return out, None

    @staticmethod
    def _one(module, q, k, v, t, mask, scaling, softcap):
        """One sequence's queries over its own states: (1, t, Hq, d)."""
        if hasattr(k, "attend"):
            return k.attend(module, q, mask, scaling, softcap)[0]  # None: causal over what it holds
        s = k.shape[2]
        if mask is None and t > 1:
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril_(s - t)[None, None]
        return plain_attention(module, q, k, v, mask, scaling, softcap)[0]
