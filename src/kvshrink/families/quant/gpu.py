"""The int family's decode attention on Triton (CUDA; the interpreter on a CPU): the shared coded-body
kernel (kernels/gpu.py) reads the packed codes and their float16 (min, step) rows in place, the
dense tokens and the merge are PyTorch (kernels/partials.py). Rotated codecs are read in their
rotated basis, as kernel.py does: q R for the keys, the body's value sums rotated back after.
"""

from __future__ import annotations

import torch

from ...codecs.base import Packed
from ...codecs.hadamard import rotation_on
from ...codecs.quant import IntQuant
from ...kernels.backend import CALLS
from ...kernels.gpu import Body, coded_body
from ...kernels.partials import dense_partial, merge


def body(codec: IntQuant, packed: Packed) -> Body:
    """A packed body as the kernel reads it (views; a copy only if the body is not contiguous)."""
    t = packed.tensors
    b, h = t["codes"].shape[:2]
    d = packed.head_dim
    tg, gw = (codec.group, 1) if codec.axis == "channel" else (1, codec.group or d)
    return Body(t["codes"].reshape(b * h, -1), t["min"].reshape(b * h, -1), t["scale"].reshape(b * h, -1),
                codec.bits, d, tg, gw)


def attend(q: torch.Tensor, vis: torch.Tensor, nbody: torch.Tensor, dense_k: torch.Tensor, dense_v: torch.Tensor,
           dense_vis: torch.Tensor, keys: Body, values: Body, key_codec: IntQuant, value_codec: IntQuant,
           splits: int = 4, cap: float = 0.0) -> torch.Tensor:
    """q (B, H, R, d) float32 scaled, vis (B, n_max) bool over the bodies' tokens, nbody (B,) each one's
    body tokens, dense_k / dense_v (B, H, n_dense, d) and dense_vis (B, t, n_dense) the other tokens
    -> (B, H, R, d) float32."""
    CALLS["int"] += 1
    d = q.shape[3]
    dev = q.device
    qb = q @ rotation_on(d, key_codec.seed, dev) if key_codec.rotate else q
    pm, pl, pacc = coded_body(qb, vis[:, None], nbody, keys, values, splits, cap)
    n = pm.shape[2] - 1
    if value_codec.rotate:  # the body's value sums are in the rotated basis
        pacc[:, :, :n] = pacc[:, :, :n] @ rotation_on(d, value_codec.seed, dev).T
    pm[:, :, n], pl[:, :, n], pacc[:, :, n] = dense_partial(q, dense_k, dense_v, dense_vis, cap)
    return merge(pm, pl, pacc)


def fused_attend(q, vis, dense_k, dense_v, dense_vis, keys: Packed, values: Packed, key_codec: IntQuant,
                 value_codec: IntQuant, splits: int = 4, cap: float = 0.0) -> torch.Tensor:
    """What kernel.fused_attend computes, on the tensors' device."""
    nbody = torch.full((q.shape[0],), keys.num_tokens, dtype=torch.int64, device=q.device)
    return attend(q, vis, nbody, dense_k, dense_v, dense_vis, body(key_codec, keys), body(value_codec, values),
                  key_codec, value_codec, splits, cap)
