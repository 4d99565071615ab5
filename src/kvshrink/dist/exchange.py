"""Who holds what in a sequence-parallel run, and the collectives that move it (DeepSpeed-Ulysses).

Rank r holds a contiguous slice of the prompt's tokens (`Plan.tokens_of`) and attends for a
contiguous range of KV heads with their query heads (`Plan.heads_of`; a rank may get none when
there are more ranks than KV heads: it still projects its tokens). `to_heads` gives every rank its
heads over every token, `to_tokens` sends the attention outputs back to the tokens' ranks, and
`gather_heads` joins a decode step's per-head outputs. A `Form` (core/form.py) makes keys and
values cross at the coordinates their cache keeps.

Every byte that leaves a rank is counted by kind (q, k, v, o, and "decode" for the steps after the
prefill), and the seconds spent in the collectives: the bench's communication time. A `Wire`
(wire.py) may int-code the prefill's messages; a decode step's outputs cross as they are.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.form import Form
from .wire import Wire


def split(n: int, world: int, r: int) -> tuple[int, int]:
    """Rank r's contiguous share [start, stop) of n items: the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


@dataclass(frozen=True)
class Plan:
    rank: int
    world: int
    tokens: int  # the prompt's
    kv_heads: int
    group: int  # query heads per KV head

    def tokens_of(self, r: int) -> tuple[int, int]:
        return split(self.tokens, self.world, r)

    def heads_of(self, r: int) -> tuple[int, int]:
        """KV heads [first, stop) rank r attends for; its query heads are those times `group`."""
        return split(self.kv_heads, self.world, r)


