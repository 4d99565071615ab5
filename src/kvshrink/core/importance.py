"""What importance-aware layers share (families/mixed: more bits; families/lowrank/important.py: more coordinates).

Such a layer keeps its most recent tokens in an **observation window** (`wk`, `wv`: float16; or per-token codes of
`window_codec`, then a float16 `tail` of the decode steps' tokens since tokens last left, coded together as the next
ones leave, so a decode step codes nothing), where every query that reads them adds the probability it gave each one
(summed over the KV head's query heads) to its score (`wsum` over `wseen` query rows). When tokens leave the window
(every `gather` decode steps, or all of a long call's at once), each KV head keeps a running quota, round(share *
left), of **high** tokens: the most attended among those it holds and the leaving ones (`picks`). With demotion,
high tokens keep `hscore`, the moving average of the attention they get per query row over `memory` rows, and one
that falls behind a leaving token goes down a class; without it the held ones always stay. What a class is (bits,
coordinates) and where the others go is the family's `commit`. Where the family can crop below the window
(`crop_coded`; `places` set), each high token keeps `hpos`, its place among the tokens that left the window, and each
demoted token its place and index in the body (`mpos`, `midx`; int32), so that a cut knows which tokens each head
holds before it (`crop_plan`).
"""

from __future__ import annotations

import math

import torch

from ..attention.logits import soft_cap
from ..errors import KvshrinkError
from ..kernels import scores
from .layer import FUSED_QUERIES


