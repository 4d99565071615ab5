"""Attention for ZDC-transformed models, in the reduced dimensions.

A `ZdcCache` layer hands the attention (through the one "kvshrink" attention function), per KV head, a list of segments: the
sink tokens (keeping `sink_rank` coordinates), the coded body (r_k / r_v
coordinates) and the tokens of the current call (all coordinates: they attend
to each other exactly, as in every kvshrink cache). Each segment is used at its
own width: the query is mapped once into the dual of the key basis and its
leading coordinates meet each segment's keys; the value sums land in the leading
coordinates of the output, which the folded `o_proj` maps back. No past key or
value is ever widened to head_dim.

Decode steps the compiled kernel reads get `LowRankStates` (kernel.py) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...attention.logits import soft_cap
from ...attention.masks import mask_bias

QUERY_CHUNK = 1024  # query rows per score matrix: bounds memory on long prefills


@dataclass
class Segment:
    keys: torch.Tensor  # (B, n, d_k)
    values: torch.Tensor  # (B, n, d_v)


@dataclass
class ZdcStates:
    """What a ZdcCache layer returns from `update`: per KV head, its segments, oldest first."""

    heads: list[list[Segment]]

    @property
    def length(self) -> int:
        return sum(s.keys.shape[1] for s in self.heads[0])

    def attend(self, module, query, attention_mask, scaling=None, softcap=None):
        """Each KV head over its segments at their stored widths; the output's value coordinates
        are mapped back by the folded o_proj."""
        b, hq, t, d = query.shape
        heads = self.heads
        group = hq // len(heads)
        s = self.length
        scale = scaling if scaling is not None else d ** -0.5
        bias = mask_bias(attention_mask, t, s, query.device)
        if bias is not None:
            bias = bias[..., -s:]
        out = query.new_zeros(b, t, hq, d)
        qk = module.zdc_qk  # (H, D, D)
        for h, segs in enumerate(heads):
            q = query[:, h * group:(h + 1) * group] @ qk[h]  # (B, G, T, D): the key basis' dual coordinates
            for t0 in range(0, t, QUERY_CHUNK):
                qc = q[:, :, t0:t0 + QUERY_CHUNK]
                tc = qc.shape[2]
                # the group's query rows share one key matrix: (B, G*tc, d) x (B, d, n), no broadcast copies
                qf = qc.reshape(b, group * tc, d)
                parts = [torch.bmm(qf[..., :seg.keys.shape[2]], seg.keys.transpose(1, 2)) for seg in segs]
                scores = soft_cap(torch.cat(parts, -1).view(b, group, tc, s).mul_(scale), softcap)
                if bias is not None:
                    scores.add_(bias[:, :, t0:t0 + tc])
                probs = torch.softmax(scores, dim=-1)
                if bias is not None:
                    probs.nan_to_num_(0.0)  # rows of left padding mask every key
                self.observe(h, t0, t, probs)
                pf = probs.view(b, group * tc, s)
                acc = out[:, t0:t0 + tc, h * group:(h + 1) * group].transpose(1, 2)  # (B, G, tc, D) view
                at = 0
                for seg in segs:
                    n, dv = seg.values.shape[1], seg.values.shape[2]
                    if n and dv:
                        acc[..., :dv] += torch.bmm(pf[..., at:at + n], seg.values).view(b, group, tc, dv)
                    at += n
        return out, None

    def observe(self, head: int, t0: int, t: int, probs: torch.Tensor) -> None:
        """Called with each head's probabilities (B, G, rows, S) of query rows t0.. of a call of t: for a
        layer that scores tokens by the attention they get (important.py); nothing here."""
