"""Decode-attention kernels against PyTorch SDPA over a float16 cache, on a GPU (issue: GPU kernels).

For one attention layer of a large model's shape (8 KV heads of 128, 32 query heads), at each
context and batch: a cache of each method is filled with random keys and values through the
cache's own `update` (so its layout is the method's), one decode step's states are taken, and
`states.attend` (the Triton kernel and the PyTorch dense part and merge) is timed with CUDA events
against `F.scaled_dot_product_attention` over the same tokens in float16. Reported per cell:
microseconds of wall time (host launches included) and of device time (the profiler's kernel time),
the speed ratio to SDPA of each (>1: faster), the bytes the step must read (the cache as held;
float16 K and V for SDPA) and the fraction of the device's copy bandwidth (measured here) that those
bytes over the device time attain. The device's name goes with every figure.

    python scripts/gpu_bench.py --out gpu-results            # on a CUDA machine
    TRITON_INTERPRET=1 python scripts/gpu_bench.py --smoke   # CPU, Triton's interpreter, tiny sizes

End to end (the bundled model, every recommended method, the same tables as on the CPU):
    kvshrink bench --device cuda --sections speed,quality --speed-contexts 2048,8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig

from kvshrink import from_method
from kvshrink.core.cache import cache_nbytes
from kvshrink.kernels import backend, gpu

# built from a config alone (RVQ, ZDC, eviction and KVComp need a model: measured end to end)
METHODS = ("int4", "int3-rot", "int2-rot", "int8")


def layer_config(kv_heads: int, head_dim: int, groups: int) -> LlamaConfig:
    cfg = LlamaConfig(num_hidden_layers=1, num_attention_heads=kv_heads * groups, num_key_value_heads=kv_heads,
                      head_dim=head_dim, hidden_size=kv_heads * groups * head_dim, vocab_size=128,
                      max_position_embeddings=1 << 20)
    cfg._attn_implementation = "kvshrink"  # what kvshrink.prepare sets on a model
    return cfg


def timed(fn, device, reps: int) -> float:
    """Median seconds of fn() over reps, after two warm-up calls (Triton compiles on the first)."""
    fn()
    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def device_seconds(fn, device, reps: int) -> float:
    """Seconds per fn() that the GPU spends in kernels (the profiler's device time): the wall time of
    `timed` less the host's launch overhead, which dominates small steps."""
    if device.type != "cuda":
        return float("nan")
    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / reps / 1e6


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) // 4 if device.type == "cuda" else 1 << 22
    x = torch.empty(n, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / timed(lambda: y.copy_(x), device, 10)


def one_cell(name: str, cfg, batch: int, length: int, device, reps: int) -> dict:
    """Fill one layer of `name` with `length` random tokens per sequence, time one decode step's attention."""
    g = torch.Generator(device=device).manual_seed(0)
    h, d, hq = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    cache = from_method(name, cfg)
    layer = cache.layers[0]
    chunk = 8192
    for t0 in range(0, length, chunk):  # the cache's own prefill path, in chunks to bound its temporaries
        n = min(chunk, length - t0)
        k = torch.randn(batch, h, n, d, device=device, generator=g, dtype=torch.float16)
        v = torch.randn(batch, h, n, d, device=device, generator=g, dtype=torch.float16)
        states, _ = layer.update(k, v)
        if hasattr(layer, "observe_rows"):  # importance-aware: tokens leave the window only after the call attends
            qp = torch.randn(batch, hq, n, d, device=device, generator=g, dtype=torch.float16)
            states.attend(None, qp, None, d ** -0.5)
    cache.settle() if hasattr(cache, "settle") else None
    step = [torch.randn(batch, h, 1, d, device=device, generator=g, dtype=torch.float16) for _ in range(2)]
    states, _ = layer.update(*step)
    if not hasattr(states, "attend"):
        raise SystemExit(f"{name}: the decode step did not get a kernel's states ({type(states).__name__})")
    q = torch.randn(batch, hq, 1, d, device=device, generator=g, dtype=torch.float16)
    held = cache_nbytes(cache)
    step = lambda: states.attend(None, q, None, d ** -0.5)
    sec, dev_sec = timed(step, device, reps), device_seconds(step, device, reps)
    return {"us": sec * 1e6, "device_us": dev_sec * 1e6, "bytes": held, "tokens": length + 1}


def sdpa_cell(cfg, batch: int, length: int, device, reps: int) -> dict:
    h, d, hq = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    k = torch.randn(batch, h, length + 1, d, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, 1, d, device=device, dtype=torch.float16)
    step = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    sec, dev_sec = timed(step, device, reps), device_seconds(step, device, reps)
    return {"us": sec * 1e6, "device_us": dev_sec * 1e6, "bytes": 2 * k.numel() * 2, "tokens": length + 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--groups", type=int, default=4, help="query heads per KV head")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--precision", default=gpu.TUNING.precision,
                   help="products' input precision to sweep: fp16 (the default), tf32, ieee (exact)")
    p.add_argument("--warps", default=str(gpu.TUNING.num_warps), help="warps per program to sweep, e.g. 4,8")
    p.add_argument("--out", default="gpu-results")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny sizes: checks the script")
    a = p.parse_args(argv)
    if a.smoke:
        a.contexts, a.batches, a.kv_heads, a.head_dim, a.groups, a.reps = "256", "1,2", 2, 32, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.smoke:
        print("no CUDA device here: run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    cfg = layer_config(a.kv_heads, a.head_dim, a.groups)
    bandwidth = copy_bandwidth(device)
    rows = []
    default = gpu.TUNING.precision, gpu.TUNING.num_warps
    with backend.use("triton"):
        for length in (int(x) for x in a.contexts.split(",")):
            for batch in (int(x) for x in a.batches.split(",")):
                ref = sdpa_cell(cfg, batch, length, device, a.reps)
                cells = {("sdpa-fp16", "-", 0): ref}
                for m in a.methods.split(","):
                    for prec in a.precision.split(","):
                        for warps in (int(w) for w in a.warps.split(",")):
                            gpu.TUNING.precision, gpu.TUNING.num_warps = prec, warps
                            cells[m, prec, warps] = one_cell(m, cfg, batch, length, device, a.reps)
                            torch.cuda.empty_cache() if device.type == "cuda" else None
                gpu.TUNING.precision, gpu.TUNING.num_warps = default
                for (m, prec, warps), c in cells.items():
                    row = {"device": name, "method": m, "precision": prec, "warps": warps, "context": length,
                           "batch": batch, **c, "speed_vs_sdpa": ref["us"] / c["us"],
                           "device_speed_vs_sdpa": ref["device_us"] / c["device_us"],
                           "ratio_vs_fp16": ref["bytes"] / c["bytes"],
                           "bandwidth_fraction": c["bytes"] / (c["device_us"] / 1e6) / bandwidth}
                    rows.append(row)
                    print(f"{name} | {m:>10} {prec:>4} w{warps} | ctx {length:>6} | batch {batch:>2} | {c['us']:9.1f} us | "
                          f"x{row['speed_vs_sdpa']:.2f} SDPA | device {c['device_us']:9.1f} us "
                          f"x{row['device_speed_vs_sdpa']:.2f} | {row['ratio_vs_fp16']:.2f}x smaller | "
                          f"{100 * row['bandwidth_fraction']:.0f}% of {bandwidth / 1e9:.0f} GB/s", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernels.json"), "w") as fh:
        json.dump({"device": name, "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
