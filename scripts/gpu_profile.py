"""Where one decode step's attention time goes on a GPU, for one method at one shape (issue: GPU kernels).

Fills one layer as scripts/gpu_bench.py does, then reports: where the body's tensors live, the step's
wall time, the body's join and the kernel alone at several split counts, the compiled kernel's
registers, spills and shared memory, and torch.profiler's tables by CUDA and CPU time.

    python scripts/gpu_profile.py --method int4 --batch 8 --context 32768      # on a CUDA machine
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_bench import layer_config
from kvshrink import from_method
from kvshrink.kernels import backend
from kvshrink.kernels import gpu as kg


def wall_us(fn, reps: int = 5) -> float:
    """Mean wall microseconds of fn() with the device synchronized around the calls (one warm-up)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="int4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    cfg = layer_config(8, 128, 4)
    h, d = cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    with backend.use("triton"):
        layer = from_method(a.method, cfg).layers[0]
        for t0 in range(0, a.context, 8192):
            k = torch.randn(a.batch, h, min(8192, a.context - t0), d, device=dev, generator=g, dtype=torch.float16)
            layer.update(k, torch.randn_like(k))
        step = [torch.randn(a.batch, h, 1, d, device=dev, generator=g, dtype=torch.float16) for _ in range(2)]
        states, _ = layer.update(*step)
        q = torch.randn(a.batch, cfg.num_attention_heads, 1, d, device=dev, generator=g, dtype=torch.float16)
        body = states.body
        print(f"{a.method}: body {type(body).__name__}, batch {a.batch}, context {a.context}")
        keys = body.keys if hasattr(body, "keys") else None
        for name, t in (keys.tensors.items() if keys is not None else ()):
            print(f"  key {name}: {t.device} {tuple(t.shape)} {t.dtype} contiguous={t.is_contiguous()}")
        print(f"step's attention: {wall_us(lambda: states.attend(None, q, None, d ** -0.5)):.1f} us")
        if keys is not None and hasattr(body, "key_codec"):
            values = body.values
            print(f"joining the body's parts: {wall_us(lambda: (body.keys, body.values)):.1f} us")
            kb = kg.int_body(body.key_codec, keys.tensors, a.batch * h, d)
            vb = kg.int_body(body.value_codec, values.tensors, a.batch * h, d)
            qq = torch.randn(a.batch, h, cfg.num_attention_heads // h, d, device=dev)
            vis = torch.ones(a.batch, 1, keys.num_tokens, dtype=torch.bool, device=dev)
            nb = torch.full((a.batch,), keys.num_tokens, dtype=torch.int64, device=dev)
            for splits in (4, 32, 128):
                us = wall_us(lambda: kg.coded_body(qq, vis, nb, kb, vb, splits))
                print(f"kernel alone, splits {splits}: {us:.1f} us")
            for cache in kg._coded_body.device_caches.values():
                for compiled in cache[0].values():
                    print(f"compiled: {compiled.n_regs} registers, {compiled.n_spills} spills, "
                          f"{compiled.metadata.num_warps} warps, {compiled.metadata.shared} bytes shared")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                states.attend(None, q, None, d ** -0.5)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
