"""Decode attention over dense parts and one compressed body, merged by log-sum-exp.

A cache layer whose body a compiled kernel can read in place hands the attention
`SplitStates`: the dense tokens before the body (float16 sink), the body, and the
dense tokens after it (recent tokens, this call's tokens). One call of the
body's compiled kernel does the whole attention: flash-decoding partials per
range of blocks (running max, sum, weighted value sum), one more partial over
the dense tokens, and their log-sum-exp merge, so the decompressed history never
exists. (Doing the dense part and the merge with PyTorch ops cost about 0.4 ms
per layer, more than the kernel itself at 1k tokens.)

`fused=False` decodes the body and attends over everything with softmax: the
reference every kernel is tested against.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import record_function

from ..kernels.backend import triton_for
from ..kernels.tiles import announce
from .logits import soft_cap
from .masks import bool_mask


@dataclass
class SplitStates:
    """before / after: (keys, values) dense (B, H, n, d), each a tensor or a list of tensors laid
    end to end (float16 and float32 parts; one cat builds the dense tokens); body: an object with
    `num_tokens`, `name`, `attend(q, vis, dense_k, dense_v, dense_vis, splits, cap)` -> (B, H, R, d)
    (its kernel attends over the body and the dense tokens, logits soft-capped at cap unless it is
    0, and merges them) and `decoded()` -> (keys, values) float32."""

    before: tuple
    body: object | None
    after: tuple
    fused: bool = True
    splits: int = 4

    def attend(self, module, query: torch.Tensor, mask, scaling=None, softcap=None):
        b, hq, t, d = query.shape
        after_k, after_v = _parts(self.after[0]), _parts(self.after[1])
        h = after_k[0].shape[1]
        g = hq // h
        scale = scaling if scaling is not None else d ** -0.5
        q = (query.float() * scale).reshape(b, h, g * t, d)  # a KV head's query rows, (group, token) order
        n_before = self.before[0].shape[2]
        n_body = self.body.num_tokens if self.body is not None else 0
        n_dense = n_before + sum(x.shape[2] for x in after_k)
        n_all = n_body + n_dense
        dense_k = torch.cat([x.float() for x in (self.before[0], *after_k)], 2)  # (a mixed-dtype cat is slower)
        dense_v = torch.cat([x.float() for x in (self.before[1], *after_v)], 2)
        if not self.fused or self.body is None:
            return self._reference(q, self._visible(mask, b, t, n_all, query.device), query, n_before, dense_k, dense_v, softcap)
        vis = bool_mask(mask)
        if vis is None:  # causal: the body is all visible, the last t dense tokens are this call's
            body_vis = torch.ones(b, n_body, dtype=torch.bool, device=query.device)
            dense_vis = torch.ones(b, t, n_dense, dtype=torch.bool, device=query.device).tril_(n_dense - t)
        else:
            vis = vis[:, 0].expand(b, t, -1)
            body_vis = vis[:, -1, n_before:n_before + n_body]  # the kernel takes one row for the body
            if t > 1 and not torch.equal(vis[..., n_before:n_before + n_body], body_vis[:, None].expand(b, t, -1)):
                # rows that see different past tokens (a sliding window's edge inside the body)
                return self._reference(q, vis, query, n_before, dense_k, dense_v, softcap)
            dense_vis = torch.cat([vis[..., :n_before], vis[..., n_before + n_body:]], -1)
        announce(self.body.name)
        with _named(f"{self.body.name}.fused_attend"):
            out = self.body.attend(q, body_vis, dense_k, dense_v, dense_vis, self.splits, softcap or 0.0)
        return out.to(query.dtype).view(b, hq, t, d).transpose(1, 2).contiguous(), None

    def batch_key(self, t: int, mask) -> tuple | None:
        """A key shared by the states whose decode tokens one `attend_many` call can serve (one
        causal token per sequence over a body of the same kind, codecs and splits), else None."""
        body = self.body
        if (t != 1 or mask is not None or not self.fused or body is None or not hasattr(body, "attend_many")
                or triton_for(self.before[0])):  # the one-call kernel is numba's (CPU)
            return None
        return type(body), body.batch_key(), self.splits

    @staticmethod
    def attend_many(states: list, query: torch.Tensor, scaling=None, softcap=None) -> torch.Tensor:
        """One decode token for each of many sequences (a server's batch), each over its own states (with
        equal `batch_key`s): query (B, Hq, 1, d) -> (B, 1, Hq, d), each row what `attend` gives it alone.
        The dense parts are laid into one array padded to the longest, with each one's count; the body's
        `attend_many(bodies, q, dense_k, dense_v, dense_n, splits, cap)` pads the bodies."""
        b, hq, _, d = query.shape
        parts = [[s.before, *zip(_parts(s.after[0]), _parts(s.after[1]))] for s in states]
        sizes = [sum(k.shape[2] for k, _ in p) for p in parts]
        h = states[0].before[0].shape[1]
        dense_k = np.zeros((b, h, max(sizes), d), dtype=np.float32)
        dense_v = np.zeros_like(dense_k)
        for i, p in enumerate(parts):
            at = 0
            for k, v in p:
                n = k.shape[2]
                if n:
                    dense_k[i, :, at:at + n] = k.numpy()[0]
                    dense_v[i, :, at:at + n] = v.numpy()[0]
                    at += n
        scale = scaling if scaling is not None else d ** -0.5
        q = (query.float() * scale).reshape(b, h, hq // h, d)
        body = states[0].body
        announce(body.name)
        out = body.attend_many([s.body for s in states], q, dense_k, dense_v, np.array(sizes, dtype=np.int64),
                               states[0].splits, softcap or 0.0)
        return out.to(query.dtype).view(b, hq, 1, d).transpose(1, 2)

    @staticmethod
    def _visible(mask, b, t, n_all, device):
        vis = bool_mask(mask)
        if vis is None:
            vis = torch.ones(b, 1, t, n_all, dtype=torch.bool, device=device).tril_(n_all - t)
        return vis[:, 0].expand(b, t, -1)

    def _reference(self, q, vis, query, n_before, dense_k, dense_v, softcap=None):
        """Decode the body, then softmax attention over the whole history."""
        b, hq, t, d = query.shape
        h = q.shape[1]
        k, v = dense_k, dense_v
        if self.body is not None:
            with _named(f"{self.body.name}.decode_all"):
                bk, bv = self.body.decoded()
            k = torch.cat([k[:, :, :n_before], bk.float(), k[:, :, n_before:]], 2)
            v = torch.cat([v[:, :, :n_before], bv.float(), v[:, :, n_before:]], 2)
        s = soft_cap(q @ k.transpose(2, 3), softcap).view(b, h, hq // h, t, -1).masked_fill(~vis[:, None, None],
                                                                                             float("-inf"))
        p = torch.softmax(s, -1).nan_to_num_(0.0).view(b, h, -1, k.shape[2])
        out = p @ v
        return out.to(query.dtype).view(b, hq, t, d).transpose(1, 2).contiguous(), None


def _named(name: str):
    """A span named in torch.profiler's profiles (scripts/profile_decode.py) while one records; else nothing:
    record_function costs about 20 us a call even with no profiler running, 30 calls a decode step."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def _parts(x) -> list:
    return x if isinstance(x, list) else [x]
