"""Decode speed, prefill cost and memory of each cache at several context lengths.

For a context of L tokens the model is prefilled once (uncompressed, timed:
that forward pass is the prefill of every method, because a compressed cache's
first update returns the states as given); each method's cache is then filled
from those states (timed: the only work a compressed cache adds to a prefill)
and decodes one untimed warm-up token, with its memory measured (one cache at a
time). All are then filled again and held at once for `steps` greedy tokens each
(each step timed but the first, below). Roofline: a step reads at least the
model's weights and the cache as held; with the read bandwidth measured in the
same run that gives the attained fraction of the limit. Process memory is read
from /proc: the resident growth once the filled cache is held (after
malloc_trim), and the peak growth while it is filled and decodes its warm-up step
(which includes the temporaries of compression and of the decoded history).
On a CUDA device the same protocol synchronizes around every timed call, reads the bandwidth of
the device's memory, and takes memory from the CUDA allocator (allocated bytes held, peak
allocated) instead of the process's resident set.
The timed steps run round-robin over the methods: on this shared machine the speed drifts by
20-40% for tens of seconds, which timed one method after another landed on whichever method ran
then; interleaved, it falls on all alike. The first round is not timed (a method's first step
after the other methods' fills took up to twice its time).
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from ..compat import with_cache
from ..core import hostmem
from ..core.cache import cache_nbytes
from .needle import fill, prefill_states

BANDWIDTH_BYTES = 512 * 2**20  # far beyond the caches: a read from memory, not from L2/L3


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied embeddings once): what
    one decode step reads of the model (the output layer reads the whole embedding matrix)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def sync(device) -> None:
    """Wait for the device's queued work, so a clock read after it times the work (CUDA is asynchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(repeats: int = 5, device="cpu") -> float:
    """Measured memory read bandwidth (bytes/s) of `device`: the best of `repeats` sums over a buffer far
    larger than the caches (torch's threads on the CPU)."""
    x = torch.ones(BANDWIDTH_BYTES // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return BANDWIDTH_BYTES / best


def roofline(result: dict, weights: int, bandwidth: float) -> dict:
    """Bytes a decode step must read at least (weights + the cache as held), the bandwidth the
    measured tokens/s attain on them, and its fraction of the measured limit."""
    step = weights + result["cache_bytes_end"]
    attained = step * result["decode_tok_s"]
    return {"bytes_per_step": step, "attained_gb_s": attained / 1e9, "bandwidth_fraction": attained / bandwidth,
            "bandwidth_bound_tok_s": bandwidth / step}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond; on a CUDA device, the
    CUDA allocator's peak of allocated bytes above the level at entry (`held()`: allocated now)."""

    def __init__(self, device="cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device

    def held(self) -> int:
        """Bytes held now above the level at entry."""
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) - self.base
        hostmem.collect_and_release()
        return hostmem.resident() - self.base

    def __enter__(self):
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.peak = torch.cuda.memory_allocated(self.device)
            return self
        hostmem.collect_and_release()
        self.base = self.peak = hostmem.resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, hostmem.resident())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, hostmem.resident())

    @property
    def extra(self) -> int:
        return self.peak - self.base


