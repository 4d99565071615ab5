"""The serve bench: a synthetic chat workload at increasing request rates, per method, under one KV budget.

Prompt and output lengths are drawn from log-normal distributions (long-tailed, as ShareGPT's:
most requests short, a few long), prompts are slices of the corpus, outputs run to their drawn
length (`ignore_eos`, as vLLM's serving benchmark does), arrivals are Poisson at each rate (and
all at once for rate "inf"). Requests go to the engine in-process: what is measured is the
scheduler, the batch and the caches, not HTTP. Per run: the most sequences running at once,
completed requests, output tokens per second over the run, TTFT and TPOT at p50 and p99, and the
process's resident memory.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .engine import Request, Sampling
from .server import PROBE_TOKENS, make_engine


@dataclass
class Workload:
    requests: int = 24
    prompt_median: int = 200
    prompt_sigma: float = 0.8
    prompt_range: tuple = (32, 1024)
    output_median: int = 64
    output_sigma: float = 0.6
    output_range: tuple = (16, 256)
    seed: int = 0

    def draw(self, corpus_ids: torch.Tensor) -> list:
        """[(prompt ids, output tokens)] for each request."""
        rng = np.random.default_rng(self.seed)
        out = []
        for _ in range(self.requests):
            p = int(np.clip(rng.lognormal(math.log(self.prompt_median), self.prompt_sigma), *self.prompt_range))
            o = int(np.clip(rng.lognormal(math.log(self.output_median), self.output_sigma), *self.output_range))
            at = int(rng.integers(0, corpus_ids.numel() - p))
            out.append((corpus_ids[at:at + p].tolist(), o))
        return out


TRACE_EVERY = 10.0  # seconds between resident-memory samples kept in a run's figures


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def run_load(engine, items: list, rate: float, seed: int = 0, time_limit: float = 300.0) -> dict:
    """Submit `items` at Poisson times of `rate` per second (inf: all at once) to a fresh, not yet started
    engine; wait for all to finish or `time_limit`; the run's figures."""
    rng = np.random.default_rng(seed + 1)
    gaps = np.zeros(len(items)) if math.isinf(rate) else rng.exponential(1.0 / rate, len(items))
    done = threading.Event()
    finished: list = []
    reqs: list = []

    def emitter(i):
        def emit(kind, payload):
            if kind != "text":
                finished.append((i, kind, time.perf_counter()))
                if len(finished) == len(items):
                    done.set()
        return emit

    rss0, rss_top = rss_bytes(), 0
    trace: list = []  # (seconds, MB) every TRACE_EVERY seconds: is memory flat over a long run?
    engine.start()
    t0 = time.perf_counter()

    def sample():
        nonlocal rss_top
        now, rss = time.perf_counter() - t0, rss_bytes()
        rss_top = max(rss_top, rss)
        if not trace or now - trace[-1][0] >= TRACE_EVERY:
            trace.append((round(now, 1), round(rss / 2**20, 1)))
    try:
        at = t0
        for i, ((prompt, n), gap) in enumerate(zip(items, gaps)):
            at += gap
            while time.perf_counter() < at:
                sample()
                time.sleep(min(0.05, max(at - time.perf_counter(), 0)))
            req = Request(prompt, Sampling(max_tokens=n, temperature=0, ignore_eos=True), emitter(i))
            req.arrived = time.perf_counter()
            reqs.append(engine.submit(req))
        while not done.wait(0.25):
            sample()
            if time.perf_counter() - t0 > time_limit:
                break
    finally:
        engine.stop()
    end = max((t for _, _, t in finished), default=time.perf_counter())
    ok = [r for r in reqs if r.finish == "length"]
    ttft = [r.first - r.arrived for r in ok]
    tpot = [(r.last - r.first) / (len(r.out) - 1) for r in ok if len(r.out) > 1]
    tokens = sum(len(r.out) for r in reqs)
    return {"rate": rate, "requests": len(items), "completed": len(ok), "peak_running": engine.peak_running,
            "preemptions": engine.preemptions, "peak_held_bytes": engine.peak_held,
            "output_tok_s": tokens / max(end - t0, 1e-9), "duration_s": end - t0,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
            "rss_start_mb": rss0 / 2**20, "rss_max_mb": max(rss_top, rss0) / 2**20, "rss_end_mb": rss_bytes() / 2**20,
            "rss_trace_mb": trace}


def _pct(xs: list, q: float):
    return float(np.percentile(xs, q)) if xs else None


