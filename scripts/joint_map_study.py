"""The joint keys' maps back to keys: what they cost `auto-8x` and four ways to hold less of them, measured before
any codec or kernel is written for them (docs/budget.md, "The joint keys' maps").

A joint codec holds, per KV head, a 64 x 64 map of int8 rows with a float16 scale each (12.7 KB a layer). At 2,048
tokens that is 6.5% of `auto-8x`'s bytes, and the allocator pays for it. Yet a 0-bit axis (most axes of J0.5 and J1)
uses its row only to map its block's mean back. This script prints:
- `bytes`: the share of the maps in a prefilled `auto-8x` cache;
- `proxy`: the allocator's proxy at 6x and 8x if each choice held fewer map bytes, its loss taken as unchanged
  (`rows`: the coded axes' rows only; `rows+cols`: those and the basis's coded columns, which encoding then needs;
  `low4` / `low3`: the 0-bit axes' rows at 4 or 3 bits; `+off8`: block means held as one 8-bit key-space offset);
- `kl`: each joint choice's KL per token (as the joint calibration measures it, one layer's keys at a time) for
  (a) the coded rows with the block means in one key-space offset, coordinates by the exact basis columns, float16
  or 8-bit offsets, or by a Euclidean least-squares fit on the rows alone; (b) 0-bit axes dropped (no mean, no row),
  with the stored basis or one from the turned keys' second moment (and that basis with its means kept);
  (c) the 0-bit axes' rows at 4, 3 or 2 bits, the codec otherwise as stored (encoding inverts the map it holds).

    .venv/bin/python scripts/joint_map_study.py bytes|proxy|kl [--layers 5,7,18]
"""

import argparse

import numpy as np
import torch

from kvshrink.api import from_method, prepare
from kvshrink.codecs.joint import JointKeys
from kvshrink.codecs.quant import _half_down, _half_up
from kvshrink.codecs.spin import turn
from kvshrink.core.calibfile import calibration_ids, spread_offsets
from kvshrink.core.sensitivity import Perturbed, body_round_trip, collect
from kvshrink.corpus import load_corpus_ids
from kvshrink.families.budget import allocate, joint
from kvshrink.families.budget import cache as budget_cache
from kvshrink.families.budget.config import RECENT
from kvshrink.models import load_model
from kvshrink.registry import get_method
from kvshrink.spec import spec_from_config

SINK, BLOCK = 4, 128
NAMES = [(0.5, 0), (1, 0), (1.5, 0), (2, 0), (2.5, 0)]


def uniform(y, w):
    """y (B, H, blocks, group, axes) through per-block uniform codes of widths w (axes,): the cache's rule."""
    lo = _half_down(y.amin(3)).float()
    qmax = (2.0 ** w - 1).clamp_min(1)
    step = _half_up((y.amax(3) - lo) / qmax).float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.minimum(((y - lo[:, :, :, None]) / safe[:, :, :, None]).round().clamp(min=0), qmax)
    return lo, codes * step[:, :, :, None]


