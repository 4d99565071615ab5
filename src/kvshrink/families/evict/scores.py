"""Token scores: the attention a key receives from an observation window of recent queries.

SnapKV (Li et al., arXiv 2404.14469) sums the window's attention over its
queries and smooths it with a 1-D pooling over neighbouring tokens, so a kept
token keeps its context. KV-Compress sums *squared* attention and aggregates
over the query heads of a GQA group, since one KV head serves them all; during
decoding each new query's attention is added to the running scores, so the
cache can keep compressing while it generates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_probs(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, H, G, w, d), keys (B, H, N, d), visible (B, H, w, N) bool -> probs (B, H, G, w, N)."""
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q, keys) * scale
    logits = logits.masked_fill(~visible[:, :, None], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num_(0.0)  # a row with nothing visible gives no score


def aggregate(probs: torch.Tensor, how: str = "square", pool: int = 0, pooling: str = "avg") -> torch.Tensor:
    """(B, H, G, w, N) attention -> (B, H, N) score per key, summed over the group's heads and the window.
    pooling="max" gives every token the best score of its `pool` neighbours, so a kept token keeps
    its whole span (a number's later digits with its first)."""
    s = (probs * probs if how == "square" else probs).sum((2, 3))
    if pool > 1:
        b, h, n = s.shape
        if pooling == "max":
            s = F.max_pool1d(s.view(b * h, 1, n), pool, stride=1, padding=pool // 2)
        else:
            s = F.avg_pool1d(s.view(b * h, 1, n), pool, stride=1, padding=pool // 2, count_include_pad=False)
        s = s.view(b, h, -1)[..., :n]
    return s
