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
from ...kernels.gpu import coded_body, int_body
from ...kernels.partials import merge_dense


def fused_attend(q, vis, dense_k, dense_v, dense_vis, keys: Packed, values: Packed, key_codec: IntQuant,
                 value_codec: IntQuant, splits: int = 4, cap: float = 0.0) -> torch.Tensor:
    """What kernel.fused_attend computes, on the tensors' device: q (B, H, R, d) float32 scaled, vis (B, n)
    bool over the body's tokens, dense_k / dense_v (B, H, n_dense, d) and dense_vis (B, t, n_dense) the
    other tokens -> (B, H, R, d) float32."""
    CALLS["int"] += 1
    b, h, _, d = q.shape
    dev = q.device
    nbody = torch.full((b,), keys.num_tokens, dtype=torch.int64, device=dev)
    # turned keys are turned forward (and rotated back) in the kernel: the query stays as it is
    qb = q @ rotation_on(d, key_codec.seed, dev) if key_codec.rotate and not key_codec.derope else q
    pm, pl, pacc = coded_body(qb, vis[:, None], nbody, int_body(key_codec, keys.tensors, b * h, d),
                              int_body(value_codec, values.tensors, b * h, d), splits, cap)
    if value_codec.rotate:  # the body's value sums are in the rotated basis
        n = pm.shape[2] - 1
        pacc[:, :, :n] = pacc[:, :, :n] @ rotation_on(d, value_codec.seed, dev).T
    return merge_dense(pm, pl, pacc, q, dense_k, dense_v, dense_vis, cap)
