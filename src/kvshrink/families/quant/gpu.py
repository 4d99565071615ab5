"""The int family's decode attention on Triton (CUDA; the interpreter on a CPU): the shared coded-body
kernel (kernels/gpu.py) reads the packed codes and their float16 (min, step) rows in place, the
dense tokens and the merge are PyTorch (kernels/partials.py). Rotated codecs are read in their
rotated basis, as kernel.py does: q R for the keys, the body's value sums rotated back after.

A body may be followed by runs of per-token codes, each read in place by one more launch of the same
kernel: the stage (the block still filling: keys in the stage codec, values in the body's), then a
coded window (the recent tokens, or the mixed family's high class and window, keys and values in its
codec). Each run's partials join the body's before the merge, as the numba kernel's stage and window
splits do.
"""

from __future__ import annotations

import torch

from ...codecs.base import Packed
from ...codecs.hadamard import rotation_on
from ...codecs.quant import IntQuant
from ...kernels.backend import CALLS
from ...kernels.gpu import coded_body, int_body
from ...kernels.partials import merge_runs


def fused_attend(q, vis, dense_k, dense_v, dense_vis, keys: Packed, values: Packed, key_codec: IntQuant,
                 value_codec: IntQuant, splits: int = 4, cap: float = 0.0, stage=None, window=None,
                 scored: bool = False):
    """What kernel.fused_attend computes, on the tensors' device: q (B, H, R, d) float32 scaled, vis (B, n)
    bool over the body's tokens (then the stage's, then the window's), dense_k / dense_v (B, H, n_dense, d) and
    dense_vis (B, t, n_dense) the other tokens; stage / window: None or (keys, values, codec) as kernel.py takes
    them -> (B, H, R, d) float32, and with `scored` also each row's log-sum-exp (B, H, R)."""
    CALLS["int"] += 1
    runs = [(keys, values, key_codec, value_codec)]
    if stage is not None:
        runs.append((stage[0], stage[1], stage[2], value_codec))
    if window is not None:
        runs.append((window[0], window[1], window[2], window[2]))
    parts, at = [], 0
    for k, v, kc, vc in runs:
        n = k.num_tokens
        if n:
            parts.append(_run(q, vis[:, at:at + n], k, v, kc, vc, splits, cap))
        at += n
    return merge_runs(parts, q, dense_k, dense_v, dense_vis, cap, scored)


def _run(q, vis, keys: Packed, values: Packed, key_codec: IntQuant, value_codec: IntQuant, splits: int, cap: float):
    """One run of codes' partials (m, l (B, H, P + 1, R), acc (B, H, P + 1, R, d); the last slot unused), its value
    sums in the model's basis."""
    b, h, _, d = q.shape
    dev = q.device
    nbody = torch.full((b,), keys.num_tokens, dtype=torch.int64, device=dev)
    # turned keys are turned forward (and rotated back) in the kernel: the query stays as it is
    qb = q @ rotation_on(d, key_codec.seed, dev) if key_codec.rotate and not key_codec.derope else q
    pm, pl, pacc = coded_body(qb, vis[:, None], nbody, int_body(key_codec, keys.tensors, b * h, d),
                              int_body(value_codec, values.tensors, b * h, d), splits, cap)
    if value_codec.rotate:  # the value sums are in the rotated basis
        pacc = pacc @ rotation_on(d, value_codec.seed, dev).T
    return pm, pl, pacc
