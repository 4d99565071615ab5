"""Compile every Triton decode kernel for a Hopper GPU (sm_90) on a machine without one.

Triton's interpreter, which runs the kernels in the CPU tests, accepts code that a GPU compile
refuses: an H200 found `tl.dot` over fewer than 16 columns and a function returning int32 on one
path and int64 on another, both passed by the interpreter for months. Here a tiny model decodes a
few steps of each listed method on the CPU with the kernels' launches captured instead of run; each
distinct launch (kernel and compile-time constants) is then compiled for sm_90 by Triton's own
compiler and ptxas, and its registers, stack (spills) and shared memory are read from the cubin.
No GPU is needed; Triton must be imported without its interpreter (TRITON_INTERPRET unset).

    python scripts/triton_compile_check.py                 # the default methods; exit 1 if one fails
    python scripts/triton_compile_check.py --methods int4,kvcomp-eb0.1 --warps 4,8
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the kernels must be Triton's compiled functions here")
import triton  # noqa: E402  (before kvshrink, which would turn the interpreter on without CUDA)
import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvshrink import KvshrinkError, from_method, prepare  # noqa: E402
from kvshrink.families.evict import gpu as evict_gpu  # noqa: E402
from kvshrink.families.kvcomp import gpu as kvcomp_gpu  # noqa: E402
from kvshrink.families.lowrank import transform as zdc  # noqa: E402
from kvshrink.families.rvq import calibrate as rvq_calib  # noqa: E402
from kvshrink.kernels import backend  # noqa: E402
from kvshrink.kernels import gpu as kernels_gpu  # noqa: E402

METHODS = ("int4", "int8-rot", "int3", "int2:prerope=1", "int2:levels=gauss", "zdc-50+int4", "zdc-adaptive-75+int3",
           "rvq-d2", "kvc-8x", "kvc-8x+int4", "kvcomp-eb0.1", "kvcomp-eb0.1:entropy=0", "mix-int2", "zdc-mix-50",
           "mix-int3:window_bits=6")
KERNELS = ((kernels_gpu, "_coded_body"), (evict_gpu, "_logits"), (evict_gpu, "_values"), (kvcomp_gpu, "_kvcomp"))
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8", torch.int8: "i8",
         torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class Capture:
    """Stands in for a kernel: `kernel[grid](*args, **constants)` records the launch and runs nothing."""

    def __init__(self, fn, seen: dict):
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            key = (self.fn.__name__, tuple(sorted((k, v) for k, v in kw.items() if k != "num_warps")))
            self.seen.setdefault(key, (self.fn, args, kw))
        return launch


def signature(fn, args, kw) -> tuple[dict, dict]:
    sig, const = {}, {}
    for name, a in zip(fn.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + TYPES[a.dtype]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i64" if abs(a) >= 2 ** 31 else "i32"
        else:
            sig[name] = "fp32"
    for name, v in kw.items():
        if name != "num_warps":
            sig[name], const[name] = "constexpr", v
    return sig, const


def compile_for_hopper(fn, args, kw, warps: int) -> dict:
    """Compile one captured launch for sm_90; its registers, stack and shared bytes."""
    sig, const = signature(fn, args, kw)
    kernel = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
        fh.write(kernel.asm["cubin"])
    out = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", fh.name],
                         capture_output=True, text=True).stdout
    os.unlink(fh.name)
    use = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"registers": int(use.get("REG", -1)), "stack": int(use.get("STACK", -1)),
            "shared": kernel.metadata.shared}


def tiny_model(calib_dir: str, head_dim: int):
    """A small random Llama (4 KV heads of head_dim, GQA 2) with ZDC and RVQ calibrations in calib_dir."""
    os.environ["KVSHRINK_CALIB_DIR"] = calib_dir
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=head_dim, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    zdc.calibrate(model, ids, {"check": True}).save(zdc.default_calibration_path(model))
    rvq_calib.calibrate(model, ids, {"check": True}, 16, 256, 8, "strided", "contiguous", iters=2).save(
        rvq_calib.default_path(model, 16, 256, "strided", "contiguous"))
    return model


@torch.no_grad()
def drive(model, name: str):
    """Prefill 300 tokens and decode two, with the Triton path forced: every kernel launch is captured."""
    m = prepare(copy.deepcopy(model), name)
    cache = from_method(name, m)
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(2))
    with backend.use("triton"):
        try:  # captured launches leave the outputs unwritten: a later layer may see garbage and refuse it
            m(ids, past_key_values=cache, use_cache=True)
            for i in range(2):
                m(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        except KvshrinkError:
            pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--warps", default=str(kernels_gpu.TUNING.num_warps),
                   help="comma-separated warps per program to compile each launch with")
    p.add_argument("--head-dim", type=int, default=32, help="the model's head size (128: a large model's tiles)")
    p.add_argument("--precision", default=kernels_gpu.TUNING.precision,
                   help="the products' input precision (kernels/gpu.py Tuning)")
    a = p.parse_args(argv)
    kernels_gpu.TUNING.precision = a.precision
    kernels_gpu.TUNING.cpu_tile = kernels_gpu.TUNING.tile  # launches captured on the CPU, compiled as a GPU runs them
    backend.ON_CPU = True  # CPU tensors may take the Triton path: its launches are captured, never run
    seen: dict = {}
    for module, name in KERNELS:
        setattr(module, name, Capture(getattr(module, name), seen))
    with tempfile.TemporaryDirectory() as calib:
        model = tiny_model(calib, a.head_dim)
        for name in a.methods.split(","):
            before = len(seen)
            drive(model, name)
            print(f"{name}: {len(seen) - before} new launch kinds", flush=True)
    failed = 0
    for (kernel, consts), (fn, args, kw) in seen.items():
        short = ", ".join(f"{k}={v}" for k, v in consts if not k.startswith("BLOCK"))
        for warps in (int(w) for w in a.warps.split(",")):
            try:
                r = compile_for_hopper(fn, args, kw, warps)
                print(f"ok   {kernel} [{short}] warps {warps}: {r['registers']} registers, {r['stack']} bytes stack "
                      f"(spills), {r['shared']} bytes shared")
            except Exception as e:  # noqa: BLE001  (every failure is reported, then the exit code says so)
                failed += 1
                first = str(e).strip().splitlines()
                print(f"FAIL {kernel} [{short}] warps {warps}: {type(e).__name__}: {' | '.join(first[-3:])}")
    print(f"{len(seen)} launch kinds, {failed} failed to compile for sm_90")
    return 1 if failed or not seen else 0


if __name__ == "__main__":
    raise SystemExit(main())
