"""Joint-basis key choices for the budget (codecs/joint.py): calibrated once per model, corpus range and block,
in a file beside the budget calibration (its path with `-joint6`), and offered to the allocator beside the
menu's key choices.

A key's coding error reaches the model as q . (k - k_hat). Per layer and KV head, on the calibration tokens:
- M: the second moment of the group's query heads after RoPE, averaged over the turns of the key blocks'
  starts up to `context` (a stored key is turned back within its block, so it meets the query turned by the
  block's start);
- S: the covariance of the turned keys within their blocks (codes per axis and block remove its mean);
- the basis B = M^(1/2) V, V the eigenvectors of M^(1/2) S M^(1/2), axes by falling eigenvalue w: in y = k B
  the error metric is plain squared error and the axes are uncorrelated, with variances w.
Widths per axis (0, 2..6, 8; 1-bit uniform codes of a min/max range cost more than the mean) are spent on
the layer's heads' mean variance per axis rank by a Lagrangian over w x D(width), D the squared error of
uniform min/max codes over a block of Gaussian samples, to an average of `bits` a channel (`floor` 2: every
axis coded). Each choice's loss is the KL per token measured as the menu's 1-3 bit choices are
(core/sensitivity.Perturbed, one layer's keys through the round trip), its bytes those of its codes plus the
map back to keys the codec holds (counted by the cache).

Measured on the bundled model (docs/budget.md): at 3 bits a channel the joint keys' KL is 40% under the
menu's best 3-bit keys (turned, rotated), at 2 bits 46% under; the gain is the spread of w (3 to 25 times
between the arithmetic and geometric mean per head), which a rotation to equal variances cannot use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ...codecs.joint import JointKeys
from ...codecs.spin import turn
from ...core.calibfile import beside, check_header, load_tensors, model_header, save_tensors, spread_offsets
from ...core.sensitivity import Perturbed, body_round_trip, collect
from ...errors import KvshrinkError
from ...spec import spec_from_config
from .config import RECENT

FORMAT = "kvshrink-budget-joint-7"  # 2: int8 maps; 3: statistics over the whole context; 4: RECENT 32; 5: RECENT 16;
# 6: one bit a channel (1, 0); 7: half-bit steps (0.5, 1.5, 2.5), no steps held for 0-bit axes (bytes)
LONGEST = 32768  # block starts M is averaged over, at most (a longer context's slowest pairs barely turn more)
# (bits a channel on average, least bits an axis). (1, 0): about 24 of 64 axes at 3 to 5 bits, the rest their block's
# mean: 3-4x J2's KL in 43-57% of its bytes, which auto-8x spends on values (docs/budget.md, "One bit a channel")
# (0.5, 0), (1.5, 0), (2.5, 0): steps of half a bit between the others, 32 bits a token and head where J1 -> J2 was 64:
# 9-10% less KL in auto-6x and auto-8x on the protocol (docs/budget.md, "Half-bit steps for joint keys")
CHOICES = ((2, 0), (3, 0), (3, 2), (4, 0), (4, 2), (1, 0), (0.5, 0), (1.5, 0), (2.5, 0))
ONE_BIT = (1, 0)  # offered where the configuration asks (`joint1`: on in auto-8x; at 6x its Δppl measured worse)
WIDTHS = (0, 2, 3, 4, 5, 6, 8)
# squared error of uniform min/max codes over a block of 128 Gaussian samples, in variances (0 bits: the mean)
DIST = {0: 1.0, 2: 0.23, 3: 0.042, 4: 0.0093, 5: 0.0022, 6: 0.00052, 8: 0.000032}
_TENSORS = ("inverse", "widths", "proxy", "bytes")


def spend(w, total: int, floor: int) -> list:
    """Widths per axis (not rising where w does not) minimizing sum w_j D(b_j) with sum b_j <= total: a
    Lagrangian, then the bits left one class step at a time where they buy most."""
    allowed = [b for b in WIDTHS if (b == 0 and floor == 0) or b >= max(floor, 2)]
    w = [float(x) for x in w]
    if total < allowed[0] * len(w):
        raise KvshrinkError(f"{total} bits cannot code {len(w)} axes at {allowed[0]} bits or more")
    lo, hi, best = 0.0, max(w) * 10 + 1e-12, [allowed[0]] * len(w)
    for _ in range(100):
        lam = (lo + hi) / 2
        b = [min(allowed, key=lambda x: wj * DIST[x] + lam * x) for wj in w]
        if sum(b) > total:
            lo = lam
        else:
            hi, best = lam, b
    b = list(best)
    while True:
        steps = []
        for j, bj in enumerate(b):
            nxt = next((x for x in allowed if x > bj), None)
            if nxt is not None and sum(b) - bj + nxt <= total:
                steps.append((w[j] * (DIST[bj] - DIST[nxt]) / (nxt - bj), j, nxt))
        if not steps:
            break
        _, j, nxt = max(steps)
        b[j] = nxt
    return sorted(b, reverse=True)  # the larger widths to the larger variances: never worse


@torch.no_grad()
def bases(layers: dict, spec, block: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (L, H, D, D), w (L, H, D)) float64 from {layer: (M, S)} sums (module docstring)."""
    n = len(spec.rope)
    d = spec.head_dim
    freqs = torch.tensor(spec.rope, dtype=torch.float64)
    idx = torch.arange(n)
    starts = torch.arange(0, max(context, block), block, dtype=torch.float64)
    B = torch.zeros(spec.num_layers, spec.num_kv_heads, d, d, dtype=torch.float64)
    W = torch.zeros(spec.num_layers, spec.num_kv_heads, d, dtype=torch.float64)
    for i, (M, S) in layers.items():
        Mt = torch.zeros_like(M)
        for p0 in starts:
            c, s = torch.cos(p0 * freqs), torch.sin(p0 * freqs)
            R = torch.eye(d, dtype=torch.float64)
            R[idx, idx], R[idx + n, idx + n], R[idx, idx + n], R[idx + n, idx] = c, c, -s, s
            Mt += R.T @ M @ R / len(starts)
        for h in range(spec.num_kv_heads):
            e, U = torch.linalg.eigh(Mt[h])
            half = U @ torch.diag(e.clamp_min(float(e.max()) * 1e-9).sqrt()) @ U.T
            w, V = torch.linalg.eigh(half @ S[h] @ half)
            B[i, h] = (half @ V).flip(-1)
            W[i, h] = w.clamp_min(0).flip(-1)
    return B, W


