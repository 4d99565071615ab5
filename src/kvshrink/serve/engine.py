"""Continuous batching over compressed caches: the scheduler and its step loop.

Each step (one thread, `Engine.run`): finished and aborted requests leave; waiting requests join
while the bytes they will need fit the KV budget (`budget.ByteModel`, measured for the method);
then one forward call over every running sequence's new tokens (a decoding sequence's last token,
a prefilling one's next prompt chunk; `ragged.RaggedCache`), and one sampled token for each
sequence whose prompt is all in its cache. A request's tokens reach its caller through `emit`,
called on the engine thread (the server hands them to its event loop).

If the caches ever hold more than the budget (a measured need that fell short), the newest
request is preempted: its cache is parked on disk (`park.Parking`), it is queued first again, and
when it is admitted next its cache is read back and it continues from the token it had reached,
nothing recomputed. (`park=False`: the cache is freed and the sequence recomputed, vLLM's default.)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..compat import with_cache
from ..codecs.base import storage_bytes
from ..errors import KvshrinkError
from ..spec import spec_from_config
from .park import Parking
from .prefix import PrefixStore
from .ragged import RaggedCache, Segment

FINISHED = ("stop", "length")
# the running caches' bytes are summed every this many steps, and whenever a request joins or leaves:
# summing every tensor's storage each step cost about 5% of a 15-sequence step; in 8 steps a sequence
# grows by 8 float16 tokens
HELD_EVERY = 8


class QueueFull(KvshrinkError):
    """More requests wait than the queue limit allows (HTTP 429)."""


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple = ()
    seed: int | None = None
    ignore_eos: bool = False  # the serve bench fixes output lengths, as vLLM's benchmarks do


@dataclass(eq=False)
class Request:
    """One generation. emit(kind, payload) receives ("text", str) deltas, then ("done", finish
    reason) or ("error", message)."""

    prompt: list
    sampling: Sampling
    emit: object
    id: str = ""
    out: list = field(default_factory=list)
    cache: object = None
    fed: int = 0  # tokens of prompt + out already in the cache
    sent: int = 0  # characters of the output text already emitted
    reserved: int = 0  # bytes of cache it may come to hold beyond what it shares with a prefix entry
    need: int = 0  # bytes of cache it may come to hold in all
    source: tuple | None = None  # the key of the prefix entry its cache was forked from
    arrived: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    finish: str | None = None
    gen: torch.Generator | None = None
    cold: bool = True  # its cache is what a cold prefill from offset 0 builds (prefix.py)

    def tokens(self) -> list:
        return self.prompt + self.out


class Engine:
    """model: prepared for `method` (api.prepare); make_cache() -> a fresh cache of the method;
    need: budget.ByteModel of that method; kv_budget: bytes all caches together may hold."""

    def __init__(self, model, tokenizer, make_cache, need, kv_budget: int, max_running: int = 64,
                 step_tokens: int = 256, queue_limit: int = 256, max_context: int | None = None, metrics=None,
                 park: bool = True, prefix: PrefixStore | None = None):
        self.model, self.tok, self.make_cache, self.need = model, tokenizer, make_cache, need
        self.parking = Parking()  # a temporary folder, made at the first preemption
        self.park = park
        self.tokens_fed, self.preemptions = 0, 0  # tokens run through the model (prompt, output, and any recomputed)
        spec = spec_from_config(model.config)
        self.windows = [spec.sliding_window if spec.is_sliding(i) else None for i in range(spec.num_layers)]
        self.kv_budget, self.max_running, self.step_tokens = int(kv_budget), max_running, step_tokens
        self.queue_limit, self.max_context, self.metrics = queue_limit, max_context, metrics
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self.waiting: deque = deque()
        self.running: list = []
        self.aborted: set = set()
        self.lock = threading.Condition()
        self.stopping = False
        self.ids = itertools.count()
        self.peak_running = 0
        self.prefix = prefix if prefix is not None else PrefixStore()
        # bytes held (every storage counted once), measured every HELD_EVERY steps and after every
        # change of who holds a cache: by the running requests, by the prefix entries, by either
        self.held_running = self.held_prefix = self.held = 0
        self.peak_held = 0  # the most `held` measured
        self.steps = 0
        self._stale = False
        self.thread: threading.Thread | None = None

    # -- called from other threads ------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        if not req.id:
            req.id = f"req-{next(self.ids)}"
        total = len(req.prompt) + req.sampling.max_tokens
        if self.max_context and total > self.max_context:
            raise KvshrinkError(f"prompt of {len(req.prompt)} tokens + max_tokens {req.sampling.max_tokens} is longer "
                                f"than the model allows ({self.max_context})")
        if self.need.need(total) > self.kv_budget:
            raise KvshrinkError(f"prompt of {len(req.prompt)} tokens + max_tokens {req.sampling.max_tokens} needs "
                                f"{self.need.need(total)} bytes of cache, more than the whole KV budget "
                                f"({self.kv_budget})")
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.queue_limit:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue limit); retry later")
            req.gen = torch.Generator().manual_seed(req.sampling.seed if req.sampling.seed is not None
                                                    else torch.seed() & 0xFFFFFFFF)
            self.waiting.append(req)
            self.lock.notify()
        return req

    def abort(self, req_id: str) -> None:
        """Stop a request (its client went away); its cache is freed at the next step."""
        with self.lock:
            self.aborted.add(req_id)
            self.lock.notify()

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self.run, name="kvshrink-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish nothing new: every request still queued or running is answered with an error."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.running), len(self.waiting)

    # -- the engine thread --------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self.lock:
                while not (self.stopping or self.waiting or self.running or self.aborted):
                    self.lock.wait()
                if self.stopping:
                    break
            try:
                self.step()
            except Exception as err:  # a fault in one step answers its requests, never kills the server
                for req in list(self.running):
                    self._finish(req, None, f"internal error: {type(err).__name__}: {err}")
        with self.lock:
            left = list(self.running) + list(self.waiting)
            self.waiting.clear()
        for req in left:
            self._finish(req, None, "the server shut down before this request finished")
        self.parking.close()

    def reserved(self) -> int:
        """The running requests' reservations: a request forked from a prefix entry reserves what it
        may hold beyond the blocks it shares with the entry (the entry's bytes are counted as the
        entry's), or all it needs once that entry is gone."""
        return sum(r.reserved if r.source in self.prefix else r.need for r in list(self.running))

    def held_tokens(self) -> int:
        return sum(r.fed for r in list(self.running))

    def _admit(self) -> None:
        with self.lock:
            gone = self.aborted
            self.aborted = set()
            for req in [r for r in self.waiting if r.id in gone]:
                self.waiting.remove(req)
                self._finish(req, "abort")
            for req in [r for r in self.running if r.id in gone]:
                self._finish(req, "abort")
            while self.waiting and len(self.running) < self.max_running:
                req = self.waiting[0]
                need = self.need.need(len(req.prompt) + req.sampling.max_tokens)
                parked = req.id in self.parking
                key = None if parked else self.prefix.match(req.prompt)
                own = max(0, need - self.prefix.shareable(key))  # the blocks it will share are the entry's
                if self._short(own) > 0:  # prefix entries give their room back first
                    self._free_prefix(own, keep=key)
                if self._short(own) > 0:
                    break
                self.waiting.popleft()
                req.reserved, req.need = own, need
                if parked:  # preempted and parked: back as it was
                    req.cache, req.source = self.parking.resume(req.id), None
                else:
                    req.cache, req.fed, req.cold, req.source = self.prefix.take(req.prompt)
                    req.cache = req.cache or self.make_cache()
                self.running.append(req)
                self._stale = True
        self.peak_running = max(self.peak_running, len(self.running))

    def _batch(self) -> tuple[list, list]:
        """(requests, new token counts): decoding ones first, then whole prompt chunks of step_tokens: the
        first always (so a step holds at most step_tokens + one token per decoding sequence), more while
        they fit in step_tokens."""
        reqs, counts, room = [], [], self.step_tokens
        for req in self.running:
            if len(req.tokens()) - req.fed == 1:
                reqs.append(req)
                counts.append(1)
                room -= 1
        chunked = False
        for req in self.running:
            left = len(req.tokens()) - req.fed
            n = min(left, self.step_tokens)
            # whole chunks at fixed offsets (0, step_tokens, ...), whatever else runs: a compressed cache
            # codes a block cut by a chunk edge through its stage, so the edges must not depend on the batch
            if left > 1 and (n <= room or not chunked):
                reqs.append(req)
                counts.append(n)
                room -= n
                chunked = True
        return reqs, counts

    @torch.no_grad()
    def step(self) -> None:
        self._admit()
        if not self.running:
            if self._stale:
                self.measure()
                if self.metrics:
                    self.metrics.refresh(self)
            return
        reqs, counts = self._batch()
        ids, pos, segs, at = [], [], [], 0
        for req, n in zip(reqs, counts):
            toks = req.tokens()[req.fed:req.fed + n]
            ids.extend(toks)
            pos.extend(range(req.fed, req.fed + n))
            segs.append(Segment(req.cache, at, n))
            at += n
        sample_at = [i for i, (req, n) in enumerate(zip(reqs, counts)) if req.fed + n == len(req.tokens())]
        ends = torch.tensor([segs[i].start + segs[i].length - 1 for i in sample_at], dtype=torch.long)
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a 4D mask: transformers builds none; RaggedStates masks
        cache = with_cache(self.model, RaggedCache(segs, self.windows))
        logits = self.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), attention_mask=mask,
                            use_cache=True, logits_to_keep=ends, **cache).logits[0]
        now = time.perf_counter()
        for req, n in zip(reqs, counts):
            req.fed += n
            if req.cold and req.fed < len(req.prompt) and req.fed % self.step_tokens == 0:  # a whole chunk's end
                k = req.fed // self.step_tokens  # shared at chunks 1, 2, 4, 8...: log2 parts (prefix.py)
                self.prefix.add(req.prompt[:req.fed], req.cache, finished=False, share=k & (k - 1) == 0)
        self.tokens_fed += len(ids)
        for row, i in enumerate(sample_at):
            req = reqs[i]
            tok = self._sample(logits[row].float(), req)
            req.out.append(tok)
            if req.first is None:
                req.first = now
                if self.metrics:
                    self.metrics.ttft(now - req.arrived)
            elif self.metrics:
                self.metrics.tpot(now - req.last)
            req.last = now
            self._emit_text(req, tok)
        self.steps += 1
        if self._stale or self.steps % HELD_EVERY == 0:
            self.measure()
        if self.held > self.kv_budget:
            self._free_prefix(0)
        while self.held > self.kv_budget and len(self.running) > 1:
            self._preempt(self.running[-1])
        if self.metrics:
            self.metrics.step(self, len(sample_at))

    def _short(self, need: int) -> int:
        """Bytes missing for one more request of `need`: the reservations (or the bytes only running
        requests hold, if a need fell short), the bytes prefix entries hold (shared ones included) and
        `need` against the budget."""
        return max(self.reserved(), self.held - self.held_prefix) + self.held_prefix + need - self.kv_budget

    def _free_prefix(self, need: int, keep=None) -> None:
        """Drop the least recently used prefix entries but `keep` until `need` fits or none is left; each
        dropped entry's bytes bound what it frees, so the bytes are measured once per round, not per entry."""
        while self._short(need) > 0 and len(self.prefix) > (keep is not None):
            short, freed = self._short(need), 0
            while freed < short:
                got = self.prefix.drop_oldest(keep)
                if not got:
                    break
                freed += got
            self.measure()

    def measure(self) -> None:
        running = storage_bytes(t for r in self.running for t in r.cache.payload())
        prefix = storage_bytes(self.prefix.payload())
        self.held_running, self.held_prefix = sum(running.values()), sum(prefix.values())
        self.held = sum((running | prefix).values())  # a storage both hold, once
        self.peak_held = max(self.peak_held, self.held)
        self._stale = False

    def _sample(self, logits: torch.Tensor, req: Request) -> int:
        s = req.sampling
        if s.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, -1)
        if s.top_p < 1.0:
            p, order = probs.sort(descending=True)
            keep = p.cumsum(0) - p < s.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=req.gen))

    def _emit_text(self, req: Request, tok: int) -> None:
        s = req.sampling
        done = tok in self.eos and not s.ignore_eos
        out = req.out[:-1] if done else req.out
        text = self.tok.decode(out, skip_special_tokens=True)
        reason = "stop" if done else None
        cut = len(text)
        for stop in s.stop:
            k = text.find(stop, max(0, req.sent - len(stop)))
            if k >= 0 and k < cut:
                cut, reason = k, "stop"
        if reason is None and len(req.out) >= s.max_tokens:
            reason = "length"
        if reason is None:  # hold back what may be the start of a stop string, or half a character
            hold = max([len(p) for stop in s.stop for p in _prefixes(stop) if text.endswith(p)] + [0])
            cut = len(text) - hold
            while cut > req.sent and text[cut - 1] == "\ufffd":
                cut -= 1
        if cut > req.sent:
            req.emit("text", text[req.sent:cut])
            req.sent = cut
        if reason is not None:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str | None, error: str | None = None) -> None:
        if req in self.running:
            self.running.remove(req)
            if reason in FINISHED:  # its cache holds tokens()[:fed]: kept for a later prompt that starts so
                self.prefix.add(req.tokens()[:req.fed], req.cache, finished=True)
            self._stale = True
        self.parking.discard(req.id)
        req.cache, req.finish = None, reason or "error"
        if self.metrics:
            self.metrics.finished(req.finish)
        if error is not None:
            req.emit("error", error)
        else:
            req.emit("done", req.finish)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.preemptions += 1
        if self.park:
            self.parking.park(req.id, req.cache)
        else:
            req.fed = 0
        req.cache, req.reserved = None, 0
        with self.lock:
            self.waiting.appendleft(req)
        if self.metrics:
            self.metrics.preempted()
        self.measure()


def _prefixes(s: str):
    return (s[:i] for i in range(1, len(s)))
