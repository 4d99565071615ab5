"""The attention of an importance-aware layer (cache.py): it attends, scores the observation window's tokens and, where
the high class is re-ranked (demotion), the high tokens too.

A decode step (a few tokens over a coded body) goes through the int kernel, which reads both classes' codes in place
(the body and its stage, then the important tokens as per-token codes) and hands back each query row's log-sum-exp;
the window's probabilities are then exp(logit - lse), exact (the high class's too, its keys decoded for their
logits only). Longer calls (a prompt, a perplexity chunk) decode the
history and attend with softmax in row blocks, so the probabilities come with the output. Either way the layer
then adds what the call's last `observe` query rows gave each window token (`observe`) and lets the tokens past
the window leave, each to its class (`commit`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...attention.logits import soft_cap
from ...attention.masks import mask_bias
from ...core.importance import causal, lse_probs

ROWS = 256  # query tokens per block of the decoded attention: bounds its logits at a long prompt


class MixedStates:
    """split: SplitStates whose body the int kernel reads (a decode step), or None (decode everything, then attend).
    keys / values: the whole history and this call's tokens, float32, in the layer's order (sink, body, stage,
    important tokens, window), for the decoded path."""

    def __init__(self, layer, split, t: int, keys=None, values=None):
        self.layer, self.split, self.t = layer, split, t
        self.keys, self.values = keys, values

    def attend(self, module, query, mask, scaling=None, softcap=None):
        b, hq, t, d = query.shape
        h = self.layer.kv_shape[1]
        scale = scaling if scaling is not None else d ** -0.5
        n_win = self.layer.window_count()
        # the high class is scored only by calls after which tokens leave (where they are re-ranked)
        n_high = self.layer.rescored(t)
        rows = min(t, self.layer.observe)
        g = hq // h
        if self.split is not None:
            out, _ = self.split.attend(module, query, mask, scaling, softcap)
            q = (query.float() * scale).view(b, h, g, t, d)[:, :, :, t - rows:]
            lse = self.split.body.lse.view(b, h, g, t, 1)[:, :, :, t - rows:]
            probs = self.layer.window_probs(q, lse, softcap, t)
            high = None
            if n_high:  # the high class decoded for its scores only (the kernel read it in place)
                high = lse_probs(q, self.layer.high.decode(self.layer.hk, torch.float32), lse, softcap)
        else:
            out, probs, high = self._decoded(query, mask, scale, softcap, n_win, n_high, rows)
        self.layer.observe_rows(probs, t, high)
        return out, None

    def _decoded(self, query, mask, scale, softcap, n_win, n_high, rows):
        """Attention over the decoded history -> (output (B, T, Hq, d), the probabilities the last `rows` query rows
        gave the window's tokens (B, H, g, rows, n_win) and the high class's (B, H, g, rows, n_high) or None). The
        output comes from SDPA (a prompt of thousands of tokens: a fused kernel, no probabilities held); only the
        observed rows' probabilities are formed. With a soft-cap (which SDPA lacks), softmax in blocks of rows."""
        if softcap:
            return self._blocks(query, mask, scale, softcap, n_win, n_high, rows)
        b, hq, t, d = query.shape
        k, v = self.keys, self.values
        h, n = k.shape[1], k.shape[2]
        if mask is None:  # causal; SDPA's own causal mask (its fast path) fits a call with no history only
            keep = None if t in (1, n) else causal(t, n, query.device)
        else:
            keep = mask[..., :n]
        out = F.scaled_dot_product_attention(query.float(), k, v, attn_mask=keep, scale=scale, enable_gqa=True,
                                             is_causal=mask is None and 1 < t == n)
        out = out.nan_to_num_(0.0).to(query.dtype).transpose(1, 2).contiguous()
        q = (query[:, :, t - rows:].float() * scale).view(b, h, hq // h, rows, d)
        s = q @ k[:, :, None].transpose(3, 4)
        bias = mask_bias(None if mask is None else mask[..., t - rows:, :n], rows, n, query.device)
        if bias is not None:
            s = s + bias[:, :, None]
        p = torch.softmax(s, -1).nan_to_num_(0.0)
        lo = n - n_win - n_high  # the high class sits just before the window
        return out, p[..., n - n_win:], p[..., lo:n - n_win] if n_high else None

    def _blocks(self, query, mask, scale, softcap, n_win, n_high, rows):
        """`_decoded` with a soft-cap: softmax attention in blocks of query rows."""
        b, hq, t, d = query.shape
        k, v = self.keys, self.values
        h, n = k.shape[1], k.shape[2]
        g = hq // h
        q = (query.float() * scale).view(b, h, g, t, d)
        bias = mask_bias(mask, t, n, query.device)
        out = torch.empty(b, h, g, t, d, device=query.device)
        probs = torch.empty(b, h, g, rows, n_win, device=query.device)
        high = torch.empty(b, h, g, rows, n_high, device=query.device) if n_high else None
        lo, first = n - n_win - n_high, t - rows  # the high class sits just before the window
        for r0 in range(0, t, ROWS):
            r1 = min(t, r0 + ROWS)
            s = soft_cap(q[:, :, :, r0:r1] @ k[:, :, None].transpose(3, 4), softcap)
            if bias is not None:
                s = s + bias[:, :, None, r0:r1, :n]
            p = torch.softmax(s, -1).nan_to_num_(0.0)
            out[:, :, :, r0:r1] = p @ v[:, :, None]
            if r1 > first:  # rows the layer observes
                a = max(r0, first)
                probs[:, :, :, a - first:r1 - first] = p[:, :, :, a - r0:, n - n_win:]
                if high is not None:
                    high[:, :, :, a - first:r1 - first] = p[:, :, :, a - r0:, lo:n - n_win]
        out = out.to(query.dtype).view(b, hq, t, d).transpose(1, 2).contiguous()
        return out, probs, high