class Exchange:
    """The collectives of one run, with the bytes each sends to other ranks and the time they take."""

    def __init__(self, plan: Plan, wire: Wire | None = None):
        self.plan, self.wire = plan, wire or Wire()
        self.sent: Counter = Counter()  # kind -> bytes this rank sent to others
        self.seconds = 0.0

    def _all_to_all(self, chunks: list[torch.Tensor], recv: list[int], kind: str) -> list[torch.Tensor]:
        """chunks[j] (flat) to rank j; recv[i] elements from rank i, returned flat per rank (int-coded on
        the way when the wire says so: what arrives is the decoded codes)."""
        me, wire = self.plan.rank, self.wire
        mine = chunks[me].reshape(-1)
        if wire.bits:  # this rank's own share stays as it is: it crosses no wire
            chunks = [wire.encode(c.reshape(-1)) if j != me else torch.empty(0, dtype=torch.uint8)
                      for j, c in enumerate(chunks)]
            sizes = [wire.nbytes(n, mine.element_size()) if i != me else 0 for i, n in enumerate(recv)]
        else:
            sizes = recv
        send = torch.cat([c.reshape(-1) for c in chunks])
        out = send.new_empty(sum(sizes))
        self.sent[kind] += sum(c.numel() for j, c in enumerate(chunks) if j != me) * send.element_size()
        t = time.perf_counter()
        dist.all_to_all_single(out, send, sizes, [c.numel() for c in chunks])
        self.seconds += time.perf_counter() - t
        got = list(out.split(sizes))
        if wire.bits:
            got = [wire.decode(g, n).to(mine.dtype) if i != me else mine for i, (g, n) in enumerate(zip(got, recv))]
        return got

    def _wide(self, start: int, stop: int, form: Form) -> torch.Tensor:
        """(stop - start,) bool: the tokens of the range that keep `form.wide` coordinates."""
        p = torch.arange(start, stop)
        return (p < form.sink) | (p >= self.plan.tokens - form.window)

    def _widths(self, wide: torch.Tensor, narrow: int, form: Form) -> int:
        n = int(wide.sum())
        return n * form.wide + (wide.numel() - n) * narrow

    def to_heads(self, x: torch.Tensor, kind: str, form: Form | None = None) -> torch.Tensor:
        """x (1, heads, my tokens, D), every head of this rank's tokens -> (1, my heads, all tokens, D).
        kind "q": query heads (ranges times `group`); "k" / "v": KV heads, at `form`'s coordinates
        (the coordinates a token does not keep arrive as zeros)."""
        plan, me = self.plan, self.plan.rank
        g = plan.group if kind == "q" else 1
        if form is not None and kind == "k" and form.key_map is not None:
            x = torch.matmul(x, form.key_map.to(x))  # (1, H, t, D) @ (H, D, D): basis coordinates
        s, e = plan.tokens_of(me)
        d = x.shape[-1]
        my_wide = self._wide(s, e, form) if form is not None else None
        chunks = []
        for j in range(plan.world):
            a, b = (h * g for h in plan.heads_of(j))
            if form is None:
                chunks.append(x[0, a:b])
                continue
            widths = form.keys if kind == "k" else form.values
            chunks.extend(torch.cat([x[0, h, my_wide, :form.wide].reshape(-1),
                                     x[0, h, ~my_wide, :widths[h]].reshape(-1)]) for h in range(a, b))
            if a == b:
                chunks.append(x.new_empty(0))
        if form is not None:  # one chunk per destination rank
            chunks = self._per_rank(chunks)
        a, b = (h * g for h in plan.heads_of(me))
        recv = []
        for i in range(plan.world):
            si, ei = plan.tokens_of(i)
            if form is None:
                recv.append((b - a) * (ei - si) * d)
            else:
                wide = self._wide(si, ei, form)
                widths = form.keys if kind == "k" else form.values
                recv.append(sum(self._widths(wide, widths[h], form) for h in range(a, b)))
        got = self._all_to_all(chunks, recv, kind)
        out = x.new_zeros(1, b - a, plan.tokens, d)
        for i, flat in enumerate(got):
            si, ei = plan.tokens_of(i)
            if form is None:
                out[0, :, si:ei] = flat.view(b - a, ei - si, d)
                continue
            wide = self._wide(si, ei, form)
            n_wide, widths, at = int(wide.sum()), (form.keys if kind == "k" else form.values), 0
            for h in range(a, b):
                n = n_wide * form.wide
                out[0, h - a, si + torch.nonzero(wide)[:, 0], :form.wide] = flat[at:at + n].view(n_wide, form.wide)
                at += n
                m = (ei - si - n_wide) * widths[h]
                out[0, h - a, si + torch.nonzero(~wide)[:, 0], :widths[h]] = flat[at:at + m].view(-1, widths[h])
                at += m
        return out

    def narrow_queries(self, start: int, stop: int, form: Form, width: int, n: int) -> torch.Tensor:
        """(stop - start,) bool: the range's tokens whose query (or output) crosses as `width` coordinates
        plus `n` sink numbers: those that meet only narrow keys and the sink's (all but the prompt's last
        `window`, whose keys are wide), and none where that would not be fewer than `form.wide`."""
        rows = torch.arange(start, stop) < self.plan.tokens - form.window
        return rows if width + n < form.wide else torch.zeros_like(rows)

    def _narrowed_size(self, start: int, stop: int, form: Form, width: int, n: int) -> int:
        """Numbers one query (or output) head sends for the range's tokens (`narrow_queries`)."""
        m = int(self.narrow_queries(start, stop, form, width, n).sum())
        return m * (width + n) + (stop - start - m) * form.wide

    def share_sink(self, keys: torch.Tensor, values: torch.Tensor, form: Form) -> tuple[torch.Tensor, torch.Tensor]:
        """keys (as the model made them) and values (in their basis) (1, H, my tokens, D) -> the sink
        tokens' (H, n, wide) in basis coordinates on every rank, from rank 0, which holds them (`check`
        makes sure): each rank scores and sums the sink for its own queries, so that queries and outputs
        cross narrowed."""
        n = min(form.sink, self.plan.tokens)
        if self.plan.rank == 0:
            sink_keys = torch.matmul(keys[:, :, :n], form.key_map.to(keys))
            both = torch.stack([sink_keys[0, ..., :form.wide], values[0, :, :n, :form.wide]]).contiguous()
            self.sent["sink"] += both.numel() * both.element_size() * (self.plan.world - 1)
        else:
            both = keys.new_empty(2, keys.shape[1], n, form.wide)
        t = time.perf_counter()
        dist.broadcast(both, 0)
        self.seconds += time.perf_counter() - t
        return both[0], both[1]

    def queries_to_heads(self, q: torch.Tensor, sink_scores: torch.Tensor, form: Form):
        """q (1, Hq, my tokens, D) in the dual bases of their KV heads' keys, sink_scores (1, Hq, my tokens,
        n) their dot products with the sink keys -> (q (1, my query heads, all tokens, wide), sink scores
        (1, my query heads, all tokens, n)). A token before the prompt's last `window` sends only its
        head's key rank of coordinates and its sink scores: every other key it can see keeps no more."""
        plan, me, g = self.plan, self.plan.rank, self.plan.group
        n, wide = sink_scores.shape[-1], form.wide
        s, e = plan.tokens_of(me)
        chunks = []
        for j in range(plan.world):
            a, b = plan.heads_of(j)
            parts = []
            for h in range(a, b):
                nar = self.narrow_queries(s, e, form, form.keys[h], n)
                parts.extend(x.reshape(-1) for hq in range(h * g, (h + 1) * g)
                             for x in (q[0, hq, nar, :form.keys[h]], sink_scores[0, hq, nar], q[0, hq, ~nar, :wide]))
            chunks.append(torch.cat(parts or [q.new_empty(0)]))
        a, b = plan.heads_of(me)
        recv = [g * sum(self._narrowed_size(*plan.tokens_of(i), form, form.keys[h], n) for h in range(a, b))
                for i in range(plan.world)]
        got = self._all_to_all(chunks, recv, "q")
        out = q.new_zeros(1, (b - a) * g, plan.tokens, wide)
        scores = q.new_zeros(1, (b - a) * g, plan.tokens, n)
        for i, flat in enumerate(got):
            si, ei = plan.tokens_of(i)
            rows = torch.arange(si, ei)
            at = 0
            for h in range(a, b):
                nar = self.narrow_queries(si, ei, form, form.keys[h], n)
                for hq in range((h - a) * g, (h - a + 1) * g):
                    for dest, r, sel in ((out, form.keys[h], nar), (scores, n, nar), (out, wide, ~nar)):
                        m = int(sel.sum()) * r
                        dest[0, hq, rows[sel], :r] = flat[at:at + m].view(-1, r)
                        at += m
        return out, scores

    def outputs_to_tokens(self, out: torch.Tensor, sink_probs: torch.Tensor, sink_values: torch.Tensor,
                          form: Form) -> torch.Tensor:
        """out (1, all tokens, my query heads, wide) in value-basis coordinates and sink_probs (1, all
        tokens, my query heads, n) -> (1, my tokens, every query head, D), as `to_tokens`. A token before
        the prompt's last `window` gets its head's value rank of coordinates and its weights of the
        sink tokens, whose values (sink_values (H, n, wide), `share_sink`) fill the coordinates above."""
        plan, me, g = self.plan, self.plan.rank, self.plan.group
        n, wide, d = sink_probs.shape[-1], form.wide, form.key_map.shape[-1]
        a, b = plan.heads_of(me)
        chunks = []
        for j in range(plan.world):
            sj, ej = plan.tokens_of(j)
            rows = torch.arange(sj, ej)
            parts = []
            for h in range(a, b):
                nar = self.narrow_queries(sj, ej, form, form.values[h], n)
                parts.extend(x.reshape(-1) for hq in range((h - a) * g, (h - a + 1) * g)
                             for x in (out[0, rows[nar], hq, :form.values[h]], sink_probs[0, rows[nar], hq],
                                       out[0, rows[~nar], hq, :wide]))
            chunks.append(torch.cat(parts or [out.new_empty(0)]))
        s, e = plan.tokens_of(me)
        recv = [g * sum(self._narrowed_size(s, e, form, form.values[h], n) for h in range(*plan.heads_of(i)))
                for i in range(plan.world)]
        got = self._all_to_all(chunks, recv, "o")
        full = out.new_zeros(1, e - s, plan.kv_heads * g, d)
        for i, flat in enumerate(got):
            at = 0
            for h in range(*plan.heads_of(i)):
                rv = form.values[h]
                narrow = self.narrow_queries(s, e, form, rv, n)
                m, w = int(narrow.sum()), int((~narrow).sum())
                for hq in range(h * g, (h + 1) * g):
                    full[0, narrow, hq, :rv] = flat[at:at + m * rv].view(m, rv)
                    at += m * rv
                    probs = flat[at:at + m * n].view(m, n)
                    at += m * n
                    full[0, narrow, hq, rv:wide] = probs @ sink_values[h, :, rv:wide]
                    full[0, ~narrow, hq, :wide] = flat[at:at + w * wide].view(w, wide)
                    at += w * wide
        return full

    def _per_rank(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-head chunks (an empty one for a rank with no heads) joined per destination rank."""
        out, it = [], iter(chunks)
        for j in range(self.plan.world):
            a, b = self.plan.heads_of(j)
            out.append(torch.cat([next(it) for _ in range(max(b - a, 1))]))
        return out

    def to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """out (1, all tokens, my query heads, d) -> (1, my tokens, every query head, d)."""
        plan, me = self.plan, self.plan.rank
        d, g = out.shape[-1], plan.group
        chunks = [out[0, slice(*plan.tokens_of(j))] for j in range(plan.world)]
        s, e = plan.tokens_of(me)
        heads = [(b - a) * g for a, b in (plan.heads_of(i) for i in range(plan.world))]
        got = self._all_to_all(chunks, [(e - s) * h * d for h in heads], "o")
        return torch.cat([flat.view(1, e - s, h, d) for flat, h in zip(got, heads)], 2)

    def gather_heads(self, out: torch.Tensor) -> torch.Tensor:
        """A decode step's out (1, t, my query heads, d) -> (1, t, every query head, d) on every rank."""
        plan = self.plan
        heads = [(b - a) * plan.group for a, b in (plan.heads_of(i) for i in range(plan.world))]
        most = max(heads)
        pad = out.new_zeros(*out.shape[:2], most, out.shape[-1])
        pad[:, :, :out.shape[2]] = out
        parts = [torch.empty_like(pad) for _ in range(plan.world)]
        self.sent["decode"] += pad.numel() * pad.element_size() * (plan.world - 1)
        t = time.perf_counter()
        dist.all_gather(parts, pad)
        self.seconds += time.perf_counter() - t
        return torch.cat([p[:, :, :h] for p, h in zip(parts, heads)], 2)

    def broadcast_token(self, token: int, src: int) -> int:
        t = torch.tensor([token])
        dist.broadcast(t, src)
        return int(t)
