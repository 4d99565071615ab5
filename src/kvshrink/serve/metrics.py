"""The server's Prometheus metrics, in a registry of its own (one per server, so that tests can
run several): KV bytes held, reserved and budgeted, the compression ratio, running and waiting
requests, output tokens per second, and time-to-first-token and time-per-output-token histograms."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW = 10.0  # seconds over which tokens per second is measured


class Metrics:
    def __init__(self, method: str, fp16_per_token: float):
        self.registry = r = CollectorRegistry()
        self.fp16_per_token = fp16_per_token
        self.kv_held = Gauge("kvshrink_kv_bytes_held", "bytes the caches hold (running requests and prefix entries, "
                             "each storage once)", registry=r)
        self.kv_prefix = Gauge("kvshrink_kv_bytes_prefix", "bytes only the prefix entries hold", registry=r)
        self.prefix_entries = Gauge("kvshrink_prefix_entries", "finished caches kept for prefix reuse", registry=r)
        self.prefix_tokens = Gauge("kvshrink_prefix_reused_tokens", "prompt tokens taken from prefix entries, "
                                   "not computed", registry=r)
        self.kv_reserved = Gauge("kvshrink_kv_bytes_reserved", "bytes reserved for the running requests", registry=r)
        self.kv_parked = Gauge("kvshrink_kv_bytes_parked", "bytes of preempted requests' caches parked on disk",
                               registry=r)
        self.kv_budget = Gauge("kvshrink_kv_budget_bytes", "the KV budget", registry=r)
        self.ratio = Gauge("kvshrink_compression_ratio", "float16 bytes of the held tokens / bytes held", registry=r)
        self.running = Gauge("kvshrink_requests_running", "requests in the running batch", registry=r)
        self.waiting = Gauge("kvshrink_requests_waiting", "requests queued for admission", registry=r)
        self.tps = Gauge("kvshrink_output_tokens_per_second", f"output tokens per second over {RATE_WINDOW:g} s",
                         registry=r)
        self.tokens = Counter("kvshrink_output_tokens", "output tokens generated", registry=r)
        self.done = Counter("kvshrink_requests", "requests ended, by finish reason", ["reason"], registry=r)
        self.rejected = Counter("kvshrink_requests_rejected", "requests refused (queue full)", registry=r)
        self.preemptions = Counter("kvshrink_preemptions", "requests preempted to stay within the budget",
                                   registry=r)
        self.ttft_s = Histogram("kvshrink_time_to_first_token_seconds", "arrival to first output token",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.tpot_s = Histogram("kvshrink_time_per_output_token_seconds", "between a request's output tokens",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.info = Gauge("kvshrink_method_info", "the cache method served", ["method"], registry=r)
        self.info.labels(method=method).set(1)
        self._recent: deque = deque()

    def ttft(self, seconds: float) -> None:
        self.ttft_s.observe(seconds)

    def tpot(self, seconds: float) -> None:
        self.tpot_s.observe(seconds)

    def finished(self, reason: str) -> None:
        self.done.labels(reason=reason).inc()

    def preempted(self) -> None:
        self.preemptions.inc()

    def step(self, engine, new_tokens: int) -> None:
        now = time.perf_counter()
        self.tokens.inc(new_tokens)
        self._recent.append((now, new_tokens))
        self.refresh(engine)

    def refresh(self, engine) -> None:
        now = time.perf_counter()
        while self._recent and now - self._recent[0][0] > RATE_WINDOW:
            self._recent.popleft()
        self.tps.set(sum(n for _, n in self._recent) / RATE_WINDOW)
        running, waiting = engine.counts()
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_held.set(engine.held)
        self.kv_prefix.set(engine.held - engine.held_running)
        self.prefix_entries.set(len(engine.prefix))
        self.prefix_tokens.set(engine.prefix.reused_tokens)
        self.kv_reserved.set(engine.reserved() if running else 0)
        self.kv_budget.set(engine.kv_budget)
        self.kv_parked.set(engine.parking.nbytes())
        tokens = engine.held_tokens()
        self.ratio.set(tokens * self.fp16_per_token / engine.held_running if running and engine.held_running else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
