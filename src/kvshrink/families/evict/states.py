"""The states a paged layer hands the attention: each KV head reads its own kept tokens.

`PagedStates` (prefills, chunks, decode steps without the kernel): per head, its kept rows
(padded to the longest head, with a validity mask and each row's original position) followed by
the tokens of the current call. The visibility of a past row comes from transformers' mask at
the row's original position (causality and padding), so nothing depends on how many tokens
were evicted. The last `obs` queries of the call (every query while decoding one token at a
time) also give each row its attention, aggregated per KV head (scores.py), which the layer adds
to the row's score. `RowStates` (decode steps on the CPU): the compiled kernel reads the kept
rows in place through the block table (kernel.py) and adds the step's scores the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...attention.masks import bool_mask
from ...errors import KvshrinkError
from ...kernels.tiles import announce
from .kernel import add_scores
from .kernel import attend as kernel_attend
from .scores import aggregate, window_probs

QUERY_CHUNK = 1024  # query rows per mask and score block: bounds memory on long prefills



def refuse_softcap(softcap) -> None:
    if softcap is not None:  # PagedCache refuses such models; this guards the states themselves
        raise KvshrinkError("eviction scores rows from uncapped logits: soft-capped models are not served")

class PagedStates:
    """What a paged layer's `update` returns: each head's kept tokens (padded to the longest head)
    followed by the tokens of this call, decoded for the attention function."""

    def __init__(self, layer, keys, values, valid, positions, n_past):
        self.layer = layer
        self.keys, self.values = keys, values  # (B, H, S + T, d)
        self.valid = valid  # (B, H, S) bool: which past rows are real tokens
        self.positions = positions  # (B, H, S) original positions of the past rows
        self.n_past = n_past

    def attend(self, module, query, attention_mask, scaling=None, softcap=None):
        """Each head attends over its own kept rows and this call's tokens; the last `obs` queries
        score the rows (eviction is the cache's, after the call: cache.py)."""
        refuse_softcap(softcap)
        b, hq, t, d = query.shape
        h = self.keys.shape[1]
        g = hq // h
        scale = scaling if scaling is not None else d ** -0.5
        mask = bool_mask(attention_mask)
        q = query.view(b, h, g, t, d)
        if t == 1:  # decoding: one score row serves the output and the eviction scores
            probs = window_probs(q, self.keys, visible(self, mask, 0, 1, 1), scale)
            out = torch.einsum("bhgwn,bhnd->bhgwd", probs, self.values)
            # a decoded token always sees itself: it is never padding
            owner = self.layer.owner
            self.layer.observe(aggregate(probs, owner.score, owner.pool_kernel, owner.pooling))
            return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None
        if self.n_past == 0:  # a first prefill: nothing evicted yet, the model's own mask applies as it is
            out = F.scaled_dot_product_attention(query, self.keys, self.values, attn_mask=mask, is_causal=mask is None,
                                                 scale=scale, enable_gqa=True)
            observe_window(query, self, mask, scale)
            return out.transpose(1, 2).contiguous(), None
        out = query.new_empty(b, h, g, t, d)
        for t0 in range(0, t, QUERY_CHUNK):
            t1 = min(t, t0 + QUERY_CHUNK)
            vis = visible(self, mask, t0, t1, t)
            vis = vis | ~vis.any(-1, keepdim=True)  # padding queries see nothing: give them something finite
            vis = vis[:, :, None].expand(b, h, g, t1 - t0, vis.shape[-1]).reshape(b, h, g * (t1 - t0), -1)
            o = F.scaled_dot_product_attention(q[:, :, :, t0:t1].reshape(b, h, g * (t1 - t0), d), self.keys, self.values,
                                               attn_mask=vis, scale=scale)
            out[:, :, :, t0:t1] = o.view(b, h, g, t1 - t0, d)
        observe_window(query, self, mask, scale)
        return out.view(b, hq, t, d).transpose(1, 2).contiguous(), None


class RowStates:
    """What a paged layer's `update` returns for a decode step the kernel reads (kernel.py):
    this call's token and how many rows each head kept before it; `attend` runs the kernel and adds
    the step's attention to the eviction scores."""

    def __init__(self, layer, new_k, new_v, n_past, new_slot):
        self.layer, self.new_k, self.new_v = layer, new_k, new_v  # (B, H, d)
        self.n_past, self.new_slot = n_past, new_slot  # (B, H): rows kept before, where the token went

    def attend(self, module, query, mask, scaling=None, softcap=None):
        refuse_softcap(softcap)
        announce("paged-rows")
        b, hq, _, d = query.shape
        h = self.n_past.shape[1]
        scale = scaling if scaling is not None else d ** -0.5
        q = (query.float() * scale).reshape(b, h, hq // h, d)
        vis = bool_mask(mask)
        seen = None if vis is None else vis[:, 0, -1].expand(b, vis.shape[-1])  # by original position
        out, probs = kernel_attend(q, self.layer, self.n_past, self.new_k, self.new_v, seen)
        owner = self.layer.owner
        add_scores(self.layer, self.n_past, self.new_slot,
                   aggregate(probs[:, :, :, None], owner.score, owner.pool_kernel, owner.pooling))
        self.layer.called(1, None)
        return out.to(query.dtype).reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


def visible(st: "PagedStates", mask, t0: int, t1: int, t: int) -> torch.Tensor:
    """(B, H, t1 - t0, S + T) bool: which rows the queries t0..t1 of this call may see."""
    b, h, s = st.valid.shape
    dev = st.keys.device
    if mask is None:
        past = st.valid[:, :, None, :].expand(b, h, t1 - t0, s)
        new = (torch.arange(t, device=dev)[None] <= torch.arange(t0, t1, device=dev)[:, None])[None, None]
        new = new.expand(b, h, t1 - t0, t)
    else:
        m = mask[:, :1, t0:t1]  # (B or 1, 1, tc, K)
        m = m.expand(b, h, t1 - t0, m.shape[-1])
        past = m.gather(3, st.positions[:, :, None, :].expand(b, h, t1 - t0, s)) & st.valid[:, :, None, :]
        new = m[..., m.shape[-1] - t:]
    return torch.cat([past, new], -1)


def observe_window(query: torch.Tensor, st: "PagedStates", mask, scale: float) -> None:
    """Score the rows of `st` by the attention of the last `obs` queries of `query` (B, Hq, T', d)."""
    layer = st.layer
    owner = layer.owner
    b, hq, tq, d = query.shape
    h = st.keys.shape[1]
    t = st.keys.shape[2] - st.n_past
    w = min(owner.obs, t)
    if tq < w:
        raise KvshrinkError(f"observation window of {w} queries but only {tq} were captured")
    q = query[:, :, tq - w:].reshape(b, h, hq // h, w, d)
    probs = window_probs(q, st.keys, visible(st, mask, t - w, t, t), scale)
    pad = None
    if mask is not None:
        pad = ~mask[:, 0, -1, mask.shape[-1] - t:].expand(b, t)  # keys the last query may not see: padding
    layer.observe(aggregate(probs, owner.score, owner.pool_kernel, owner.pooling), pad)
