"""TokenStore: the keys (or the values) of one cache layer, oldest first.

  sink   - the first `sink` tokens, float16 (attention sinks carry outliers)
  body   - tokens coded by `codec`, in blocks of `block` tokens
  stage  - tokens of the unfinished block, coded per token. For a codec that
           needs whole blocks (per-channel keys) the stage uses `stage_codec`
           (two bits more, rotated) and a full stage is decoded and re-coded as one
           body block; for a per-token codec the stage uses the codec itself
           and its whole blocks are moved into the body as they are. Either way
           the body grows once per `block` tokens, not once per token, and
           always holds whole blocks (so keys and values split alike).
  window - the `window` most recent tokens, float16, or per-token codes of
           `window_codec` (a wider code than the body's: the nearest tokens carry
           the most attention, and a query sees them at that code). Decode steps'
           tokens join a coded window in float16 (`tail`) and are coded `gather`
           at a time, as many older ones leaving: one coding call per `gather`
           steps, not two per step

Every part holds the only copy of its tokens: nothing is kept twice.

`share()` freezes the body: its blocks join `shared` (a tuple of bodies, oldest first, never
written again) and later blocks start a new body of the store's own. A fork of a cache made after
`share()` (serve/park.py) holds the same frozen blocks, so a prefix that many sequences start
with is stored once, each sequence's own blocks after it (copy-on-write by block: nothing shared
is ever copied to be grown). `body_parts()` lists the frozen bodies and the own one for readers
that take them apart (decoding, the int kernel's batched call); `body` joins them into one body
the first time a reader needs a single one, after which the store holds that copy instead.

`widths` = (dense, body) lets the two ends keep more coordinates than the middle
(ZDC: sink and window tokens keep `sink_rank` coordinates, the rest a head's rank):
sink and window hold the first `dense` coordinates of what `append` is given, body,
stage and the float16 decode tokens the first `body`. A token narrows once, as it
leaves the window; nothing is widened back.

Decode steps (`append(x, defer=True)`) code nothing per token: their tokens
wait in float16 (`fresh`, between the stage and the window, as KVComp keeps its
recent tokens) until, with the stage, they fill a block. That block is coded by
`executor` (a worker thread) when one is set, else at once; with a worker the
next `append` takes the grown body (waiting if the worker is not done), so no
decode step pays for coding and the result does not depend on the thread's
timing. With `gather` set, at most that many wait: every `gather` of them are
staged as codes in one call, the same codes a prompt's tokens get (a decoding
sequence then holds what a prompt of its length holds, up to `gather` float16
tokens, where a whole block's worth waited before; one coding call per `gather`
steps). A store whose stage codec is float16 ignores it. Longer calls (prefill,
perplexity chunks) code through the stage as described above.
"""

from __future__ import annotations

import numpy as np
import torch

from ..codecs.base import Codec, Fp16, Packed, tensor_nbytes
from ..errors import KvshrinkError


def half_checked(x: torch.Tensor) -> torch.Tensor:
    """x as float16, refusing NaN, inf and values beyond the float16 range. On a GPU the check waits
    for the codec, which checks every block it codes: checking here would stall the device's queue
    at every layer of every decode step (a host sync)."""
    x16 = x.to(torch.float16)
    # numpy's check: a third of torch's dispatch on a decode token (every store of every layer and sequence)
    if x16.device.type == "cpu" and not np.isfinite(x16.detach().numpy()).all():
        raise KvshrinkError("key/value states are NaN, infinite or beyond the float16 range")
    return x16


