"""Where a decode step's GPU time goes: the coded-body kernel alone, on synthetic int bodies.

`gpu_bench.py` times a whole `states.attend` (the body kernel, the dense tokens, the merge, and the
host's launches). This drives `kernels.gpu.coded_body` directly with random int codes in the int
family's layout (keys per channel over 128-token groups, values per token) and a float16 body (no
unpacking: what the kernel's structure costs by itself), over a grid of `Tuning` settings. Per row:
wall µs (CUDA events: host launches included), the profiler's device µs of `_coded_body` and of all
kernels, the compressed bytes read per second of the kernel, the largest error against a PyTorch
reference over the same codes, and the compiled kernel's registers, spills and shared memory. It
found the float32 products and the per-code loads behind the first GPU session's 100x gap
(docs/gpu.md).

    python scripts/gpu_kernel_sweep.py                      # on a CUDA machine, about a minute
    TRITON_INTERPRET=1 python scripts/gpu_kernel_sweep.py --smoke   # CPU, tiny sizes: checks the script
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kvshrink.kernels import gpu
from kvshrink.kernels.partials import merge


def timed(fn, device, reps: int) -> float:
    """Median wall µs of fn() (CUDA events; one untimed call in the interpreter)."""
    fn()
    if device.type != "cuda":
        return float("nan")
    fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1000)
    return statistics.median(out)


def device_us(fn, device, reps: int) -> tuple:
    """Device µs per call of the body kernel and of all kernels (the profiler)."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kern = total = 0.0
    for e in prof.key_averages():
        total += e.self_device_time_total
        kern += e.self_device_time_total if "_coded_body" in e.key else 0.0
    return kern / reps, total / reps


def int_bodies(rows: int, n: int, d: int, bits: int, device, g) -> tuple:
    """Random codes and (min, step) rows in the int family's layout (`kernels.gpu.int_body`)."""
    nbytes = n * d * bits // 8
    step = 0.3 * 2.0 ** (4 - bits)  # values of a similar size at every width
    keys = gpu.Body(torch.randint(0, 256, (rows, nbytes), device=device, dtype=torch.uint8, generator=g),
                    torch.randn(rows, n // 128 * d, device=device, generator=g).half(),
                    (torch.rand(rows, n // 128 * d, device=device, generator=g) * step).half(), bits, d, tg=128, gw=1)
    values = gpu.Body(torch.randint(0, 256, (rows, nbytes), device=device, dtype=torch.uint8, generator=g),
                      torch.randn(rows, n, device=device, generator=g).half(),
                      (torch.rand(rows, n, device=device, generator=g) * step).half(), bits, d, tg=1, gw=d)
    return keys, values


def codes_of(body: gpu.Body, n: int) -> torch.Tensor:
    """(rows, n, width) float32 codes, little-endian within each byte (packing.pack's layout)."""
    c = body.codes.long()
    parts = [(c >> (body.bits * i)) & ((1 << body.bits) - 1) for i in range(8 // body.bits)]
    return torch.stack(parts, -1).reshape(c.shape[0], n, body.width).float()


def reference(q, keys: gpu.Body, values: gpu.Body, b: int, h: int, n: int) -> torch.Tensor:
    d = keys.width
    kq = codes_of(keys, n).view(-1, n // 128, 128, d)
    k = keys.min.float().view(-1, n // 128, 1, d) + keys.scale.float().view(-1, n // 128, 1, d) * kq
    v = values.min.float()[..., None] + values.scale.float()[..., None] * codes_of(values, n)
    s = q @ k.reshape(b, h, n, d).transpose(2, 3)
    return torch.softmax(s, -1) @ v.reshape(b, h, n, d)


def attend(q, vis, nbody, keys, values) -> torch.Tensor:
    pm, pl, pacc = gpu.coded_body(q, vis, nbody, keys, values, 4)
    pm[:, :, -1], pl[:, :, -1] = float("-inf"), 0.0  # no dense tokens: the last slot stays empty
    return merge(pm, pl, pacc)


def compiled_stats() -> str:
    """Registers, spills and shared bytes of the latest compile of `_coded_body` (Triton 3.x)."""
    try:
        kernel = list(gpu._coded_body.device_caches[0][0].values())[-1]
        return f"{kernel.n_regs} regs, {kernel.n_spills} spills, {kernel.metadata.shared} B shared"
    except (AttributeError, IndexError, KeyError, TypeError):
        return "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x8192,1x32768,8x32768", help="batch x tokens, comma-separated")
    p.add_argument("--bits", default="4,2,8,16", help="code widths; 16: a float16 body, no unpacking")
    p.add_argument("--precision", default="fp16,ieee")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--tiles", default="32,64")
    p.add_argument("--programs-per-sm", default="2,8")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny sizes: checks the script")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, r, d = (2, 4, 32) if a.smoke else (8, 4, 128)
    if a.smoke:
        a.shapes, a.precision, a.warps, a.tiles, a.programs_per_sm, a.reps = "2x256", "fp16,ieee", "4", "32", "2", 1
    elif device.type != "cuda":
        print("no CUDA device here: run with --smoke to check the script on the CPU")
        return 2
    saved = gpu.Tuning(**vars(gpu.TUNING))
    for shape in a.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, h, r, d, device=device, generator=g) * d ** -0.5
        vis = torch.ones(b, 1, n, dtype=torch.bool, device=device)
        nbody = torch.full((b,), n, dtype=torch.int64, device=device)
        kh = torch.randn(b, h, n, d, device=device, dtype=torch.float16)
        qh = torch.randn(b, h * r, 1, d, device=device, dtype=torch.float16)
        sdpa = functools.partial(F.scaled_dot_product_attention, qh, kh, kh, enable_gqa=True)
        print(f"== batch {b}, {n} tokens, {h} KV heads of {d}: SDPA {timed(sdpa, device, a.reps):.1f} us wall, "
              f"{device_us(sdpa, device, a.reps)[1]:.1f} on the device", flush=True)
        for bits in (int(x) for x in a.bits.split(",")):
            if bits == 16:
                keys, values = (gpu.Body(torch.randn(b * h, n * d, device=device, generator=g).half(), kh, kh, 16, d)
                                for _ in range(2))
                want = None
            else:
                keys, values = int_bodies(b * h, n, d, bits, device, g)
                want = reference(q, keys, values, b, h, n)
            grid = itertools.product(a.precision.split(","), a.warps.split(","), a.tiles.split(","),
                                     a.programs_per_sm.split(","))
            for prec, warps, tile, pps in grid:
                gpu.TUNING.precision, gpu.TUNING.num_warps = prec, int(warps)
                gpu.TUNING.tile = gpu.TUNING.cpu_tile = int(tile)
                gpu.TUNING.programs_per_sm = int(pps)
                step = functools.partial(attend, q, vis, nbody, keys, values)
                wall = timed(step, device, a.reps)
                kern, total = device_us(step, device, a.reps)
                err = (step() - want).abs().max().item() if want is not None else float("nan")
                gbs = (keys.codes.numel() * keys.codes.element_size() * 2) / (kern * 1e-6) / 1e9
                print(f"bits {bits:2} {prec:>4} w{warps} tile {tile:>3} {pps:>2}/SM | {wall:8.1f} us wall | "
                      f"{kern:8.1f} us kernel, {total:8.1f} all | {gbs:6.0f} GB/s | err {err:.1e} | "
                      f"{compiled_stats()}", flush=True)
        gpu.TUNING.__dict__.update(vars(saved))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
