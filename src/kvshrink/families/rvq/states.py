"""Decode attention straight from coded keys and values (no decoded history).

A `CodedLayer` hands the attention its parts in token order: float16 sink and
window tokens and the tokens of this call as dense tensors, the coded body as
packed codes. Scores for a coded part come from the key codec's `key_scores`
(for RVQ: dot products of the query with every codeword, gathered by code) and
its share of the output from the value codec's `value_sums`; nothing of the
coded history is ever decoded to floats. The states object attends by itself,
called from the project's attention function ("kvshrink", attention/function.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...attention.logits import soft_cap
from ...codecs.base import Codec, Packed


@dataclass
class CodedStates:
    """parts: (keys, values) per part, oldest first; dense (B, H, n, D) tensors or Packed codes."""

    parts: list[tuple]
    key_codec: Codec
    value_codec: Codec

    def attend(self, module, query: torch.Tensor, mask, scaling=None, softcap=None):
        b, hq, t, d = query.shape
        h = self.parts[-1][0].shape[1]
        g = hq // h
        scale = scaling if scaling is not None else d ** -0.5
        q = query.float().reshape(b, h, g * t, d)  # a KV head's query rows, (group, token) order
        scores, sizes = [], []
        for k, _ in self.parts:
            if isinstance(k, Packed):
                s = self.key_codec.key_scores(q, k)
            else:
                s = q @ k.float().transpose(2, 3)
            scores.append(s)
            sizes.append(s.shape[-1])
        s = soft_cap(torch.cat(scores, -1).mul_(scale), softcap).view(b, h, g, t, -1)
        if mask is not None:
            keep = mask if mask.dtype == torch.bool else mask == 0
            s.masked_fill_(~keep[:, :, None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num_(0.0).view(b, h, g * t, -1)  # rows of left padding see nothing
        out = torch.zeros(b, h, g * t, d, device=query.device)
        for (_, v), part in zip(self.parts, p.split(sizes, -1)):
            if isinstance(v, Packed):
                out += self.value_codec.value_sums(part, v)
            else:
                out += part @ v.float()
        return out.to(query.dtype).view(b, hq, t, d).transpose(1, 2).contiguous(), None