class ObservedWindow:
    """Mixin for a StoreLayer: the window, its scores and the quota. The family sets `share`, `window_size`,
    `leave_gather`, `observe`, `demote`, `memory` and `layout`, and defines `high_tokens()` and `commit(long)`."""

    places = False  # whether high and demoted tokens keep their places: a crop below the window (`crop=true`)

    def open_window(self, like: torch.Tensor, key_width: int, value_width: int, seed: int, codec=None) -> None:
        """codec: per-token codes (a Codec of one-token blocks) the window holds its tokens in; None: float16."""
        b, h = like.shape[:2]
        self.window_codec, self.widths = codec, (key_width, value_width)
        self.compiled_scores = scores.reads(codec)  # whether window_probs' compiled call reads this window (CPU)
        if codec is None:
            self.wk, self.wv = self._empty(like)
            self.tail = None
        else:
            self.wk = self.wv = None  # no codes yet
            self.tail = self._empty(like)
        self.wsum = like.new_zeros(b, h, 0, dtype=torch.float32)
        self.wseen = torch.zeros_like(self.wsum)
        self.draws = torch.Generator().manual_seed(seed)  # select="random": its picks, kept as scores
        self.reset_scores()

    def reset_scores(self) -> None:
        """No high class yet (`hk`, `hv`: the family's), no scores, nothing left the window."""
        self.hk = self.hv = self.hscore = self.hpos = None
        self.mpos = self.midx = None  # demoted tokens in the body (`places` families): their places, body indices
        self.left = 0  # tokens that left the window
        self.unscored = 0  # query rows since the high class was last scored
        self.demoted = 0.0  # tokens sent down from the high class, per head (the mean over heads)

    def _empty(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h = like.shape[:2]
        return tuple(like.new_empty(b, h, 0, w, dtype=torch.float16) for w in self.widths)

    def window_add(self, k16: torch.Tensor, v16: torch.Tensor, defer: bool = False) -> None:
        """This call's float16 tokens join the window, unscored: a coded window's into its tail where `defer` (a
        decode step), else coded at once with the tail."""
        kw, vw = self.widths
        if self.window_codec is None:
            self.wk = torch.cat([self.wk, k16[..., :kw]], 2)
            self.wv = torch.cat([self.wv, v16[..., :vw]], 2)
        else:
            self.tail = tuple(torch.cat([t, x[..., :w]], 2) for t, x, w in zip(self.tail, (k16, v16), self.widths))
            if not defer:
                self.code_tail()
        zeros = self.wsum.new_zeros(*self.wsum.shape[:2], k16.shape[2])
        self.wsum, self.wseen = torch.cat([self.wsum, zeros], 2), torch.cat([self.wseen, zeros], 2)

    def code_tail(self) -> None:
        """A coded window's float16 tail joins its codes (one coding call for all its tokens)."""
        if self.tail[0].shape[2]:
            k, v = (self.window_codec.encode(x.float(), 1) for x in self.tail)
            self.wk, self.wv = (k, v) if self.wk is None else (self.wk.cat(k), self.wv.cat(v))
            self.tail = self._empty(self.tail[0])

    def window_count(self) -> int:
        """Tokens in the window (each has a score)."""
        return self.wsum.shape[2]

    def window_coded(self) -> int:
        """Tokens of the window held as codes (the rest float16: all of a float16 window, a coded one's tail)."""
        return self.wk.num_tokens if self.window_codec is not None and self.wk is not None else 0

    def window_states(self, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's keys and values, oldest first: float16 as held, or its codes decoded (a call's own transient
        copy, at most window + gather tokens) then the tail."""
        if self.window_codec is None:
            return self.wk, self.wv
        return tuple(t.to(dtype) if p is None else torch.cat([self.window_codec.decode(p, dtype), t.to(dtype)], 2)
                     for p, t in zip((self.wk, self.wv), self.tail))

    def window_probs(self, q: torch.Tensor, lse: torch.Tensor, softcap, t: int) -> torch.Tensor:
        """`lse_probs` of the window's tokens (B, H, G, rows, n_win) for a kernel's rows: a coded window's codes, read
        in their rotated basis against the query turned once (no decode of its keys), then its float16 tokens (all of
        a float16 window; a coded one's tail), which end with the call's own. One compiled call on the CPU."""
        coded = self.wk if self.window_codec is not None else None  # None too where a coded window holds no codes
        dense = self.wk if self.window_codec is None else self.tail[0]
        if self.compiled_scores and q.device.type == "cpu":
            return scores.probs(q, lse, softcap, dense, coded, self.window_codec)
        probs = lse_probs(q, dense, lse, softcap, t)
        if coded is None:
            return probs
        codec = self.window_codec
        inside = lse_probs(codec.to_basis(q[..., :self.widths[0]].contiguous()), codec.in_basis(coded), lse, softcap)
        return torch.cat([inside, probs], -1)

    def observed(self, probs: torch.Tensor, seen: torch.Tensor, t: int, high: torch.Tensor | None = None) -> None:
        """probs (B, H, n_win): the attention the observed rows of a call of t tokens gave each window token; seen
        (n_win,) how many rows could see it; high (B, H, n_high): the mean attention per row the high tokens got from
        the same rows (where they are re-ranked). Then the tokens past the window leave (`commit`)."""
        self.wsum += probs
        self.wseen += seen
        self.unscored += t
        if high is not None and self.hscore is not None:  # these rows stand for all since the last scores
            kept = math.exp(-self.unscored / self.memory)
            self.hscore.mul_(kept).add_(high, alpha=1.0 - kept)
            self.unscored = 0
        self.commit(long=t > FUSED_QUERIES)

    def observe_rows(self, probs: torch.Tensor, t: int, high: torch.Tensor | None = None) -> None:
        """probs (B, H, G, rows, n_win): what the last rows of a call of t tokens gave the window, zero where a row
        cannot see a token; high (B, H, G, rows, n_high) or None: what they gave the high tokens. -> `observed`."""
        g, rows, n_win = probs.shape[2:]
        if t > 1:
            seen = causal(t, n_win, probs.device)[t - rows:].sum(0).to(torch.float32) * g
        else:
            seen = float(g)  # a single decode token sees the whole window
        self.observed(probs.sum((2, 3)), seen, t, None if high is None else high.mean((2, 3)))

    def observe_queries(self, queries: torch.Tensor, keys: torch.Tensor, t: int) -> None:
        """Score the window by the captured last query rows (B, Hq, r, d) of a call of t tokens, post-RoPE, over
        keys (B, H, n, d) that end with the window's, as an uncompressed prefill captured them (eval/needle.py):
        what attending would have observed."""
        b, hq, r, d = queries.shape
        h, n = keys.shape[1], keys.shape[2]
        n_win = self.window_count()
        rows = min(r, self.observe, t)
        q = (queries[:, :, r - rows:].float() * d ** -0.5).view(b, h, hq // h, rows, d)
        s = (q @ keys.float()[:, :, None].transpose(3, 4)).masked_fill(~causal(rows, n, q.device), float("-inf"))
        probs = torch.softmax(s, -1)[..., n - n_win:]
        seen = causal(rows, n_win, q.device).sum(0).to(torch.float32) * (hq // h)
        self.observed(probs.sum((2, 3)), seen, t)

    def commits(self, t: int) -> bool:
        """Whether tokens leave the window after this call of t tokens (a decode step's once `gather` wait)."""
        out = self.window_count() - self.window_size
        return out > 0 and (t > FUSED_QUERIES or out >= self.leave_gather)

    def rescored(self, t: int) -> int:
        """High tokens a call of t tokens scores: all of them where tokens leave after it (with demotion)."""
        return self.high_tokens() if self.demote and self.select != "random" and self.commits(t) else 0

    def importance(self) -> torch.Tensor:
        """(B, H, n_win) the mean attention each window token has received so far (0 before any query saw it)."""
        return self.wsum / self.wseen.clamp_min(1.0)

    def picks(self, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Among the held high tokens and the `out` leaving ones (in that order), each head's quota ->
        (picked (B, H, keep), rest (B, H, held + out - keep): indices in order, chosen (B, H, held + out) bool, the
        leaving tokens' scores (B, H, out)). Sets the picks' `hscore` and counts the demoted."""
        b, h = self.wsum.shape[:2]
        held = self.high_tokens()
        keep = min(held + out, max(held, round(self.share * (self.left + out))))
        score = self.importance()[..., :out]
        rank = score
        if self.select == "random":  # the ablation: the same share drawn at random (and demoted at random)
            rank = torch.rand(score.shape, generator=self.draws).to(score.device)
        if held:
            ranked = self.hscore if self.demote else rank.new_full((b, h, held), float("inf"))
            rank = torch.cat([ranked, rank], 2)
        chosen = torch.zeros(b, h, held + out, dtype=torch.bool, device=rank.device)
        if keep:
            chosen.scatter_(2, rank.topk(keep, dim=2).indices, True)
        picked = chosen.nonzero()[:, 2].view(b, h, keep)  # row-major: each head's picks in order, held first
        rest = (~chosen).nonzero()[:, 2].view(b, h, held + out - keep)
        self.demoted += int((~chosen[..., :held]).sum()) / (b * h)
        self.hscore = rank.gather(2, picked) if keep and self.demote else None
        if self.places:
            order = torch.arange(self.left, self.left + out, dtype=torch.int32, device=rank.device).expand(b, h, out)
            self._record_demoted(rest, held)
            places = order if self.hpos is None else torch.cat([self.hpos, order], 2)
            self.hpos = places.gather(2, picked) if keep else None
        return picked, rest, chosen, score

    def _record_demoted(self, rest: torch.Tensor, held: int) -> None:
        """The demoted tokens among `rest` (each head's lead it: rest is sorted) join the body after its left - held
        tokens: their places and body indices, -1 where a head demotes fewer."""
        most = int((rest < held).sum(2).max()) if held else 0
        if not most:
            return
        j = torch.arange(most, device=rest.device)
        ok = rest[..., :most] < held
        mpos = torch.where(ok, self.hpos.gather(2, rest[..., :most].clamp(max=held - 1)), -1)
        midx = torch.where(ok, (self.left - held + j).to(torch.int32), -1)
        old = ([self.mpos], [self.midx]) if self.midx is not None else ([], [])
        self._set_moved(torch.cat(old[0] + [mpos], 2), torch.cat(old[1] + [midx], 2))

    def leave(self, out: int) -> None:
        """The first `out` window tokens have left."""
        self._window_range(out, self.window_count())
        self.wsum, self.wseen = self.wsum[..., out:].clone(), self.wseen[..., out:].clone()
        self.left += out

    def crop_window(self, keep: int) -> None:
        """Keep the first `keep` tokens held: a cut within the window, or below it where the family can cut its
        classes (`crop_coded`; each head holds other tokens below the window)."""
        coded = self.held() - self.window_count()
        n = max(keep - coded, 0)
        if keep < coded:
            if not self.places:
                raise KvshrinkError(f"{self.layout} crops only within its observation window: it can drop at most "
                                    f"{self.held() - coded} of its {self.held()} tokens; crop=true keeps the places "
                                    "a deeper cut needs")
            self.crop_coded(keep)
        self._window_range(0, n)
        self.wsum, self.wseen = self.wsum[..., :n].clone(), self.wseen[..., :n].clone()

    def crop_plan(self, into: int):
        """A cut below the window that keeps `into` of the tokens that left it (`places` families): which tokens each
        head keeps in each class. A head's body holds its tokens in the order they joined it: those that left the
        window in their order, with demoted ones among them (`mpos`, `midx`: their places and body indices). So its
        tokens before the cut are known, and every head must hold as many of each class: each keeps the fewest high
        tokens any head holds before the cut (lo), its most attended ones there, and its body up to the first token
        any head drops (`first`); its other body tokens before the cut and its c - lo least attended high tokens
        there (demoted: down, never up) are taken out and back in (decoded: only the rounding of a second coding is
        added, as a store's cut inside a coded block adds), `extra` tokens on every head.
        -> None where the family can cut its stores at the cut (nothing before it is high or out of order), else
        (first, extra, pick (B, H, extra): each head's tokens to re-append as indices into its body's tokens first..
        then its high tokens at `down` (B, H, extra), kept (B, H, lo): the high tokens each head keeps, in order).
        Sets the kept ones' places and scores, the re-appended ones' places, and `left`."""
        held, left = self.high_tokens(), self.left
        if held and self.hpos is None:
            raise KvshrinkError(f"{self.layout} cannot crop below its observation window after a cache file saved "
                                "without its high tokens' places: crop within the window, or save it again")
        self.left = into
        if not into or (not held and self.mpos is None):  # nothing kept, or the body in its order: a plain cut
            self.hk = self.hv = self.hscore = self.hpos = self.mpos = self.midx = None
            return None
        n_body = left - held
        pos = self._body_places(left, n_body)
        keep = pos < into
        dropping = ~keep
        first = int(torch.where(dropping.any(2), dropping.int().argmax(2), n_body).min())
        after = keep[..., first:]
        taken = after.sum(2, keepdim=True)  # body tokens past `first` each head keeps
        below = self.hpos < into if held else keep[..., :0]
        counts = below.sum(2, keepdim=True)
        lo = int(counts.min()) if held else 0
        extra = int((taken + counts - lo).max())
        j = torch.arange(extra, device=pos.device).expand(*pos.shape[:2], extra)
        border = (~after).to(torch.int8).argsort(dim=2, stable=True)[..., :extra]  # the kept ones first, in order
        body_at = border.gather(2, j.clamp(max=border.shape[2] - 1)) if border.shape[2] else j
        pick = torch.where(j < taken, body_at, n_body - first + (j - taken).clamp(min=0))
        pool = pos[..., first:]  # the places of the tokens `pick` indexes: the body's past `first`, then `down`'s
        # each head's high tokens before the cut by rank, its least attended first (no scores: the latest first)
        if held:
            rank = self.hscore if self.hscore is not None else -self.hpos.float()
            order = torch.where(below, rank, torch.inf).argsort(dim=2, stable=True)
            down = order[..., :extra].clamp(max=held - 1)
            kept = order.gather(2, (counts - lo) + torch.arange(lo, device=pos.device)).sort(2).values
            pool = torch.cat([pool, self.hpos.gather(2, down)], 2)
            self.demoted += float((counts - lo).float().mean())
        else:
            down = kept = j[..., :0]
        moved = pool.gather(2, pick)  # the re-appended tokens' places: out of order in the body now
        old = self.midx is not None
        mpos = [torch.where(self.midx < first, self.mpos, -1)] if old else []
        midx = [torch.where(self.midx < first, self.midx, -1)] if old else []
        self._set_moved(torch.cat(mpos + [moved], 2),
                        torch.cat(midx + [(first + j).to(torch.int32)], 2))
        self.hpos = self.hpos.gather(2, kept) if lo else None
        self.hscore = self.hscore.gather(2, kept) if lo and self.hscore is not None else None
        return first, extra, pick, down, kept

    def _body_places(self, left: int, n_body: int) -> torch.Tensor:
        """(B, H, n_body) int32: the place (among the tokens that left the window) of each head's body tokens, in the
        body's order: the demoted ones' as recorded, the others those no class holds, in their order."""
        b, h = self.wsum.shape[:2]
        dev = self.wsum.device
        taken = torch.zeros(b, h, left + 1, dtype=torch.bool, device=dev)  # the last column takes the padding
        moved = torch.zeros(b, h, n_body + 1, dtype=torch.bool, device=dev)
        pos = torch.full((b, h, n_body + 1), -1, dtype=torch.int32, device=dev)
        if self.hpos is not None:
            taken.scatter_(2, self.hpos.long(), True)
        if self.midx is not None:
            ok = self.midx >= 0
            at = torch.where(ok, self.midx, n_body).long()
            taken.scatter_(2, torch.where(ok, self.mpos, left).long(), True)
            moved.scatter_(2, at, True)
            pos.scatter_(2, at, self.mpos)
        moved[..., n_body] = True
        pos.masked_scatter_(~moved, (~taken[..., :left]).nonzero()[:, 2].to(torch.int32))  # row-major: each head's
        return pos[..., :n_body]

    def _set_moved(self, mpos: torch.Tensor, midx: torch.Tensor) -> None:
        """Body tokens out of their order, columns that hold none on any head dropped."""
        some = (midx >= 0).any(1).any(0)
        self.mpos, self.midx = (mpos[..., some], midx[..., some]) if bool(some.any()) else (None, None)

    def crop_coded(self, keep: int) -> None:
        """Keep the first `keep` tokens, a cut below the window (the family's, with `crop_plan`; the window is emptied
        after)."""
        raise NotImplementedError

    def _window_range(self, start: int, stop: int) -> None:
        """Keep window tokens start..stop of those held (copies: no view keeps the rest alive); a coded window's
        tail is coded first."""
        if self.window_codec is None:
            self.wk, self.wv = self.wk[:, :, start:stop].clone(), self.wv[:, :, start:stop].clone()
            return
        self.code_tail()
        if self.wk is not None and (start, stop) != (0, self.wk.num_tokens):
            if stop > start:
                self.wk, self.wv = self.wk.blocks(start, stop), self.wv.blocks(start, stop)
            else:
                self.wk = self.wv = None

    def reset(self) -> None:
        super().reset()
        self.reset_scores()

    def _keep_first(self, keep: int) -> None:
        self.crop_window(keep)

    def slide(self, window: int) -> None:
        raise KvshrinkError(f"{self.layout} keeps each head's own tokens per class and cannot free the oldest by "
                            "position: no sliding-window layers")

    def window_map(self, on_tensor, on_packed=None) -> None:
        """on_packed: what to do with a coded window's codes (the family's map of its Packed records)."""
        if self.window_codec is None:
            self.wk, self.wv = on_tensor(self.wk), on_tensor(self.wv)
        else:
            self.tail = tuple(on_tensor(t) for t in self.tail)
            if self.wk is not None:
                self.wk, self.wv = on_packed(self.wk), on_packed(self.wv)
        self.wsum, self.wseen = on_tensor(self.wsum), on_tensor(self.wseen)
        if self.hscore is not None:
            self.hscore = on_tensor(self.hscore)
        for name in ("hpos", "mpos", "midx"):
            if getattr(self, name) is not None:
                setattr(self, name, on_tensor(getattr(self, name)))

    def saved_parts(self) -> tuple[dict, dict]:
        """What a cache file holds beside the stores (core/saved.py): the window (a coded one's tail too) and its
        scores, the high class (`hk`, `hv`: float16 tensors or packed codes), the random picks' generator, and the
        counts."""
        tail = self.tail or (None, None)
        parts = {"wk": self.wk, "wv": self.wv, "tk": tail[0], "tv": tail[1], "wsum": self.wsum, "wseen": self.wseen,
                 "hscore": self.hscore, "hpos": self.hpos, "mpos": self.mpos, "midx": self.midx, "hk": self.hk,
                 "hv": self.hv,
                 "draws": self.draws.get_state()}
        numbers = {"share": self.share, "left": self.left, "unscored": self.unscored, "demoted": self.demoted}
        return parts, numbers

    def restore_parts(self, parts: dict, numbers: dict) -> None:
        """The inverse of `saved_parts`, on a layer opened for the saved shapes (`lazy_initialization`)."""
        if numbers["share"] != self.share:
            raise KvshrinkError(f"the cache file keeps {numbers['share']:.0%} of this layer's tokens in the high class, "
                                f"this method {self.share:.0%}: load it with the share calibration it was saved with")
        for name in ("wk", "wv", "wsum", "wseen", "hscore", "hk", "hv"):
            setattr(self, name, parts[name])
        # absent from files saved before places were kept: no crop below the window
        self.hpos, self.mpos, self.midx = parts.get("hpos"), parts.get("mpos"), parts.get("midx")
        if self.window_codec is not None:
            self.tail = parts["tk"], parts["tv"]
        self.draws.set_state(parts["draws"].cpu())
        self.left, self.unscored, self.demoted = numbers["left"], numbers["unscored"], numbers["demoted"]

    def window_tensors(self) -> list[torch.Tensor]:
        held = [self.wk, self.wv]
        if self.window_codec is not None:
            held = [t for p in held if p is not None for t in p.tensors.values()] + list(self.tail)
        return [t for t in (*held, self.wsum, self.wseen, self.hscore, self.hpos, self.mpos, self.midx)
                if t is not None]


def causal(t: int, n: int, device) -> torch.Tensor:
    """(t, n) bool: this call's t queries over the last n tokens, which end with the t new ones (causal)."""
    return torch.ones(t, n, dtype=torch.bool, device=device).tril_(n - t)


def lse_probs(q: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, softcap, t: int = 1) -> torch.Tensor:
    """q (B, H, G, rows, d): the last rows of a call of t tokens, scaled (in the keys' coordinates); keys (B, H, n, w)
    with w <= d; lse (B, H, G, rows, 1): each row's log-sum-exp from a kernel -> the rows' probabilities of the keys,
    exp(logit - lse), zero where a row of a longer call cannot see a key (keys ending with the call's own)."""
    p = torch.exp(soft_cap(q[..., :keys.shape[-1]] @ keys.float()[:, :, None].transpose(3, 4), softcap) - lse)
    if t > 1:
        rows, n = p.shape[-2:]
        p = p.masked_fill(~causal(t, n, p.device)[t - rows:], 0.0)
    return p


def rows_of(index: torch.Tensor, d: int) -> torch.Tensor:
    """index (B, H, n) as a gather index over head vectors of width d."""
    return index[..., None].expand(*index.shape, d)