def _slice(x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    # clone: a view would keep the whole parent storage alive
    return x[..., start:stop, :].clone()


class TokenStore:
    def __init__(self, codec: Codec, sink: int, window: int, block: int, stage_codec: Codec | None = None,
                 widths: tuple[int | None, int | None] = (None, None), gather: int | None = None):
        self.recode = codec.block_tokens > 1
        if self.recode and stage_codec is None:
            raise KvshrinkError(f"{codec.describe()} codes whole blocks and needs a stage codec")
        dense, body = widths
        if window and dense is not None and body is not None and dense < body:
            raise KvshrinkError(f"window tokens narrow to the body's {body} coordinates as they leave it: "
                                f"a window needs at least as many ({dense} given)")
        self.codec = codec
        self.stage_codec = stage_codec if self.recode else codec
        # decode tokens that wait in float16 before they are staged (None: until a block fills)
        self.gather = None if isinstance(self.stage_codec, Fp16) else gather
        if gather is not None and not (isinstance(gather, int) and gather >= 1):
            raise KvshrinkError(f"gather must be a positive integer, got {gather!r}")
        self.sink_size, self.window_size, self.block = sink, window, block
        self.dense_width, self.body_width = dense, body
        # coordinates an input token needs (None: all of them)
        self.width = None if dense is None or body is None else max(dense, body)
        self.sink = self.window = self.tail = None
        self.shared: tuple = ()  # frozen bodies, oldest first (see the module doc)
        self.own: Packed | None = None  # the body's blocks after them
        self.stage: Packed | None = None
        self.fresh = None  # float16 tokens of decode steps, not coded yet (see the module doc)
        self.executor = None  # a concurrent.futures executor for background coding
        self._pending = None  # (future of the grown body, fresh tokens it takes)
        self.window_codec = None  # float16 window; code_window sets per-token codes

    def code_window(self, codec: Codec) -> None:
        """Hold the window as per-token codes of `codec` rather than float16 (before the first tokens)."""
        if self.sink is not None:
            raise KvshrinkError("a store's window codec is set before its first tokens")
        if codec.block_tokens != 1 or (self.dense_width, self.body_width) != (None, None):
            raise KvshrinkError(f"a window codec codes each token alone, at every coordinate: {codec.describe()} "
                                "does not")
        self.window_codec = codec

    def init(self, like: torch.Tensor) -> None:
        b, h, d = like.shape[0], like.shape[1], like.shape[3]
        dense = like.new_empty(b, h, 0, d if self.dense_width is None else self.dense_width, dtype=torch.float16)
        self.sink, self.body, self.stage = dense, None, None
        self.window = dense.clone() if self.window_codec is None else None  # coded: a Packed, None while empty
        self.tail = None if self.window_codec is None else dense.clone()  # a coded window's float16 decode tokens
        self.fresh = like.new_empty(b, h, 0, d if self.body_width is None else self.body_width, dtype=torch.float16)

    def __len__(self) -> int:
        if self.sink is None:
            return 0
        return (self.sink.shape[-2] + self.body_tokens() + self.tokens_in(self.stage) + self.fresh.shape[-2]
                + self.window_tokens())

    def window_tokens(self) -> int:
        w = self.window
        n = 0 if w is None else w.num_tokens if isinstance(w, Packed) else w.shape[-2]
        return n + (self.tail.shape[-2] if self.tail is not None else 0)

    def window_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The window's tokens as one dense tensor, decoded where they are coded; dtype None: float16 as held, or
        float32 decoded from codes."""
        if self.window_codec is None:
            return self.window if dtype in (None, self.window.dtype) else self.window.to(dtype)
        dtype = dtype or torch.float32
        if self.window is None:
            return self.tail.to(dtype)
        return torch.cat([self.window_codec.decode(self.window, dtype), self.tail.to(dtype)], dim=-2)

    @property
    def body(self) -> Packed | None:
        """The coded blocks as one body: frozen bodies, if any, are joined with the own one here, once
        (a copy the store then holds instead of sharing them)."""
        if self.shared:
            self.shared, self.own = (), self.joined()
        return self.own

    @body.setter
    def body(self, packed: Packed | None) -> None:
        self.shared, self.own = (), packed

    def joined(self) -> Packed | None:
        """The body as one part, without changing what the store holds (a copy where it is in parts)."""
        self.settle()
        parts = self.body_parts()
        if not parts:
            return None
        body = parts[0]
        for p in parts[1:]:
            body = body.cat(p)
        return body

    def body_parts(self) -> list:
        """The body as the frozen bodies and the own one, oldest first (empty ones left out)."""
        return [*self.shared, *((self.own,) if self.own is not None else ())]

    def body_tokens(self) -> int:
        return sum(p.num_tokens for p in self.shared) + self.tokens_in(self.own)

    def share(self) -> None:
        """Freeze the body: its blocks become shared with any fork made from now on (module doc)."""
        self.settle()
        if self.own is not None:
            self.shared, self.own = self.shared + (self.own,), None

    @staticmethod
    def tokens_in(p: Packed | None) -> int:
        """Tokens of one coded part (body or stage), 0 for none."""
        return p.num_tokens if p is not None else 0

    @staticmethod
    def _join(a: Packed | None, b: Packed) -> Packed:
        return b if a is None else a.cat(b)

    def settle(self) -> None:
        """Take the body a background job built; its tokens leave the stage and `fresh`."""
        if self._pending is None:
            return
        future, taken = self._pending
        self._pending = None
        self.own = future.result()
        self.stage = None
        self.fresh = _slice(self.fresh, taken)

    def _grow(self, body: Packed | None, stage: Packed | None, x: torch.Tensor) -> Packed:
        """body + one or more whole blocks made of the stage and the tokens x, coded (per-token
        codes: the staged codes move on as they are; whole-block codes: re-coded with x)."""
        x = x.float()
        if self.recode:
            if stage is not None:
                x = torch.cat([self.stage_codec.decode(stage, torch.float32), x], dim=-2)
            return self._join(body, self.codec.encode(x, self.block))
        coded = self.codec.encode(x, 1)
        return self._join(body, coded if stage is None else stage.cat(coded))

    def _code_fresh(self) -> None:
        """Whole blocks of stage + fresh tokens go to the body (on the worker when there is one); short
        of a block, `gather` fresh tokens are staged."""
        full = (self.tokens_in(self.stage) + self.fresh.shape[-2]) // self.block * self.block
        if not full:
            if self.gather is not None and self.fresh.shape[-2] >= self.gather:
                x, self.fresh = self.fresh.float(), _slice(self.fresh, 0, 0)
                self._push(x)  # short of a block: staged
            return
        taken = full - self.tokens_in(self.stage)
        args = (self.own, self.stage, self.fresh[..., :taken, :])
        if self.executor is None:
            self.own, self.stage, self.fresh = self._grow(*args), None, _slice(self.fresh, taken)
        else:
            self._pending = (self.executor.submit(self._grow, *args), taken)

    def _flush_fresh(self) -> None:
        """Code the float16 tokens through the stage (before a long call, a crop or a reshuffle)."""
        self.settle()
        if self.fresh is not None and self.fresh.shape[-2]:
            x, self.fresh = self.fresh.float(), _slice(self.fresh, 0, 0)
            self._push(x)

    def append(self, x: torch.Tensor, defer: bool = False, checked: bool = False) -> None:
        """defer: a decode step; its tokens wait in float16 and filled blocks are coded by
        `executor` in the background (see the module doc). checked: x is float16 and already through
        `half_checked` (checked once for every store of a layer, or of a server's step)."""
        if defer:
            self.settle()
        else:
            self._flush_fresh()
        x = x[..., :self.width]
        self._add(x if checked else half_checked(x), defer)

    def _add(self, x16: torch.Tensor, defer: bool) -> None:
        """float16 tokens through sink and window; what leaves the window, narrowed to the body's
        coordinates, waits in float16 (defer) or is coded (see the module doc)."""
        room = self.sink_size - self.sink.shape[-2]
        if room > 0:
            self.sink = torch.cat([self.sink, x16[..., :room, :self.dense_width]], dim=-2)
            x16 = x16[..., room:, :]
        if x16.shape[-2] == 0:
            return
        if self.window_size and self.window_codec is not None:
            x16 = self._through_coded_window(x16, defer)
            if x16 is None:
                return
        elif self.window_size:
            held = self.window.shape[-2]
            out = held + x16.shape[-2] - self.window_size
            if out <= 0:
                self.window = torch.cat([self.window, x16[..., :self.dense_width]], dim=-2)
                return
            if out <= held:  # a decode step: the oldest window tokens leave (one cat, no clone)
                leaving = self.window[..., :out, :]
                self.window = torch.cat([self.window[..., out:, :], x16[..., :self.dense_width]], dim=-2)
            else:
                window = torch.cat([self.window, x16[..., :self.dense_width]], dim=-2)
                leaving, self.window = window[..., :out, :], _slice(window, out)
            x16 = leaving
        x16 = x16[..., :self.body_width]
        if defer:
            self.fresh = torch.cat([self.fresh, x16], dim=-2)
            self._code_fresh()
        else:
            self._push(x16.float())

    def _through_coded_window(self, x16: torch.Tensor, defer: bool) -> torch.Tensor | None:
        """x16 into the coded window; the tokens that leave it, oldest first (decoded), or None. Codes are per
        token, so tokens leave as whole blocks of the Packed: none is coded twice while in the window. A decode
        step's tokens wait in the float16 tail until `gather` of them are coded together."""
        x16 = torch.cat([self.tail, x16], dim=-2)  # a new tensor: the tail holds no caller's storage
        if defer and x16.shape[-2] < (self.gather or 1):
            self.tail = x16
            return None
        self.tail = _slice(self.tail, 0, 0)
        held = self.window_tokens()
        out = held + x16.shape[-2] - self.window_size
        k = min(max(out, 0), held)  # leaving from the window's codes; the rest of `out` from x16
        leaving = [self.window_codec.decode(self.window.first_blocks(k), torch.float16)] if k else []
        kept = self.window if not k else self.window.drop_first(k) if k < held else None
        entering = x16[..., max(out - k, 0):, :]
        if out - k > 0:
            leaving.append(x16[..., :out - k, :])
        self.window = self._join(kept, self.window_codec.encode(entering.float(), 1)) if entering.shape[-2] else kept
        return torch.cat(leaving, dim=-2) if leaving else None

    def _window_first(self, n: int) -> None:
        """Keep the window's first n tokens (a crop)."""
        if self.window_codec is None:
            self.window = _slice(self.window, 0, n)
        else:
            coded = self.window.num_tokens if self.window is not None else 0
            self.window = self.window.first_blocks(min(n, coded)) if min(n, coded) else None
            self.tail = _slice(self.tail, 0, max(n - coded, 0))

    def thaw(self) -> None:
        """The stage's tokens (decoded once) join the float16 tokens: a layer whose kernel reads only
        body and float16 tokens calls this before a decode step."""
        self.settle()
        if self.stage is not None:
            staged = self.stage_codec.decode(self.stage, torch.float32).to(torch.float16)
            self.fresh, self.stage = torch.cat([staged, self.fresh], dim=-2), None

    def _push(self, x: torch.Tensor) -> None:
        """Code tokens leaving the window: whole blocks (with the stage) into the body, the rest staged."""
        staged = self.tokens_in(self.stage)
        if staged + x.shape[-2] < self.block:
            self.stage = self._join(self.stage, self.stage_codec.encode(x, 1))
            return
        taken = (staged + x.shape[-2]) // self.block * self.block - staged
        self.own = self._grow(self.own, self.stage, x[..., :taken, :])
        rest = x[..., taken:, :]
        self.stage = self.stage_codec.encode(rest, 1) if rest.shape[-2] else None

    def decoded(self, dtype: torch.dtype, then: torch.Tensor | None = None) -> torch.Tensor:
        """All stored tokens decompressed to `dtype`, followed by `then`: one temporary buffer,
        each part decoded straight into its slice (a store of one width: see `middle`)."""
        if self.dense_width != self.body_width:
            raise KvshrinkError("a store of two widths decodes its parts apart: sink, middle(), window")
        return self._decoded(self.parts() + [(then, None)], dtype, self.sink.shape[-1])

    def middle(self, dtype: torch.dtype) -> torch.Tensor:
        """Body, stage and float16 decode tokens decompressed to `dtype`: the tokens at the body's width."""
        return self._decoded(self.parts()[1:-1], dtype, self.fresh.shape[-1])

    def _decoded(self, parts: list[tuple], dtype: torch.dtype, width: int) -> torch.Tensor:
        if all(c is None or type(c) is Fp16 for _, c in parts):
            # float16 parts (the fp16 reference): one cat, converting as it copies, as DynamicCache's
            # one cat; a copy per part, with Python around each, cost a served fp16 step ~10% of its updates
            xs = [p if c is None else c.flat(p) for p, c in parts if p is not None]
            out = torch.cat(xs, dim=-2)
            return out if out.dtype == dtype else out.to(dtype)
        sizes = [(p.num_tokens if c is not None else p.shape[-2]) if p is not None else 0 for p, c in parts]
        out = torch.empty(*self.sink.shape[:2], sum(sizes), width, dtype=dtype, device=self.sink.device)
        at = 0
        for (part, codec), n in zip(parts, sizes):
            if n:
                dst = out[..., at:at + n, :]
                if codec is None:
                    dst.copy_(part)
                else:
                    codec.decode(part, dtype, out=dst)
                at += n
        return out

    def parts(self) -> list[tuple]:
        """(part, codec) oldest first: sink (None), body, stage, fresh and window (None); empty coded
        parts left out."""
        out = [(self.sink, None)] + [(p, self.codec) for p in self.body_parts()]
        out += [(self.stage, self.stage_codec)] if self.stage is not None else []
        if self.window_codec is None:
            return out + [(self.fresh, None), (self.window, None)]
        coded = [(self.window, self.window_codec)] if self.window is not None else []
        return out + [(self.fresh, None), *coded, (self.tail, None)]

    def crop(self, keep: int) -> None:
        """Keep the first `keep` tokens."""
        self._flush_fresh()
        n_sink, n_body, n_stage = self.sink.shape[-2], self.tokens_in(self.body), self.tokens_in(self.stage)
        if keep >= n_sink + n_body + n_stage:
            self._window_first(keep - n_sink - n_body - n_stage)
        elif keep >= n_sink + n_body:
            self.stage = self.stage.first_blocks(keep - n_sink - n_body) if keep > n_sink + n_body else None
            self._window_first(0)
        elif keep > n_sink and not self.recode:
            # one token per coded block: an exact cut; the cut block's tokens go back to the stage
            into = keep - n_sink
            full = into // self.block * self.block
            body = self.body
            self.body = body.first_blocks(full) if full else None
            self.stage = body.blocks(full, into) if into > full else None
            self._window_first(0)
        elif keep > n_sink:
            # whole blocks stay coded; the cut block's kept tokens become float16 decode tokens
            # (already lossy: only float16 rounding is added), before an empty window
            into = keep - n_sink
            full = into // self.block
            head = self.codec.decode(self.body, torch.float32)[..., full * self.block:into, :]
            self.body = self.body.first_blocks(full) if full else None
            self.stage, self.fresh = None, head.to(torch.float16)
            self._window_first(0)
        else:
            self.sink = _slice(self.sink, 0, keep)
            self.body = self.stage = None
            self._window_first(0)

    def drop_first(self, n: int) -> int:
        """Free the whole body blocks among the oldest n tokens (a sliding layer's tokens no query
        sees again); returns how many tokens went. Only body blocks go: sink, stage and float16
        tokens stay (a sliding layer has no sink)."""
        self.settle()
        if self.sink.shape[-2]:
            raise KvshrinkError("a store with sink tokens cannot free its oldest blocks")
        n_body = self.tokens_in(self.body)
        k = min(n, n_body) // self.block * self.block
        if k:
            self.body = self.body.drop_first(k) if k < n_body else None
        return k

    def map_batch(self, on_tensor, on_packed) -> None:
        self.settle()
        if self.sink is None:
            return
        self.sink, self.fresh = on_tensor(self.sink), on_tensor(self.fresh)
        if self.window is not None:
            self.window = (on_packed if isinstance(self.window, Packed) else on_tensor)(self.window)
        if self.tail is not None:
            self.tail = on_tensor(self.tail)
        self.body = on_packed(self.body) if self.body is not None else None
        self.stage = on_packed(self.stage) if self.stage is not None else None

    def tensors(self) -> list[torch.Tensor]:
        if self.sink is None:
            return []
        out = [self.sink, self.fresh, *self.codec.shared_tensors()]
        out += [t for t in (self.window, self.tail) if isinstance(t, torch.Tensor)]
        for p in (*self.body_parts(), self.stage, self.window if isinstance(self.window, Packed) else None):
            if p is not None:
                out.extend(p.tensors.values())
        return out

    def nbytes(self) -> int:
        return tensor_nbytes(self.tensors())