SERVE_METHODS = ("fp16", "int4", "kvc-8x", "zdc-adaptive-75+int3")  # the baseline and the README's picks
RATES = (0.5, 1.0, math.inf)


def serve_section(model, tok, methods, corpus_ids: torch.Tensor, kv_budget: int, rates=RATES,
                  workload: Workload | None = None, time_limit: float = 300.0, progress=None, log=print,
                  decode_steps: int | None = None, probe: int = PROBE_TOKENS) -> dict:
    """Every method under the same KV budget, at every rate, on the same drawn requests. decode_steps, probe:
    as make_engine's (None: a full cycle of each method's float16 decode tokens, budget.py; the prompt tokens
    whose bytes are measured)."""
    workload = workload or Workload()
    items = workload.draw(corpus_ids)
    res = {"workload": {**workload.__dict__, "drawn_prompt_tokens": [len(p) for p, _ in items],
                        "drawn_output_tokens": [n for _, n in items]},
           "kv_budget_bytes": kv_budget, "probe_tokens": probe, "by_method": {}}
    for method in methods:
        prepared, fresh = make_engine(model, tok, method, kv_budget, log=lambda *_: None,
                                      decode_steps=decode_steps, probe=probe)
        first = fresh()
        sizes = [len(p) + n for p, n in items]
        runs = []
        for rate in rates:
            runs.append(run_load(fresh(), items, rate, workload.seed, time_limit))
            if progress:
                progress()
        res["by_method"][method] = {
            "bytes_per_token": first.need.per_token(),
            "median_request_need_bytes": float(np.median([first.need.need(s) for s in sizes])),
            "runs": runs}
        log(f"serve {method}: " + ", ".join(f"rate {r['rate']}: {r['output_tok_s']:.1f} tok/s, "
                                            f"peak {r['peak_running']}" for r in runs))
        del prepared
    return res


def serve_table(res: dict) -> str:
    """Markdown: per method and rate, with ratios to the first method (the float16 baseline) at the same rate."""
    by = res["by_method"]
    base = next(iter(by))
    rows = [f"KV budget {res['kv_budget_bytes'] / 1e6:.0f} MB for every method; {res['workload']['requests']} "
            f"requests per run (prompt median {res['workload']['prompt_median']}, output median "
            f"{res['workload']['output_median']} tokens, log-normal); ×{base} = against `{base}` at the same rate.",
            "",
            (f"| method | rate (req/s) | bytes/token @{res.get('probe_tokens', PROBE_TOKENS)} | most running "
             f"| ×{base} | completed | output tok/s | ×{base} | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
             "| KV held max (MB) | preempted | RSS max (MB) |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in by.items():
        for run, ref in zip(m["runs"], by[base]["runs"]):
            f = lambda x, k=1.0, spec=".2f": "–" if x is None else format(x * k, spec)  # noqa: E731
            rows.append(f"| `{method}` | {run['rate']:g} | {m['bytes_per_token']:.0f} | {run['peak_running']} | "
                        f"{run['peak_running'] / max(ref['peak_running'], 1):.2f} | {run['completed']}/{run['requests']} | "
                        f"{run['output_tok_s']:.1f} | {run['output_tok_s'] / max(ref['output_tok_s'], 1e-9):.2f} | "
                        f"{f(run['ttft_p50_s'])} / {f(run['ttft_p99_s'])} | {f(run['tpot_p50_s'], 1000, '.0f')} / "
                        f"{f(run['tpot_p99_s'], 1000, '.0f')} | {run.get('peak_held_bytes', 0) / 1e6:.1f} | "
                        f"{run.get('preemptions', 0)} | {run['rss_max_mb']:.0f} |")
    return "\n".join(rows)


def serve_plot(res: dict, path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for method, m in res["by_method"].items():
        runs = m["runs"]
        x = list(range(len(runs)))
        for ax, key, k in ((axes[0], "output_tok_s", 1), (axes[1], "peak_running", 1), (axes[2], "tpot_p99_s", 1000)):
            ax.plot(x, [(r[key] or 0) * k for r in runs], marker="o", label=method)
    labels = [f"{r['rate']:g}" for r in next(iter(res["by_method"].values()))["runs"]]
    for ax, title in zip(axes, ("output tokens/s", "most sequences running at once", "TPOT p99 (ms)")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("request rate (req/s; inf: all at once)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"kvshrink serve under a {res['kv_budget_bytes'] / 1e6:.0f} MB KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
