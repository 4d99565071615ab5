"""Decode attention over dense parts and one compressed body, merged by log-sum-exp.

A cache layer whose body a compiled kernel can read in place hands the attention
`SplitStates`: the dense tokens before the body (float16 sink), the body, and the
dense tokens after it (recent tokens, this call's tokens). The body's kernel
returns flash-decoding partials per range of blocks, (running max, sum, weighted
value sum); the dense parts are attended with ordinary matmuls and everything is
merged by log-sum-exp, so the decompressed history never exists.

`fused=False` decodes the body and attends over everything with softmax: the
reference every kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from .paged import bool_mask


@dataclass
class SplitStates:
    """before / after: (keys, values) dense (B, H, n, d); body: an object with `num_tokens`,
    `name`, `partials(q, vis, splits)` -> (m, l, acc) and `decoded()` -> (keys, values) float32."""

    before: tuple
    body: object | None
    after: tuple
    fused: bool = True
    splits: int = 4

    def attend(self, module, query: torch.Tensor, mask, scaling=None):
        b, hq, t, d = query.shape
        h = self.after[0].shape[1]
        g = hq // h
        scale = scaling if scaling is not None else d ** -0.5
        q = (query.float() * scale).reshape(b, h, g * t, d)  # a KV head's query rows, (group, token) order
        n_before = self.before[0].shape[2]
        n_body = self.body.num_tokens if self.body is not None else 0
        n_all = n_before + n_body + self.after[0].shape[2]
        vis = bool_mask(mask)
        if vis is None:
            vis = torch.ones(b, 1, t, n_all, dtype=torch.bool).tril_(n_all - t)
        vis = vis[:, 0].expand(b, t, -1)
        if not self.fused or self.body is None:
            return self._reference(q, vis, query)
        dense_k = torch.cat([self.before[0].float(), self.after[0].float()], 2)
        dense_v = torch.cat([self.before[1].float(), self.after[1].float()], 2)
        dense_vis = torch.cat([vis[..., :n_before], vis[..., n_before + n_body:]], -1)  # (B, t, n_dense)
        s = (q @ dense_k.transpose(2, 3)).view(b, h, g, t, -1)
        s = s.masked_fill(~dense_vis[:, None, None], float("-inf")).view(b, h, g * t, -1)
        m_d = s.amax(-1)
        body_vis = vis[:, -1, n_before:n_before + n_body]  # past tokens: every query row sees the same ones
        with record_function(f"{self.body.name}.fused_blocks"):  # named in profiles (scripts/profile_decode.py)
            m_b, l_b, acc_b = self.body.partials(q, body_vis, self.splits)
        mx = torch.maximum(m_d, m_b.amax(2))
        safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(s - safe[..., None])
        w_b = torch.exp(m_b - safe[:, :, None]).nan_to_num_(0.0)  # an empty split has m = -inf
        den = p.sum(-1) + (l_b * w_b).sum(2)
        num = p @ dense_v + (acc_b * w_b[..., None]).sum(2)
        out = (num / den[..., None]).nan_to_num_(0.0)  # rows of left padding see nothing
        return out.to(query.dtype).view(b, hq, t, d).transpose(1, 2).contiguous(), None

    def _reference(self, q, vis, query):
        """Decode the body, then softmax attention over the whole history."""
        b, hq, t, d = query.shape
        h = q.shape[1]
        ks, vs = [self.before[0].float()], [self.before[1].float()]
        if self.body is not None:
            with record_function(f"{self.body.name}.decode_all"):
                k, v = self.body.decoded()
            ks.append(k)
            vs.append(v)
        k = torch.cat(ks + [self.after[0].float()], 2)
        v = torch.cat(vs + [self.after[1].float()], 2)
        s = (q @ k.transpose(2, 3)).view(b, h, hq // h, t, -1).masked_fill(~vis[:, None, None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num_(0.0).view(b, h, -1, k.shape[2])
        out = p @ v
        return out.to(query.dtype).view(b, hq, t, d).transpose(1, 2).contiguous(), None
