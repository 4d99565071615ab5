"""Attention over a PagedCache: each KV head reads its own kept tokens.

A paged layer hands over, per head, its kept rows (padded to the longest head,
with a validity mask and each row's original position) followed by the tokens
of the current call. The visibility of a past row comes from transformers'
mask at the row's original position (causality and padding), so nothing
depends on how many tokens were evicted. The last `obs` queries of the call
(every query while decoding one token at a time) also give each row its
attention, aggregated per KV head (policies/scores.py), which the layer adds
to the row's score.

Registered with transformers' AttentionInterface as "kvshrink", the one
attention function of the project: states that attend by themselves (the
code-domain states of attention/coded.py) are handed the query, and called with
ordinary tensors (any other cache) it is exactly SDPA, so a model can keep this
implementation for every cache.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import KvshrinkError
from ..paged_cache import PagedStates
from ..policies.scores import aggregate, window_probs

NAME = "kvshrink"
CAPTURE = "kvshrink_capture"
CAPTURED_QUERIES = 64  # the largest observation window a shared prefill can serve
QUERY_CHUNK = 1024  # query rows per mask and score block: bounds memory on long prefills


def bool_mask(mask):
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0  # additive float mask: 0 where visible


def visible(st: PagedStates, mask, t0: int, t1: int, t: int) -> torch.Tensor:
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


def observe_window(query: torch.Tensor, st: PagedStates, mask, scale: float) -> None:
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


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if hasattr(key, "attend"):
        return key.attend(module, query, attention_mask, scaling)
    if not isinstance(key, PagedStates):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    st = key
    b, hq, t, d = query.shape
    h = st.keys.shape[1]
    g = hq // h
    scale = scaling if scaling is not None else d ** -0.5
    mask = bool_mask(attention_mask)
    q = query.view(b, h, g, t, d)
    if t == 1:  # decoding: one score row serves the output and the eviction scores
        probs = window_probs(q, st.keys, visible(st, mask, 0, 1, 1), scale)
        out = torch.einsum("bhgwn,bhnd->bhgwd", probs, st.values)
        # a decoded token always sees itself: it is never padding
        owner = st.layer.owner
        st.layer.observe(aggregate(probs, owner.score, owner.pool_kernel, owner.pooling))
        return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None
    if st.n_past == 0:  # a first prefill: nothing evicted yet, the model's own mask applies as it is
        out = F.scaled_dot_product_attention(query, st.keys, st.values, attn_mask=mask, is_causal=mask is None,
                                             scale=scale, enable_gqa=True)
        observe_window(query, st, mask, scale)
        return out.transpose(1, 2).contiguous(), None
    out = query.new_empty(b, h, g, t, d)
    for t0 in range(0, t, QUERY_CHUNK):
        t1 = min(t, t0 + QUERY_CHUNK)
        vis = visible(st, mask, t0, t1, t)
        vis = vis | ~vis.any(-1, keepdim=True)  # padding queries see nothing: give them something finite
        vis = vis[:, :, None].expand(b, h, g, t1 - t0, vis.shape[-1]).reshape(b, h, g * (t1 - t0), -1)
        o = F.scaled_dot_product_attention(q[:, :, :, t0:t1].reshape(b, h, g * (t1 - t0), d), st.keys, st.values,
                                           attn_mask=vis, scale=scale)
        out[:, :, :, t0:t1] = o.view(b, h, g, t1 - t0, d)
    observe_window(query, st, mask, scale)
    return out.view(b, hq, t, d).transpose(1, 2).contiguous(), None


_captured: dict | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _captured is not None:
        _captured[module.layer_idx] = query[:, :, -CAPTURED_QUERIES:].clone()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, paged_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register(CAPTURE, _capture_attention)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)


def use_kvshrink_attention(model) -> None:
    """Switch `model` to "kvshrink" in place (plain SDPA for every cache that needs nothing else)."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


@contextmanager
def capturing_queries(model):
    """Within the block, forward passes of `model` record each layer's last queries (post-RoPE)."""
    global _captured
    register()
    prev = model.config._attn_implementation
    _captured = {}
    model.set_attn_implementation(CAPTURE)
    try:
        yield _captured
    finally:
        _captured = None
        model.set_attn_implementation(prev)
