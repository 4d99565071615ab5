"""RVQ decode attention on Triton (CUDA; the interpreter on a CPU): the shared coded-body kernel
(kernels/gpu.py) reads each segment's codes (the body, then the stage, both per-token codes) in
place, summing each group's levels' float16 codewords in registers, times the token's scale. Codes
are in the codecs' grouped channel order: the query is put in the keys' order once, and the value
sums back in head order before the merge with the dense tokens (PyTorch, kernels/partials.py).
"""

from __future__ import annotations

import torch

from ...codecs.base import Packed
from ...codecs.rvq import RVQ
from ...kernels.backend import CALLS
from ...kernels.gpu import Body, coded_body
from ...kernels.partials import dense_partial, merge


def _body(codec: RVQ, packed: Packed) -> Body:
    t = packed.tensors
    b, h = t["codes"].shape[:2]
    return Body(t["codes"].reshape(b * h, -1), codec.books_on(t["codes"].device), t["scale"].reshape(b * h, -1),
                codec.bits, packed.head_dim, gw=codec.group, depth=codec.depth, size=codec.size)


def attend(q, vis, dense_k, dense_v, dense_vis, segments: list, key_codec: RVQ, value_codec: RVQ, splits: int = 4,
           cap: float = 0.0) -> torch.Tensor:
    """kernel.fused_attend on the tensors' device: segments, one or two (keys, values) Packed laid end
    to end, which vis (B, n) covers -> (B, H, R, d) float32."""
    CALLS["RVQ"] += 1
    b, h, r, d = q.shape
    dev = q.device
    qg = q[..., key_codec.order(d, dev)]
    vorder = value_codec.order(d, dev)
    parts, at = [], 0
    for k, v in segments:
        n = k.num_tokens
        nbody = torch.full((b,), n, dtype=torch.int64, device=dev)
        pm, pl, pacc = coded_body(qg, vis[:, None, at:at + n], nbody, _body(key_codec, k), _body(value_codec, v),
                                  splits if at == 0 else 1, cap)
        head = torch.empty_like(pacc)
        head[..., vorder] = pacc  # grouped channel order -> head order
        parts.append((pm[:, :, :-1], pl[:, :, :-1], head[:, :, :-1]))  # the last slot is left for dense tokens
        at += n
    dm, dl, dacc = dense_partial(q, dense_k, dense_v, dense_vis, cap)
    parts.append((dm[:, :, None], dl[:, :, None], dacc[:, :, None]))
    return merge(*(torch.cat(x, 2) for x in zip(*parts)))
