"""How many tokens each (layer, KV head) gives up so a sequence fits its budget.

Both policies return, per (layer, head), a count e: the e lowest-scoring
evictable tokens of that head go (protected tokens, the sink and the recent
window, carry score +inf and are never evictable).

- `uniform`: every head keeps the same number of blocks (SnapKV, AdaKV's
  baseline): budget / (layers x heads) each.
- `variable` (KV-Compress): candidate evictions across all layers and heads of
  the sequence, each freeing exactly one block: per head, first the tokens of
  its partly filled block, then `block` more at a time, in ascending score
  order. The cost of a candidate is the score mass it removes; the cheapest
  candidates go until the sequence fits. Candidates of one head have
  non-decreasing costs (ties broken by order), so every head evicts a prefix
  of its sorted tokens.
"""

from __future__ import annotations

import torch


def blocks_of(n: torch.Tensor, block: int) -> torch.Tensor:
    return (n + block - 1) // block


def uniform(scores: torch.Tensor, lengths: torch.Tensor, budget_blocks: int, block: int) -> torch.Tensor:
    """scores (U, S) sorted ascending per row (evictable first, +inf for protected or absent),
    lengths (U,) kept tokens per head -> evictions (U,)."""
    units = lengths.numel()
    keep = max(budget_blocks // units, 0) * block
    evictable = torch.isfinite(scores).sum(1)
    return (lengths - keep).clamp(min=0).minimum(evictable)


def variable(scores: torch.Tensor, lengths: torch.Tensor, budget_blocks: int, block: int) -> torch.Tensor:
    units, s = scores.shape
    evictable = torch.isfinite(scores).sum(1)
    need = int(blocks_of(lengths, block).sum()) - budget_blocks
    if need <= 0 or s == 0:
        return torch.zeros_like(lengths)
    rem = lengths % block
    first = torch.where(rem > 0, rem, torch.full_like(rem, block))  # tokens the first candidate evicts
    j = torch.arange((s + block - 1) // block + 1, device=scores.device)
    ends = first[:, None] + j[None] * block  # tokens evicted once candidates 0..j are taken
    valid = ends <= evictable[:, None]
    cum = torch.cat([scores.new_zeros(units, 1), torch.where(torch.isfinite(scores), scores, 0).cumsum(1)], 1)
    at = cum.gather(1, ends.clamp(max=s))
    cost = torch.diff(at, dim=1, prepend=torch.zeros_like(at[:, :1]))
    cost = torch.where(valid, cost, torch.inf)
    # lexicographic (cost, j): a stable sort of costs after ordering by j keeps prefixes per head
    flat_cost = cost.T.flatten()  # j-major, so equal costs come out in j order
    order = torch.sort(flat_cost, stable=True).indices[:need]
    order = order[torch.isfinite(flat_cost[order])]
    taken = torch.zeros(units, dtype=torch.long, device=scores.device)
    taken.index_add_(0, order % units, torch.ones_like(order))
    ends_taken = ends.gather(1, (taken - 1).clamp(min=0)[:, None])[:, 0]
    return torch.where(taken > 0, ends_taken, 0)