@dataclass(eq=False)
class JointCalibration:
    """inverse (L, H, D, D) float16: each layer's map back to keys; widths (L, len(CHOICES), D); proxy and bytes
    (L, len(CHOICES)): each choice's KL per token and bytes per coded token (all KV heads, codes and scales)."""

    inverse: torch.Tensor
    widths: torch.Tensor
    proxy: torch.Tensor
    bytes: torch.Tensor
    header: dict

    def codec(self, layer: int, choice: int, block: int, rope: tuple) -> JointKeys:
        """One codec per (layer, choice) for every cache built from this calibration: a server's sequences then
        share its inverse (counted once across them) and are read by one batched kernel call."""
        memo = self.__dict__.setdefault("_codecs", {})
        key = (layer, choice, block, rope)
        if key not in memo:
            memo[key] = JointKeys(self.inverse[layer], self.widths[layer, choice].tolist(), block, rope,
                                  CHOICES[choice][0])
        return memo[key]

    def fixed_bytes(self, layer: int) -> int:
        """The map back to keys a layer's joint codec holds."""
        h, d, _ = self.inverse[layer].shape
        return map_bytes(h, d)

    def check(self, model, block: int) -> None:
        check_header(self.header, model, "auto", what="joint key calibration")
        if self.header.get("block") != block:
            raise KvshrinkError(f"joint key calibration is for blocks of {self.header.get('block')} tokens, not {block}")

    def save(self, path: str) -> None:
        save_tensors(path, {k: getattr(self, k) for k in _TENSORS}, FORMAT, self.header)

    @classmethod
    def load(cls, path: str, model=None, block: int | None = None) -> "JointCalibration":
        tensors, header = load_tensors(path, FORMAT, _TENSORS, "a joint key calibration")
        calib = cls(**tensors, header=header)
        if model is not None:
            calib.check(model, block if block is not None else header.get("block"))
        return calib


def map_bytes(heads: int, d: int) -> int:
    """Bytes of a joint codec's map back to keys: int8 rows, a float16 scale each (codecs/joint.py)."""
    return heads * d * d + heads * d * 2


def path_beside(budget_path: str) -> str:
    """Where a budget calibration's joint key calibration lives."""
    # a new format, a new file: the old one is not reused
    return beside(budget_path, "-joint" + FORMAT.rsplit("-", 1)[1])


