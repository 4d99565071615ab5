"""Flash-decoding partials in PyTorch, on any device: the dense tokens' partial and the log-sum-exp
merge that the Triton kernels' body partials go through (the numba kernels do both inside).

A partial of query rows over some tokens is (max logit m, weight sum l, weighted value sum acc),
the weights exp(logit - m); partials of disjoint token sets merge exactly.
"""

from __future__ import annotations

import torch


def soft_cap(s: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(s / cap) if cap else s


def dense_partial(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, vis: torch.Tensor, cap: float = 0.0):
    """q (B, H, R, d) scaled, keys / values (B, H, n, d), vis (B, t, n) bool with query row r seeing
    what token r % t sees -> (m (B, H, R), l (B, H, R), acc (B, H, R, d)), all float32."""
    b, h, r, d = q.shape
    t = vis.shape[1]
    s = soft_cap(q.float() @ keys.float().transpose(2, 3), cap)
    rows = vis[:, torch.arange(r, device=vis.device) % t]  # (B, R, n)
    s = s.masked_fill(~rows[:, None], float("-inf"))
    m = s.amax(-1) if s.shape[-1] else torch.full((b, h, r), float("-inf"), device=q.device)
    p = torch.exp(s - _safe(m)[..., None])
    return m, p.sum(-1), p @ values.float()


def merge(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Partials stacked on dim 2: m, l (B, H, P, R), acc (B, H, P, R, d) -> (B, H, R, d); a row that
    sees nothing (left padding) gets zeros."""
    top = m.amax(2, keepdim=True)
    w = torch.exp(m - _safe(top))  # exp(-inf) = 0 for empty partials
    den = (w * l).sum(2)
    out = (w[..., None] * acc).sum(2)
    return torch.where(den[..., None] > 0, out / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None], 0.0)


def log_sum_exp(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp of logits over partials stacked on dim 2 (m, l (B, H, P, R)) -> (B, H, R); -inf for a
    row that sees nothing. A caller that scores tokens outside the kernel turns their logits into probabilities
    with it (as kernels/tiles.log_sum does for the numba kernels)."""
    top = _safe(m.amax(2, keepdim=True))
    return top[:, :, 0] + torch.log((torch.exp(m - top) * l).sum(2))


def merge_runs(runs: list, q, keys, values, vis, cap: float = 0.0, scored: bool = False):
    """Partials of several kernel launches (each (m, l, acc) as `coded_body` returns them, its last slot, left for
    the dense tokens, unused) merged with the dense tokens' partial (`dense_partial(q, keys, values, vis, cap)`)
    -> the output, and with `scored` each row's log-sum-exp too."""
    dense = dense_partial(q, keys, values, vis, cap)
    m, l, acc = (torch.cat([run[i][:, :, :-1] for run in runs] + [dense[i].unsqueeze(2)], 2) for i in range(3))
    out = merge(m, l, acc)
    return (out, log_sum_exp(m, l)) if scored else out


def merge_dense(pm: torch.Tensor, pl: torch.Tensor, pacc: torch.Tensor, q, keys, values, vis, cap: float = 0.0):
    """A Triton kernel's partials, their last slot left for the dense tokens: fill it with those tokens'
    partial (`dense_partial(q, keys, values, vis, cap)`) and merge everything."""
    n = pm.shape[2] - 1
    pm[:, :, n], pl[:, :, n], pacc[:, :, n] = dense_partial(q, keys, values, vis, cap)
    return merge(pm, pl, pacc)


def _safe(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)