class Offset:
    """Coded rows only; a block's means in one key-space offset. mode: 'cols' (exact basis columns) or 'euclid'."""

    def __init__(self, codec, mode, offset8=False):
        self.c, self.mode, self.offset8 = codec, mode, offset8

    def encode(self, x, block):
        c, g = self.c, self.c.group
        b, h, t, d = x.shape
        kt = turn(x.float(), c.derope, g, -1).reshape(b, h, t // g, g, d)
        m = kt.mean(3, keepdim=True)
        rows = c.inverse()[:, :c.coded]
        cols = (c.basis("cpu")[:, :, :c.coded] if self.mode == "cols"
                else rows.transpose(1, 2) @ torch.linalg.inv(rows @ rows.transpose(1, 2)))
        lo, y = uniform((kt - m) @ cols[None, :, None], torch.tensor(c.widths[:c.coded]).float())
        off = m[:, :, :, 0] + lo @ rows[None]
        if self.offset8:
            sc = off.abs().amax(-1, keepdim=True) / 127
            off = (off / sc).round().clamp(-127, 127) * sc.half().float()
        else:
            off = off.half().float()
        return off, y, rows, t

    def decode(self, p):
        off, y, rows, t = p
        k = off[:, :, :, None] + y @ rows[None, :, None]
        return turn(k.reshape(k.shape[0], k.shape[1], t, -1), self.c.derope, self.c.group, 1)


class Drop:
    """The whole basis held; 0-bit axes hold nothing (keep_mean: their block means, as the cache holds them)."""

    def __init__(self, inverse, widths, derope, keep_mean):
        self.inv, self.w, self.derope, self.keep = inverse.float(), torch.tensor(widths).float(), derope, keep_mean

    def encode(self, x, block):
        b, h, t, d = x.shape
        y = (turn(x.float(), self.derope, BLOCK, -1) @ torch.linalg.inv(self.inv)[None]).reshape(b, h, -1, BLOCK, d)
        lo, q = uniform(y, self.w)
        fill = y.mean(3, keepdim=True).half().float().expand_as(y) if self.keep else torch.zeros_like(y)
        return torch.where(self.w > 0, lo[:, :, :, None] + q, fill).reshape(b, h, t, d)

    def decode(self, y):
        return turn(y @ self.inv[None], self.derope, BLOCK, 1)


def low_rows(codec, bits):
    """The codec with its 0-bit axes' rows at `bits` (symmetric, a float16 scale a row); it encodes through them."""
    inv = codec.inverse().clone()
    q = 2 ** (bits - 1) - 1
    u = inv[:, codec.coded:]
    sc = u.abs().amax(-1, keepdim=True).clamp_min(1e-12) / q
    inv[:, codec.coded:] = (u / sc).round().clamp(-q, q) * sc.half().float()
    codec.inverse = lambda device=None: inv.to(device or "cpu")
    return codec


def share_of_bytes(model, tok):
    prepare(model, "auto-8x", tok)
    cache = from_method("auto-8x", model)
    ids = load_corpus_ids(tok, None, 2048)[None, :2048]
    with torch.no_grad():
        for s in range(0, 2048, 64):
            model(ids[:, s:s + 64], past_key_values=cache, use_cache=True)
    maps = sum(t.numel() * t.element_size() for layer in cache.layers for s in layer.stores()
               for t in s.codec.shared_tensors() if isinstance(s.codec, JointKeys))
    print(f"auto-8x at 2,048 tokens: {cache.nbytes()} bytes, ratio {cache.compression_ratio():.3f}; joint maps "
          f"{maps} bytes ({100 * maps / cache.nbytes():.1f}%), "
          f"{maps / 2048 / len(cache.layers):.2f} bytes a token and layer")


def proxies(model, tok):
    names = ["auto-6x", "auto-8x"]
    for name in names:
        prepare(model, name, tok)
    _, path = budget_cache.calibration_for(model, BLOCK)
    jc = budget_cache.joint_for(model, BLOCK, path)[0]
    h, d = jc.inverse.shape[1:3]
    coded = (jc.widths > 0).sum(-1).numpy()
    base_items, base_bytes = joint.items, jc.bytes.clone()

    def run(tag, held=None, less=0.0):
        def items(c, i, *a, **k):  # the choices' map bytes: held(coded axes) a head where the layer's map was
            p, b = base_items(c, i, *a, **k)
            return p, b - c.fixed_bytes(i) + h * held(coded[i])
        joint.items = base_items if held is None else items
        jc.bytes = base_bytes - less
        memo = budget_cache._CALIBS[model]
        for key in [k for k in memo if isinstance(k, tuple) and k[0] == "allocation"]:
            del memo[key]
        for name in names:
            a = budget_cache.allocation_for(get_method(name).config, model, name).allocation
            print(f"{tag:14} {name}: proxy {a.proxy:.4f}, ratio {a.ratio:.3f}", flush=True)

    run("as stored")
    run("rows", lambda c: c * (d + 2))
    run("rows+off8", lambda c: c * (d + 2), 1.5)
    run("rows+cols", lambda c: np.minimum(2 * c * (d + 2), d * (d + 2)))
    run("rows+cols+off8", lambda c: np.minimum(2 * c * (d + 2), d * (d + 2)), 1.5)
    run("low4", lambda c: c * (d + 2) + (d - c) * (d // 2 + 2))
    run("low3", lambda c: c * (d + 2) + (d - c) * (3 * d // 8 + 2))
    joint.items, jc.bytes = base_items, base_bytes


def second_moment_basis(model, ids, spec, context):
    """The joint calibration's bases with the turned keys' second moment in place of their covariance within blocks."""
    L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
    n = (ids.shape[1] - SINK) // BLOCK * BLOCK
    sums = {i: (torch.zeros(H, D, D, dtype=torch.float64), torch.zeros(H, D, D, dtype=torch.float64)) for i in range(L)}
    for layers in collect(model, ids, SINK, offsets=spread_offsets(len(ids), ids.shape[1], spec.max_context)):
        for i, (q, k, _, _, _) in layers.items():
            kt = turn(k[:, :n].float(), spec.rope, BLOCK, -1).double().reshape(H, -1, D)
            qq = q.double().reshape(H, -1, D)
            sums[i][0].add_(qq.transpose(1, 2) @ qq / qq.shape[1] / len(ids))
            sums[i][1].add_(kt.transpose(1, 2) @ kt / kt.shape[1] / len(ids))
    return joint.bases(sums, spec, BLOCK, context)


def kls(model, tok, layers):
    prepare(model, "auto-8x", tok)
    spec = spec_from_config(model.config)
    _, path = budget_cache.calibration_for(model, BLOCK)
    jc = budget_cache.joint_for(model, BLOCK, path)[0]
    ids, _ = calibration_ids(tok, None, *allocate.calibration_shape(spec))
    B2, W2 = second_moment_basis(model, ids, spec, jc.header["context"])
    inv2 = torch.linalg.inv(B2).float()
    perturbed = Perturbed(model, ids[:1], recent=RECENT)
    labels = ["stored", "cols", "cols+off8", "euclid", "drop", "drop 2nd", "2nd+means", "low4", "low3", "low2"]
    sums = np.zeros((len(NAMES), len(labels)))
    for i in layers:
        for n, (bits, floor) in enumerate(NAMES):
            j = joint.CHOICES.index((bits, floor))
            codec = jc.codec(i, j, BLOCK, spec.rope)
            w2 = joint.spend(W2[i].mean(0), bits * spec.head_dim, floor)
            trips = [Offset(codec, "cols"), Offset(codec, "cols", True), Offset(codec, "euclid"),
                     Drop(jc.inverse[i], codec.widths, spec.rope, False), Drop(inv2[i], w2, spec.rope, False),
                     Drop(inv2[i], w2, spec.rope, True)]
            trips += [low_rows(JointKeys(jc.inverse[i], codec.widths, BLOCK, spec.rope, bits), b) for b in (4, 3, 2)]
            row = [float(jc.proxy[i, j])] + [max(perturbed.kl(i, "key", body_round_trip(t, SINK, BLOCK)), 0.0)
                                             for t in trips]
            sums[n] += row
            print(i, f"J{bits:g}", " ".join(f"{x:.4f}" for x in row), flush=True)
    print("summed over layers", list(layers))
    print("choice  " + "  ".join(f"{lab:>9}" for lab in labels))
    for (bits, _), row in zip(NAMES, sums):
        print(f"J{bits:<6g} " + "  ".join(f"{x:9.4f}" for x in row))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["bytes", "proxy", "kl"])
    ap.add_argument("--layers", default=None, help="comma-separated layers for `kl` (default: all)")
    args = ap.parse_args()
    model, tok = load_model(None)
    if args.part == "bytes":
        share_of_bytes(model, tok)
    elif args.part == "proxy":
        proxies(model, tok)
    else:
        layers = ([int(x) for x in args.layers.split(",")] if args.layers
                  else range(spec_from_config(model.config).num_layers))
        kls(model, tok, layers)


if __name__ == "__main__":
    main()