@torch.no_grad()
def measure_speed(model, spec, make_cache: dict, ids: torch.Tensor, contexts, steps: int = 16, progress=None,
                  models: dict | None = None):
    """{method: {L: {...}}}; make_cache includes the uncompressed reference; `models[name]`
    decodes that method where given (a transformed copy), else `model`."""
    models = models or {}
    out = {name: {} for name in make_cache}
    dev = ids.device
    bandwidth = read_bandwidth(device=dev)
    weights = {name: weight_bytes(models.get(name, model)) for name in make_cache}
    for length in contexts:
        ctx = ids[:, :length]
        sync(dev)
        t0 = time.perf_counter()
        states = prefill_states(model, ctx)
        sync(dev)
        forward_s = time.perf_counter() - t0
        first = ids[:, length:length + 1]
        held = {}
        for name, factory in make_cache.items():
            with PeakRSS(dev) as mem:
                cache = factory()
                t0 = time.perf_counter()
                fill(cache, states)
                sync(dev)
                fill_s = time.perf_counter() - t0
                nbytes = cache_nbytes(cache)
                history = getattr(cache, "history", None)  # eviction caches: bytes before the first eviction
                rss_held = mem.held()
                # one untimed step: compiled kernels (numba) and the allocator warm up outside the timing,
                # and the peak covers a step's temporaries (the decoded history, where there is one)
                logits = models.get(name, model)(first, **with_cache(model, cache), use_cache=True).logits
                x = logits[0, -1].argmax().view(1, 1)
            del cache, logits  # memory is measured with one method's cache at a time
            out[name][length] = {
                "prefill_forward_s": forward_s,
                "prefill_compress_s": fill_s,
                "prefill_tok_s": length / (forward_s + fill_s),
                "cache_bytes": nbytes,
                "ratio": spec.fp16_bytes(length) / nbytes,
                "rss_held_mb": rss_held / 2**20,
                "peak_extra_mb": mem.extra / 2**20,
            }
            if history:
                out[name][length]["bytes_before_eviction"] = history[0]["bytes_before"]
                out[name][length]["bytes_after_eviction"] = history[0]["bytes_after"]
        # timed outside the memory sampler (its 1 kHz polling thread competes for the GIL with
        # Python-heavy decode paths), every method filled again and held at once, one step of each per
        # round. The first round is not timed (a method's first step after the others' fills took up to
        # twice its time: DynamicCache at 8k 290 against 140 ms)
        for name, factory in make_cache.items():
            cache = factory()
            fill(cache, states)
            held[name] = (models.get(name, model), cache, first)
        timed = _interleaved_steps(held, steps)
        for name, (lat, starts) in timed.items():
            lat_sorted = sorted(lat)
            r = out[name][length]
            r.update({
                "decode_tok_s": len(lat) / sum(lat),
                "decode_p50_ms": 1000 * statistics.median(lat),
                "decode_p99_ms": 1000 * lat_sorted[min(len(lat) - 1, int(0.99 * len(lat)))],
                "decode_max_ms": 1000 * lat_sorted[-1],
                "decode_steps_ms": [round(1000 * x, 2) for x in lat],
                "decode_steps_at_s": [round(x, 4) for x in starts],
                "cache_bytes_end": cache_nbytes(held[name][1]),
                "read_bandwidth_gb_s": bandwidth / 1e9,
            })
            r.update(roofline(r, weights[name], bandwidth))
            if progress is not None:
                progress()
        del held, states
    return out


def _interleaved_steps(held: dict, steps: int) -> dict:
    """{name: (seconds of each step, its start after the first timed step)} for `steps` greedy decode steps
    of every (model, cache, first token) in `held`, the first untimed, round-robin: each round times one
    step of every method, so a drift of the shared machine's speed (20-40% for tens of seconds, seen
    here) falls on all alike instead of on whichever method ran during it."""
    lat = {name: [] for name in held}
    starts = {name: [] for name in held}
    xs = {name: x for name, (_, _, x) in held.items()}
    origin = None
    for k in range(steps):
        for name, (model, cache, _) in held.items():
            x = xs[name]
            sync(x.device)
            t0 = time.perf_counter()
            logits = model(x, **with_cache(model, cache), use_cache=True).logits[0, -1]
            sync(x.device)
            if k:  # round 0 untimed (see measure_speed)
                origin = t0 if origin is None else origin
                lat[name].append(time.perf_counter() - t0)
                starts[name].append(t0 - origin)
            xs[name] = logits.argmax().view(1, 1)
    return {name: (lat[name], starts[name]) for name in held}


@torch.no_grad()
def measure_direct_prefill(model, make_cache: dict, ids: torch.Tensor, length: int, models: dict | None = None) -> dict:
    """Prefill end to end through each cache: tokens/s (checks the shared-prefill figure), the peak
    process memory growth during the prompt, and the bytes the cache holds after it."""
    models, out = models or {}, {}
    for name, factory in make_cache.items():
        with PeakRSS(ids.device) as mem:
            cache = factory()
            t0 = time.perf_counter()
            models.get(name, model)(ids[:, :length], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
            sync(ids.device)
            elapsed = time.perf_counter() - t0
        out[name] = {"tok_s": length / elapsed, "peak_extra_mb": mem.extra / 2**20,
                     "cache_bytes": cache_nbytes(cache)}
        del cache
    return out
