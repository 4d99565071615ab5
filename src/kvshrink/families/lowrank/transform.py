"""Zero-delay low-rank KV compression (ZDC; Zhang and Shen, arXiv 2408.04107).

Offline, per (layer, KV head): an orthonormal basis for the post-RoPE keys and
the queries of its group (one joint basis, kept per KV head as GQA shares it)
and one for the values, with directions sorted by calibration energy. `apply`
folds the value basis into the model: `v_proj` emits values in basis
coordinates and `o_proj` takes them back, so cached values are never
reconstructed. Queries are rotated into the key basis right after RoPE (inside
the attention function, `families/lowrank/states.py`); the cache rotates new keys the
same way and keeps only the leading `r` coordinates of each (cache.py).
Keeping a prefix of a sorted basis is what makes per-token ranks cheap:
attention-sink tokens keep more coordinates than the rest.

Ranks per (layer, head, K/V) come from `allocate`: a greedy split of a
dimension budget that minimizes a loss proxy. The proxy is measured here once:
a Fisher (squared first-order) estimate of the calibration loss increase when
a head keeps r coordinates, for every r at once (see `_fisher`).

A calibration is a safetensors file whose JSON header names the model (type,
shape, a weight fingerprint) and the calibration tokens.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch

from ...attention.function import NAME as KVSHRINK_ATTENTION
from ...core.calibfile import (
    calibration_dir,
    calibration_ids,
    check_header,
    load_tensors,
    model_fingerprint,
    model_header,
    save_tensors,
    spread_offsets,
)
from ...core.sensitivity import collect
from ...errors import KvshrinkError
from ...spec import spec_from_config

FORMAT = "kvshrink-zdc-3"  # 3: sequences spread over the context (the bases changed)
_TENSORS = ("uk", "uv", "qk", "vi", "ek", "ev", "fk", "fv")
KEY_BASES = ("query", "joint", "key")
VALUE_BASES = ("output", "pca")
NEEDS_CACHE = ("a ZDC-transformed model needs its ZdcCache: pass "
               "cache=kvshrink.from_method('zdc-...', model)")


@dataclass(eq=False)  # compared and hashed by identity (memo keys)
class ZdcCalibration:
    """Bases and loss proxies for every (layer, KV head).

    uk, uv: (L, H, D, D) maps into basis coordinates (coords = x @ u), most important first.
    qk: (L, H, D, D) the query map, uk^-T (so q @ qk . k @ uk = q . k).
    vi: (L, H, D, D) the value inverse, uv^-1 (v = coords @ vi; folded into o_proj).
    ek, ev: (L, H, D) energy of each coordinate (eigenvalues).
    fk, fv: (L, H, D + 1) loss proxy when r = 0..D leading coordinates are kept (fk[..., D] = 0).
    """

    uk: torch.Tensor
    uv: torch.Tensor
    qk: torch.Tensor
    vi: torch.Tensor
    ek: torch.Tensor
    ev: torch.Tensor
    fk: torch.Tensor
    fv: torch.Tensor
    header: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.uk.shape[:3])

    def check(self, model) -> None:
        """Refuse a calibration made for another model, naming the difference."""
        check_header(self.header, model, "zdc")

    def save(self, path: str) -> None:
        save_tensors(path, {k: getattr(self, k) for k in _TENSORS}, FORMAT, self.header)

    @classmethod
    def load(cls, path: str, model=None) -> ZdcCalibration:
        tensors, header = load_tensors(path, FORMAT, _TENSORS, "a ZDC calibration")
        calib = cls(**tensors, header=header)
        if model is not None:
            calib.check(model)
        return calib


# --- calibration -------------------------------------------------------------------------


def _fisher(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, u_inv_t: torch.Tensor) -> torch.Tensor:
    """Loss proxy for keeping r = 0..D leading coordinates c = x @ u, for all r.

    Truncating changes x by -sum_{i>=r} c_i b_i (b_i: rows of u^-1); to first order the loss
    moves by -sum_{i>=r} c_i (g.b_i). The proxy sums the squares of that change over tokens
    (a diagonal empirical-Fisher estimate, as KVQuant's sensitivity weights).
    x, g: (N, D); u, u_inv_t = u^-T: (D, D). Returns (D + 1,)."""
    c = (g @ u_inv_t) * (x @ u)  # (N, D)
    tail = torch.flip(torch.cumsum(torch.flip(c, [1]), 1), [1])  # tail[:, r] = sum_{i>=r} c_i
    tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], 1)
    return 0.5 * (tail.double() ** 2).sum(0)


def _basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(cov.double())
    order = torch.argsort(vals, descending=True)
    return vecs[:, order], vals[order].clamp_min(0)


def _sqrt_metric(m: torch.Tensor, reg: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S = M^(1/2), M normalized to a mean eigenvalue of 1 and regularized."""
    m = m.double() / (m.trace() / m.shape[0])
    vals, vecs = torch.linalg.eigh(m + reg * torch.eye(m.shape[0], dtype=m.dtype))
    root = vals.clamp_min(reg).sqrt()
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def _weighted_basis(cov: torch.Tensor, metric: torch.Tensor | None):
    """(map u, u^-T, energies): PCA of x under the metric (minimizes E|(x - x_r) S|^2, S = M^1/2);
    an orthonormal PCA when metric is None."""
    if metric is None:
        u, e = _basis(cov)
        return u, u, e
    s, s_inv = _sqrt_metric(metric)
    u, e = _basis(s @ cov.double() @ s)
    return s @ u, s_inv @ u, e


def calibrate(model, ids: torch.Tensor, data: dict | None = None, sink: int = 4, key_basis: str = "query",
              value_basis: str = "output", progress=None) -> ZdcCalibration:
    """Collect post-RoPE Q/K and V on `ids` (sequences, length); bases and loss proxies.

    key_basis: "query" (PCA of the keys under the metric of the group's query covariance:
    minimizes the mean squared error of q.k), "joint" (orthonormal PCA of keys and queries,
    each normalized by its trace) or "key" (orthonormal PCA of keys).
    value_basis: "output" (PCA under the metric sum_j W_o,j^T W_o,j of the group's o_proj
    columns: minimizes the error after o_proj) or "pca" (orthonormal PCA of values).
    The first `sink` tokens of each sequence keep every coordinate in the cache, so they are
    left out of the statistics (their outlier keys would otherwise steer the bases).

    The sequences are placed at positions spread over the model's context (`spread_offsets`): the
    bases hold post-RoPE keys, which turn with their position, and bases fitted on positions
    0..511 alone lost the keys of later positions (perplexity x9 at positions 3,000-4,000 of the
    bundled model; docs/lowrank.md, "Long contexts").
    """
    if key_basis not in KEY_BASES:
        raise KvshrinkError(f"unknown key basis {key_basis!r}; use one of {', '.join(KEY_BASES)}")
    if value_basis not in VALUE_BASES:
        raise KvshrinkError(f"unknown value basis {value_basis!r}; use one of {', '.join(VALUE_BASES)}")
    spec = spec_from_config(model.config)
    L, H, D, G = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.num_heads // spec.num_kv_heads
    t0 = time.time()
    ck = torch.zeros(L, H, D, D, dtype=torch.float64)
    cq, cv = torch.zeros_like(ck), torch.zeros_like(ck)
    keep = {i: [] for i in range(L)}
    offsets = spread_offsets(ids.shape[0], ids.shape[1], spec.max_context)
    for layers in collect(model, ids, sink, progress, offsets):
        for i, (q, k, gk, v, gv) in layers.items():
            qf = q.reshape(H, G, -1, D).reshape(H, -1, D).double()
            kf, vf = k.double(), v.double()
            ck[i] += kf.transpose(1, 2) @ kf
            cq[i] += qf.transpose(1, 2) @ qf
            cv[i] += vf.transpose(1, 2) @ vf
            keep[i].append((k, gk, v, gv))
    out = {name: torch.empty(L, H, D, D) for name in ("uk", "uv", "qk", "vi")}
    ek, ev = torch.empty(L, H, D), torch.empty(L, H, D)
    fk, fv = torch.empty(L, H, D + 1), torch.empty(L, H, D + 1)
    for i in range(L):
        k, gk, v, gv = (torch.cat([p[j] for p in keep[i]], 1) for j in range(4))  # (H, N, D)
        wo = model.model.layers[i].self_attn.o_proj.weight.detach().double().view(-1, H, G, D)
        for h in range(H):
            if key_basis == "query":
                uk, uk_it, e = _weighted_basis(ck[i, h], cq[i, h])
            else:
                cov = ck[i, h] / ck[i, h].trace() + (cq[i, h] / cq[i, h].trace() if key_basis == "joint" else 0)
                uk, uk_it, e = _weighted_basis(cov, None)
            ek[i, h] = e
            metric = torch.einsum("ogd,oge->de", wo[:, h], wo[:, h]) if value_basis == "output" else None
            uv, uv_it, ev[i, h] = _weighted_basis(cv[i, h], metric)
            out["uk"][i, h], out["qk"][i, h] = uk, uk_it
            out["uv"][i, h], out["vi"][i, h] = uv, uv_it.T
            fk[i, h] = _fisher(k[h].double(), gk[h].double(), uk, uk_it).float()
            fv[i, h] = _fisher(v[h].double(), gv[h].double(), uv, uv_it).float()
    header = {**model_header(model), "data": data or {}, "positions": offsets, "sink_excluded": sink,
              "key_basis": key_basis,
              "value_basis": value_basis, "seconds": round(time.time() - t0, 1)}
    return ZdcCalibration(**out, ek=ek, ev=ev, fk=fk, fv=fv, header=header)


# --- ranks ---------------------------------------------------------------------------------


def allocate(costs: torch.Tensor, budget: int, step: int = 8, min_rank: int = 8) -> torch.Tensor:
    """Ranks (one per row of `costs`, (U, D + 1): cost of keeping r = 0..D) summing to at
    most `budget`, greedily lowering the total cost per dimension spent.

    Each move takes a unit from its rank to any larger rank on the `step` grid, choosing
    the best cost drop per dimension (so a flat stretch followed by a drop is not missed).
    """
    units, d1 = costs.shape
    dim = d1 - 1
    if budget < units * min_rank:
        raise KvshrinkError(f"a budget of {budget} dimensions cannot give {units} heads the minimum rank {min_rank}")
    grid = torch.arange(min_rank, dim + 1, step)
    if grid[-1] != dim:
        grid = torch.cat([grid, torch.tensor([dim])])
    c = costs.double()[:, grid]  # (U, G)
    at = torch.zeros(units, dtype=torch.long)  # index into grid
    left = budget - units * min_rank
    while True:
        cur = c.gather(1, at[:, None])  # (U, 1)
        gain = (cur - c) / (grid - grid[at][:, None]).clamp_min(1)  # per dimension
        span = grid[None, :] - grid[at][:, None]
        ok = (span > 0) & (span <= left)
        gain = torch.where(ok, gain, torch.full_like(gain, -1.0))
        best = gain.max()
        if best < 0:
            break
        u, g = divmod(int(torch.argmax(gain)), gain.shape[1])
        left -= int(span[u, g])
        at[u] = g
    return grid[at]


@dataclass
class ZdcRanks:
    """Kept coordinates per (layer, KV head) for keys and values, and for sink tokens."""

    k: torch.Tensor  # (L, H) int
    v: torch.Tensor
    sink_rank: int  # coordinates the first `sink` tokens keep (head_dim: all)

    def fraction(self, head_dim: int) -> float:
        return float((self.k.sum() + self.v.sum()) / (2 * self.k.numel() * head_dim))


def choose_ranks(calib: ZdcCalibration, budget: float, alloc: str = "fisher", sink_rank: int | None = None,
                 step: int = 8, min_rank: int = 8) -> ZdcRanks:
    """Ranks keeping `budget` (0..1] of the key and value dimensions.

    alloc: "uniform" (the same rank everywhere), "energy" (greedy on the fraction of
    calibration energy left out) or "fisher" (greedy on the measured loss proxy).
    """
    L, H, D = calib.shape
    if not 0 < budget <= 1:
        raise KvshrinkError(f"a ZDC budget is a fraction of dimensions in (0, 1], got {budget!r}")
    sink_rank = D if sink_rank is None else sink_rank
    if not 0 <= sink_rank <= D:
        raise KvshrinkError(f"sink rank {sink_rank} is outside 0..{D}")
    if alloc == "uniform":
        r = max(1, min(D, round(budget * D)))
        full = torch.full((L, H), r, dtype=torch.long)
        return ZdcRanks(full, full.clone(), sink_rank)
    if alloc == "energy":
        def tail(e):
            t = torch.flip(torch.cumsum(torch.flip(e, [-1]), -1), [-1])
            return torch.cat([t, torch.zeros_like(t[..., :1])], -1) / e.sum(-1, keepdim=True)
        costs = torch.cat([tail(calib.ek).reshape(-1, D + 1), tail(calib.ev).reshape(-1, D + 1)])
    elif alloc == "fisher":
        costs = torch.cat([calib.fk.reshape(-1, D + 1), calib.fv.reshape(-1, D + 1)])
    else:
        raise KvshrinkError(f"unknown rank allocation {alloc!r}; use uniform, energy or fisher")
    ranks = allocate(costs, int(budget * 2 * L * H * D), step, min(min_rank, D))
    return ZdcRanks(ranks[: L * H].reshape(L, H), ranks[L * H:].reshape(L, H), sink_rank)


# --- folding into the model ----------------------------------------------------------------


def _check_llama_like(model) -> None:
    try:
        attn = model.model.layers[0].self_attn
        attn.o_proj, attn.layer_idx  # noqa: B018
        if not hasattr(attn, "v_proj"):
            attn.qkv_proj  # noqa: B018
    except AttributeError:
        raise KvshrinkError(
            f"unsupported architecture {model.config.model_type!r} for ZDC: needs self_attn.o_proj and a value "
            "projection (v_proj, or a fused qkv_proj)"
        ) from None


def _value_projection(attn, spec):
    """(weight, bias or None) of the value rows: v_proj's, or the last rows of a fused qkv_proj
    (Phi-3), as views that fold in place."""
    proj = getattr(attn, "v_proj", None)
    if proj is not None:
        return proj.weight, proj.bias
    rows = slice(spec.num_heads * spec.head_dim + spec.num_kv_heads * spec.head_dim, None)
    bias = attn.qkv_proj.bias
    return attn.qkv_proj.weight[rows], (bias[rows] if bias is not None else None)


@torch.no_grad()
def apply(model, calib: ZdcCalibration, inplace: bool = False):
    """A copy of `model` (or `model` itself) with the value bases folded into v_proj/o_proj and
    the "kvshrink" attention selected (its layers attend only through a ZdcCache). Logits are unchanged until a ZdcCache truncates."""
    _check_llama_like(model)
    calib.check(model)
    if getattr(model, "kvshrink_zdc", None) is not None:
        raise KvshrinkError("this model is already ZDC-transformed")
    if not inplace:
        model = copy.deepcopy(model)
    spec = spec_from_config(model.config)
    H, D, G = spec.num_kv_heads, spec.head_dim, spec.num_heads // spec.num_kv_heads
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        weight, bias = _value_projection(attn, spec)
        uv = calib.uv[i].to(weight)  # (H, D, D): v coords = v @ uv
        vi = calib.vi[i].to(weight)  # v = coords @ vi
        weight.copy_(torch.einsum("hde,hdk->hek", uv, weight.reshape(H, D, -1)).reshape_as(weight))
        if bias is not None:
            bias.copy_(torch.einsum("hde,hd->he", uv, bias.reshape(H, D)).reshape(-1))
        wo = attn.o_proj.weight.view(-1, H, G, D)  # (hidden, kv head, group, D)
        attn.o_proj.weight.copy_(torch.einsum("ohgd,hed->ohge", wo, vi).reshape_as(attn.o_proj.weight))
        attn.register_buffer("zdc_qk", calib.qk[i].to(weight).contiguous(), persistent=False)
        attn.kvshrink_needs_cache = NEEDS_CACHE
    model.kvshrink_zdc = calib
    model.set_attn_implementation(KVSHRINK_ATTENTION)
    return model


def default_calibration_path(model) -> str:
    return os.path.join(calibration_dir(), f"zdc-{model_fingerprint(model)}-{FORMAT.rsplit('-', 1)[1]}.safetensors")


def load_or_calibrate(model, tokenizer, corpus: str | None = None, log=print) -> ZdcCalibration:
    """The calibration at $KVSHRINK_ZDC_CALIBRATION, else at the default path for this model
    (made first if it is missing)."""
    if os.environ.get("KVSHRINK_ZDC_CALIBRATION"):
        return ZdcCalibration.load(os.environ["KVSHRINK_ZDC_CALIBRATION"], model)
    path = default_calibration_path(model)
    if os.path.isfile(path):
        return ZdcCalibration.load(path, model)
    log(f"ZDC: no calibration for this model at {path}; calibrating (about 1.5 minutes on 2 cores for the "
        "bundled 135M model, longer for larger ones)")
    ids, desc = calibration_ids(tokenizer, corpus)
    calib = calibrate(model, ids, desc)
    calib.save(path)
    return calib
