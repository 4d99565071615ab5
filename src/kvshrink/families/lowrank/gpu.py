"""ZDC decode attention on Triton (CUDA; the interpreter on a CPU): each KV head's body at its own
ranks (float16 coordinates, or int codes) is read in place by the shared coded-body kernel
(kernels/gpu.py), one launch per head since heads differ in width; the dense segments (sink,
mids, window at their own widths, this call's tokens at head_dim) are zero-padded to head_dim
(a zero coordinate adds nothing to a logit or a value sum) and form the dense partial in PyTorch.
A scored call (importance-aware ZDC) also gets each row's log-sum-exp from the merge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...codecs.base import Codec, Fp16, Packed
from ...kernels.backend import CALLS
from ...kernels.gpu import Body, coded_body, int_body
from ...kernels.partials import merge_runs


def _body(codec: Codec, packed: Packed, width: int) -> Body:
    t = packed.tensors
    b = next(iter(t.values())).shape[0]
    if isinstance(codec, Fp16):
        x = t["x"].reshape(b, -1)
        return Body(x, x, x, 16, width)
    return int_body(codec, t, b, width)


def attend(q: torch.Tensor, vis: torch.Tensor, st, cap: float = 0.0):
    """kernel.attend on the tensors' device: q (B, H, R, d) in the keys' dual coordinates, scaled;
    vis (B, t, S) over sink, body, mids, window, this call's tokens -> (B, H, R, d) float32, and where
    `st.scored` each row's log-sum-exp (B, H, R) too."""
    CALLS["ZDC"] += 1
    b, h, _, d = q.shape
    n = st.bodies[0][0].num_tokens if st.bodies else 0
    n_sink = st.sinks[0][0].shape[1]
    dense_vis = torch.cat([vis[..., :n_sink], vis[..., n_sink + n:]], -1)
    nbody = torch.full((b,), n, dtype=torch.int64, device=q.device)
    outs = []
    for i in range(h):
        qi = q[:, i:i + 1]
        parts = [(st.sinks[i][0], st.sinks[i][1]), (st.mids[i][0], st.mids[i][1]),
                 (st.windows[i][0], st.windows[i][1]), (st.new[0][:, i], st.new[1][:, i])]
        dk = torch.cat([F.pad(k.float(), (0, d - k.shape[-1])) for k, _ in parts], 1)[:, None]
        dv = torch.cat([F.pad(v.float(), (0, d - v.shape[-1])) for _, v in parts], 1)[:, None]
        if n:
            kd, vd = st.mids[i][0].shape[2], st.mids[i][1].shape[2]
            runs = [coded_body(qi, vis[..., n_sink:n_sink + n], nbody, _body(st.key_codec, st.bodies[i][0], kd),
                               _body(st.value_codec, st.bodies[i][1], vd), st.splits, cap)]
        else:  # only the dense tokens
            runs = []
        outs.append(merge_runs(runs, qi, dk, dv, dense_vis, cap, st.scored))
    if not st.scored:
        return torch.cat(outs, 1)
    return torch.cat([o for o, _ in outs], 1), torch.cat([lse for _, lse in outs], 1)
