"""The one place that chooses a decode kernel by device: numba on the CPU, Triton on CUDA.

Triton decides when it is first imported whether its functions compile for a GPU or run in its
interpreter (`TRITON_INTERPRET=1`, numpy on the CPU). Without a CUDA device, this module turns the
interpreter on if Triton is not imported yet (transformers imports it, so tests set the variable
first, in tests/conftest.py): that is the only way Triton kernels run here, and how `make test`
checks them against the numba kernels on a CPU-only machine. `use("triton")` then sends CPU
tensors through the Triton kernels, standing in for a GPU (tests, debugging; slow).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager

import torch

from ..errors import KvshrinkError

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")

try:
    import triton  # noqa: F401  (only its presence is checked here)

    TRITON, WHY_NOT = True, ""
except ImportError as e:  # an optional dependency: `pip install kvshrink[gpu]`
    TRITON, WHY_NOT = False, f"Triton is not installed ({e}); install it with `pip install 'kvshrink[gpu]'`"
# Triton kernels on CPU tensors: the interpreter, set before Triton was first imported
ON_CPU = TRITON and INTERPRETED
WHY_NOT_ON_CPU = WHY_NOT or ("" if ON_CPU else "Triton kernels on CPU tensors need its interpreter: set "
                             "TRITON_INTERPRET=1 before Triton is first imported (transformers imports it)")

_FORCED: list[str] = []
CALLS: Counter = Counter()  # attention calls the Triton path served, by layout: which path ran (tests, profiles)


def triton_for(x: torch.Tensor) -> bool:
    """True when a kernel over tensors like x must be a Triton kernel: x on a CUDA device, or
    `use("triton")` in force. Raises one clear line when Triton cannot run it."""
    want = x.device.type == "cuda" or (_FORCED and _FORCED[-1] == "triton")
    if not want:
        if x.device.type != "cpu":
            raise KvshrinkError(f"no decode kernel for tensors on {x.device.type!r}: kvshrink runs on cpu and cuda")
        return False
    if not TRITON:
        raise KvshrinkError(WHY_NOT)
    if x.device.type == "cpu" and not ON_CPU:
        raise KvshrinkError(WHY_NOT_ON_CPU)
    return True


@contextmanager
def use(kind: str):
    """Within the block, decode kernels over CPU tensors are `kind` ("triton" or "numba")."""
    if kind not in ("triton", "numba"):
        raise KvshrinkError(f"unknown kernel kind {kind!r}; use triton or numba")
    _FORCED.append(kind)
    try:
        yield
    finally:
        _FORCED.pop()


SAID: set = set()  # (device kind, layout) whose slow path was announced, once per process


def kernels_on(device, layout: str, gpu: bool = True) -> bool:
    """Whether decode kernels read a `layout` body in place on `device`: on the CPU (numba), on CUDA
    where Triton is installed and the layout has a Triton kernel (`gpu`). Otherwise says so once on
    stderr: the cache then decodes its history every step, which is correct but slow."""
    kind = torch.device(device or "cpu").type
    if kind == "cpu" and _FORCED and _FORCED[-1] == "triton":
        kind = "cuda"  # `use("triton")` stands in for a GPU: the same choices, on CPU tensors
    if kind == "cpu" or (kind == "cuda" and TRITON and gpu):
        return True
    why = WHY_NOT if kind == "cuda" and not TRITON else (f"no Triton kernel reads {layout} bodies yet" if kind == "cuda"
                                                          else "kvshrink's kernels run on cpu and cuda")
    if (kind, layout) not in SAID:
        SAID.add((kind, layout))
        print(f"kvshrink: {layout} decode steps on {kind} decode the whole history every step (slow): {why}",
              file=sys.stderr)
    return False