def calibrate(model, ids: torch.Tensor, data: dict | None = None, sink: int = 4, block: int = 128,
              context: int | None = None, progress=None) -> JointCalibration:
    """Bases from every sequence of `ids` (sequences, length), each choice's KL on the first (as the budget
    calibration measures its menu). A stored key keeps its block start's RoPE angle, so the sequences sit at
    positions spread over the model's context (`spread_offsets`) and M is averaged over block starts up to
    `context` (None: the model's context, at most LONGEST). With statistics from positions 0..511 and M over
    the first 2,048, `auto-6x` lost 7% more perplexity at positions 3,000-4,000 than at 0-1,000 of the
    bundled model (docs/budget.md)."""
    spec = spec_from_config(model.config)
    if not spec.rope:
        raise KvshrinkError("joint-basis keys are turned back within their blocks: the model needs RoPE")
    context = context or min(spec.max_context or LONGEST, LONGEST)
    t0 = time.time()
    L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
    n = (ids.shape[1] - sink) // block * block
    if n == 0:
        raise KvshrinkError(f"calibration sequences of {ids.shape[1]} tokens hold no block of {block} after the sink")
    sums = {i: (torch.zeros(H, D, D, dtype=torch.float64), torch.zeros(H, D, D, dtype=torch.float64)) for i in range(L)}
    # turned keys keep their block start's RoPE angle: keys from positions 0..511 alone missed later angles
    offsets = spread_offsets(len(ids), ids.shape[1], spec.max_context)
    for layers in collect(model, ids, sink, offsets=offsets):
        for i, (q, k, _, _, _) in layers.items():
            kt = turn(k[:, :n].float(), spec.rope, block, -1).double().reshape(H, n // block, block, D)
            kc = (kt - kt.mean(2, keepdim=True)).reshape(H, -1, D)
            qq = q.double().reshape(H, -1, D)  # query heads in KV-head groups (GQA order)
            sums[i][0].add_(qq.transpose(1, 2) @ qq / qq.shape[1] / len(ids))
            sums[i][1].add_(kc.transpose(1, 2) @ kc / kc.shape[1] / len(ids))
    B, W = bases(sums, spec, block, context)
    inverse = torch.linalg.inv(B).to(torch.float16)
    widths = torch.tensor([[spend(W[i].mean(0), bits * D, floor) for bits, floor in CHOICES] for i in range(L)],
                          dtype=torch.int16)
    calib = JointCalibration(inverse, widths, torch.zeros(L, len(CHOICES), dtype=torch.float64),
                             torch.zeros(L, len(CHOICES), dtype=torch.float64), {})
    perturbed = Perturbed(model, ids[:1], recent=RECENT)
    probe = torch.randn(1, H, n, D, generator=torch.Generator().manual_seed(0))
    for i in range(L):
        for j in range(len(CHOICES)):
            codec = calib.codec(i, j, block, spec.rope)
            calib.proxy[i, j] = max(perturbed.kl(i, "key", body_round_trip(codec, sink, block)), 0.0)
            calib.bytes[i, j] = codec.encode(probe, block).nbytes() / n
            if progress is not None:
                progress()
    calib.header = {**model_header(model), "data": data or {}, "sink_excluded": sink, "block": block,
                    "context": context, "positions": offsets, "choices": [list(c) for c in CHOICES],
                    "proxy": "KL per token (measured)", "recent": RECENT, "tokens": n * ids.shape[0],
                    "seconds": round(time.time() - t0, 1)}
    return calib


def items(calib: JointCalibration, layer: int, coded: int, staged: int, stage_bytes,
          per_token=None, one_bit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(proxy, bytes held) of a layer's joint choices with `coded` tokens in blocks and `staged` in the stage
    (stage_bytes(bits): a staged key token's bytes, the stage rule of the same width), the inverse included.
    per_token: the choices' bytes per coded token where they are not the calibration's (entropy-coded, coded.py).
    one_bit: whether ONE_BIT is offered (else its proxy is infinite: the allocator passes it by)."""
    per_token = calib.bytes[layer] if per_token is None else per_token
    held = [coded * float(per_token[j]) + staged * stage_bytes(int(np.ceil(bits))) + calib.fixed_bytes(layer)
            for j, (bits, _) in enumerate(CHOICES)]
    proxy = np.array([p if one_bit or c != ONE_BIT else np.inf for p, c in zip(calib.proxy[layer].tolist(), CHOICES)])
    return proxy, np.array(held)
