"""One forward call over the new tokens of many sequences, each with its own cache.

The server packs every running sequence's new tokens (one for a decoding sequence, a chunk of the
prompt for one being prefilled) into one row of a batch of one, with each token's own position,
so the model's projections and MLPs run once over all of them. `RaggedCache` stands where the model
expects its cache: per layer, it hands each sequence's slice of the new keys and values to that
sequence's own cache (any kvshrink cache, compressed its own way), and returns `RaggedStates`,
which the "kvshrink" attention calls: each sequence's queries attend to what its own cache returned
(a states object that reads its codes in place, or plain tensors), causally, and to nothing else.
The outputs are laid back end to end, so a token never sees another sequence's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.logits import plain_attention


@dataclass
class Segment:
    """`length` consecutive tokens of the packed row, starting at `start`, belong to `cache`."""

    cache: object
    start: int
    length: int


class RaggedCache:
    """Routes one packed forward call to per-sequence caches (see the module's text)."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        parts = []
        for seg in self.segments:
            end = seg.start + seg.length
            k, v = seg.cache.update(key_states[:, :, seg.start:end], value_states[:, :, seg.start:end], layer_idx)
            parts.append((k, v, seg.length))
        states = RaggedStates(parts)
        return states, states


@dataclass
class RaggedStates:
    """Per sequence (keys or states object, values, new tokens), in the packed row's order."""

    parts: list

    def attend(self, module, query: torch.Tensor, mask, scaling=None, softcap=None):
        outs, at = [], 0
        for k, v, t in self.parts:
            q = query[:, :, at:at + t]
            at += t
            if hasattr(k, "attend"):
                out, _ = k.attend(module, q, None, scaling, softcap)  # None: causal over what it holds
            else:
                s = k.shape[2]
                causal = None if t == 1 else torch.ones(t, s, dtype=torch.bool, device=q.device).tril_(s - t)[None, None]
                out, _ = plain_attention(module, q, k, v, causal, scaling, softcap)
            outs.append(out)
        return torch.cat(outs, 1), None
