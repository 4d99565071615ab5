"""A head axis for the budget (`heads=N`): each KV head's share of its layer's loss, calibrated once per model,
corpus range and block, in a file beside the budget calibration (its path with `-heads1`).

The budget calibration measures a choice's KL with a whole layer's keys (or values) coded. Here each KV head's
keys, then values, go through one reference choice alone (2-bit turned rotated keys, 2-bit Gaussian values), and
the allocator takes a head's loss for any choice as the layer's measured loss times that head's share. Heads add
up within 5-15% on the bundled model (docs/budget.md, "Allocation per KV head"), so the shares can be summed.

The shares are measured on the calibration tokens read as one sequence (2,048 tokens on the bundled model, not the
budget's 512-token sequences): a head that copies from far back shows only there. Layer 18's head 2 of the bundled
model carries nearly all of its layer's loss on a 2,048-token segment and was not among the costly heads at 512
tokens (docs/budget.md, "Where the loss sits at 6x and 8x").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ...codecs.levels import GAUSS, UNIFORM
from ...core.calibfile import beside, check_header, load_tensors, model_header, save_tensors
from ...core.sensitivity import Perturbed, body_round_trip
from ...errors import KvshrinkError
from ...spec import spec_from_config
from .config import RECENT

FORMAT = "kvshrink-budget-heads-1"
KEY_REF = (2, True, None, UNIFORM, True)  # allocate's menu entries the shares are measured with
VALUE_REF = (2, True, None, GAUSS)
_TENSORS = ("kl_k", "kl_v")


@dataclass(eq=False)
class HeadCalibration:
    """kl_k, kl_v (L, H): the KL per token with one KV head's keys (values) through the reference choice."""

    kl_k: torch.Tensor
    kl_v: torch.Tensor
    header: dict

    def shares(self, which: str) -> np.ndarray:
        """(L, H): each head's share of its layer's loss for keys ("key") or values ("value"); even where a layer
        measured no loss at all."""
        kl = (self.kl_k if which == "key" else self.kl_v).double().clamp_min(0).numpy()
        total = kl.sum(1, keepdims=True)
        even = np.full_like(kl, 1.0 / kl.shape[1])
        return np.where(total > 0, kl / np.where(total > 0, total, 1.0), even)

    def check(self, model, block: int) -> None:
        check_header(self.header, model, "auto", what="head share calibration")
        if self.header.get("block") != block:
            raise KvshrinkError(f"head share calibration is for blocks of {self.header.get('block')} tokens, "
                                f"not {block}")

    def save(self, path: str) -> None:
        save_tensors(path, {k: getattr(self, k) for k in _TENSORS}, FORMAT, self.header)

    @classmethod
    def load(cls, path: str, model=None, block: int | None = None) -> HeadCalibration:
        tensors, header = load_tensors(path, FORMAT, _TENSORS, "a head share calibration")
        calib = cls(**tensors, header=header)
        if model is not None:
            calib.check(model, block if block is not None else header.get("block"))
        return calib


def path_beside(budget_path: str) -> str:
    """Where a budget calibration's head share calibration lives."""
    return beside(budget_path, "-heads" + FORMAT.rsplit("-", 1)[1])


def calibrate(model, ids: torch.Tensor, key_codec, value_codec, data: dict | None = None, sink: int = 4,
              block: int = 128, progress=None) -> HeadCalibration:
    """Each (layer, KV head)'s KL with its keys, then its values, through `key_codec` / `value_codec` (the
    reference choices' codecs), on `ids` read as one sequence (their rows laid end to end: the calibration tokens
    are consecutive)."""
    spec = spec_from_config(model.config)
    L, H = spec.num_layers, spec.num_kv_heads
    seq = ids.reshape(1, -1)
    if (seq.shape[1] - sink) // block == 0:
        raise KvshrinkError(f"a calibration sequence of {seq.shape[1]} tokens holds no block of {block} after the sink")
    t0 = time.time()
    perturbed = Perturbed(model, seq, recent=RECENT)
    kl = {"key": torch.zeros(L, H, dtype=torch.float64), "value": torch.zeros(L, H, dtype=torch.float64)}
    for which, codec in (("key", key_codec), ("value", value_codec)):
        for i in range(L):
            for h in range(H):
                kl[which][i, h] = perturbed.kl(i, which, body_round_trip(codec, sink, block, slice(h, h + 1)))
                if progress is not None:
                    progress()
    header = {**model_header(model), "data": data or {}, "sink_excluded": sink, "block": block,
              "key_reference": list(KEY_REF), "value_reference": list(VALUE_REF), "tokens": int(seq.shape[1]),
              "proxy": "KL per token, one KV head through the reference choice", "recent": RECENT,
              "seconds": round(time.time() - t0, 1)}
    return HeadCalibration(kl["key"], kl["value"], header)


def most_concentrated(calib: HeadCalibration, layers: int) -> list[int]:
    """The `layers` layers whose measured loss sits most in one head: by the sum over keys and values of the largest
    head's KL less the mean head's (what one codec per layer spends on the cheap heads). Each layer allocated per head
    costs decode time (a kernel call per run of heads), so few are."""
    spread = sum((kl.double().amax(1) - kl.double().mean(1)) for kl in (calib.kl_k, calib.kl_v))
    order = sorted(range(spread.shape[0]), key=lambda i: -float(spread[i]))
    return sorted(order[:max(layers, 0)])


def split_one(item: tuple, calib: HeadCalibration, layer: int, which: str) -> list:
    """One (layer, K/V) item of the allocator (proxy and bytes arrays over its choices) split into one per KV head:
    the layer's proxy times the head's share, its bytes divided evenly (every head holds the same codes and scales).
    The heads' items sum to the layer's, so one choice for all heads is one point of the split problem."""
    proxy, nbytes = item
    share = calib.shares(which)[layer]
    return [(proxy * share[h], nbytes / len(share)) for h in range(len(share))]


def groups(keys: list, values: list) -> list[tuple[int, int, object, object]]:
    """Per-head (key choice, value choice) lists -> (first, stop, key choice, value choice) runs of consecutive heads
    with the same pair: each run one part of a layer (core/heads.py)."""
    if len(keys) != len(values) or not keys:
        raise KvshrinkError(f"{len(keys)} key and {len(values)} value choices for a layer's heads")
    out = []
    for h, pair in enumerate(zip(keys, values)):
        if out and (out[-1][2], out[-1][3]) == pair:
            out[-1] = (out[-1][0], h + 1, *pair)
        else:
            out.append((h, h + 1, *pair))
    return out
