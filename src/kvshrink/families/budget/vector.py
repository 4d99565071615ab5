"""Vector-level value choices for the budget (codecs/vector.py): calibrated once per model, corpus range and block,
in a file beside the budget calibration (its path with `-vq1`), and offered to the allocator beside the menu's
value choices.

The file holds the codebooks (one k-means codebook of N(0, I) per width, fitted here, so that every cache built
from it codes with the book its losses were measured with) and, per layer and width, the KL per token measured as
the menu's 1-3 bit choices are (core/sensitivity.Perturbed: one layer's values through the round trip), and the
bytes per coded token. A choice's codec is the menu's rotated Gaussian-level value codec with the scalar levels
replaced by the codebook's: the same bytes, 11-17% less squared error (docs/budget.md, "Vector levels for values").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ...codecs.vector import RUN, VectorQuant, gauss_book
from ...core.calibfile import beside, check_header, load_tensors, model_header, save_tensors
from ...core.sensitivity import Perturbed, body_round_trip
from ...errors import KvshrinkError
from ...spec import spec_from_config
from .config import RECENT

FORMAT = "kvshrink-budget-vq-1"
CHOICES = (1, 2)  # bits a value
VECTOR = "vector"  # a value choice ("vector", bits) of this calibration, beside the menu's
VALUE_SEED = 2  # the menu's value rotation (allocate.value_codec), so that only the levels differ
_TENSORS = ("book1", "book2", "proxy", "bytes")


@dataclass(eq=False)
class VectorCalibration:
    """book1 (256, 8), book2 (256, 4): the codebooks of 1 and 2 bits a value; proxy and bytes (L, len(CHOICES)):
    each choice's KL per token and bytes per coded token (all KV heads, codes and scales)."""

    book1: torch.Tensor
    book2: torch.Tensor
    proxy: torch.Tensor
    bytes: torch.Tensor
    header: dict

    def codec(self, bits: int) -> VectorQuant:
        """One codec per width for every cache built from this calibration (its book counted once a cache)."""
        memo = self.__dict__.setdefault("_codecs", {})
        if bits not in memo:
            memo[bits] = VectorQuant(bits, getattr(self, f"book{bits}"), seed=VALUE_SEED)
        return memo[bits]

    def check(self, model, block: int) -> None:
        check_header(self.header, model, "auto", what="vector value calibration")
        if self.header.get("block") != block:
            raise KvshrinkError(f"vector value calibration is for blocks of {self.header.get('block')} tokens, "
                                f"not {block}")

    def save(self, path: str) -> None:
        save_tensors(path, {k: getattr(self, k) for k in _TENSORS}, FORMAT, self.header)

    @classmethod
    def load(cls, path: str, model=None, block: int | None = None) -> VectorCalibration:
        tensors, header = load_tensors(path, FORMAT, _TENSORS, "a vector value calibration")
        calib = cls(**tensors, header=header)
        if model is not None:
            calib.check(model, block if block is not None else header.get("block"))
        return calib


def path_beside(budget_path: str) -> str:
    """Where a budget calibration's vector value calibration lives."""
    return beside(budget_path, "-vq" + FORMAT.rsplit("-", 1)[1])


def calibrate(model, ids: torch.Tensor, data: dict | None = None, sink: int = 4, block: int = 128,
              progress=None) -> VectorCalibration:
    """The codebooks, then each (layer, width)'s KL on the first sequence of `ids` (as the budget calibration
    measures its menu's values) and its bytes per coded token."""
    spec = spec_from_config(model.config)
    t0 = time.time()
    L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
    if any(D % RUN[b] for b in CHOICES):
        raise KvshrinkError(f"vector value levels code runs of {sorted({RUN[b] for b in CHOICES})} coordinates: "
                            f"a head of {D} does not split into them")
    n = (ids.shape[1] - sink) // block * block
    if n == 0:
        raise KvshrinkError(f"calibration sequences of {ids.shape[1]} tokens hold no block of {block} after the sink")
    calib = VectorCalibration(gauss_book(1), gauss_book(2), torch.zeros(L, len(CHOICES), dtype=torch.float64),
                              torch.zeros(L, len(CHOICES), dtype=torch.float64), {})
    perturbed = Perturbed(model, ids[:1], recent=RECENT)
    probe = torch.randn(1, H, block, D, generator=torch.Generator().manual_seed(0))
    for j, bits in enumerate(CHOICES):
        codec = calib.codec(bits)
        calib.bytes[:, j] = codec.encode(probe, block).nbytes() / block  # per-token codes: no state changes it
        for i in range(L):
            calib.proxy[i, j] = max(perturbed.kl(i, "value", body_round_trip(codec, sink, block)), 0.0)
            if progress is not None:
                progress()
    calib.header = {**model_header(model), "data": data or {}, "sink_excluded": sink, "block": block,
                    "choices": list(CHOICES), "proxy": "KL per token (measured)", "recent": RECENT,
                    "tokens": n, "seconds": round(time.time() - t0, 1)}
    return calib


def items(calib: VectorCalibration, layer: int, held: int) -> tuple[np.ndarray, np.ndarray]:
    """(proxy, bytes) of a layer's vector value choices with `held` coded value tokens (whole blocks and the partial
    one: values are coded per token)."""
    return calib.proxy[layer].numpy(), held * calib.bytes[layer].numpy()


def book_bytes(calib: VectorCalibration) -> int:
    """The codebooks' bytes, held once by a cache that uses them: both counted as fixed by the allocation (a cache
    that uses one width holds 4-8 KB less than allocated for)."""
    return sum(int(getattr(calib, f"book{b}").nbytes) for b in CHOICES)
