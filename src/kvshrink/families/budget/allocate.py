"""Calibration and allocation of one bit budget over a whole cache.

Calibration (once per model, corpus range and block): on calibration tokens, each layer's keys and
values and the loss gradient with respect to them (core/sensitivity.py); then, for every layer,
for keys and for values, and for every choice of the menu (bits 1..8, Hadamard rotation or not,
key groups of the block or 64 tokens, keys turned back within groups (codecs/spin.py) or not, value
groups of the whole head or 32 channels, uniform or Gaussian value levels, the Gaussian ones with
one 8-bit scale a group), the choice's real bytes per token (the codec's own packed tensors) and a loss proxy
in one unit, the KL divergence per token of the model's predictions from the unchanged model's:
- measured for the widths where errors are large (1 to 3 bits; `MEASURED`): the layer's keys or
  values replaced by their round trip through the codec (for every query but the `RECENT` positions
  before it, config.py), one forward pass each (core/sensitivity.py's `Perturbed`);
- extrapolated for the rest from a first-order estimate, 1/2 sum over tokens and heads of
  (grad . (decode(encode(x)) - x))^2 (a diagonal empirical-Fisher estimate, as KVQuant's
  sensitivity weights and ZDC's ranks use), scaled per layer and K/V to the measured KL at 3 bits
  of the same rotation and turn (`_anchor`).
Measured first because the first-order estimate alone misleads where it matters most: on the
bundled model it rated 1-bit values in layer 0 among the cheapest choices, while they raise the
loss by 1.15 nats per token (an allocation built on it lost +653% perplexity at 7x).

Keys also have joint-basis choices (joint.py: a calibrated basis per KV head, bits per axis), calibrated in a
file beside this one and offered beside the menu's (their bytes include the basis the codec holds).

Allocation: one choice per (layer, K/V) minimizing the summed proxy under a byte budget, a
multiple-choice knapsack solved by dynamic programming over the budget cut into `CELLS` units
(item sizes rounded up, so the budget holds; `allocate`). The bytes are those the cache holds at
`context` tokens after a prefill: float16 sink tokens, whole coded blocks, and the partial block's
keys waiting at the stage codec's width (core/layer.py's `stage_codec`), its values coded.
Uniform widths are one feasible point of the same problem, so the allocation is never worse than
them on the proxy (tests/test_budget.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ...codecs.levels import GAUSS, UNIFORM
from ...codecs.quant import IntQuant
from ...core.calibfile import (
    calibration_dir,
    calibration_ids,
    check_header,
    load_tensors,
    model_fingerprint,
    model_header,
    save_tensors,
)
from ...core.layer import stage_codec
from ...core.sensitivity import Perturbed, body_round_trip, collect
from ...errors import KvshrinkError
from ...spec import spec_from_config
from . import coded, heads, joint, vector
from .config import CONTEXT, RECENT

FORMAT = "kvshrink-budget-9"  # 6: stage bytes no longer stored; 7: RECENT 32 (measured, not shipped); 8: RECENT 16;
# 9: Gaussian values scaled by their root mean square in one byte, no mean
BITS = (1, 2, 3, 4, 5, 6, 8)
U, G = UNIFORM, GAUSS
# a choice: (bits, rotate, group, levels), and for keys whether each token is turned back by its
# offset's RoPE angles within its group (codecs/spin.py). Keys per channel over `group` tokens (None:
# the block), values per token over `group` channels (None: the whole head); levels uniform or the
# Gaussian's Lloyd-Max levels (codecs/levels.py), which pay at low widths only. Keys take uniform
# levels only: Gaussian key levels looked cheaper layer by layer but cost more together (+12.3% against
# +7.2% at 6x on the bundled model, docs/budget.md), as they clip the large keys that attention picks out.
# Groups of 64 only turned: turning halves the key error at 2 and 3 bits (codecs/spin.py), and each
# measured choice costs a forward pass per layer.
KEY_MENU = (tuple((b, r, None, U, t) for b in BITS for r in (False, True) for t in (False, True))
            + tuple((b, r, 64, U, True) for b in (2, 3) for r in (False, True)))
# values at 3 bits or fewer rotated only, so that every such choice is measured (the first-order
# estimate favours rotated values at those widths on the bundled model)
VALUE_MENU = (tuple((b, r, g, U) for b in BITS for r in (False, True) for g in (None, 32) if b > 3 or r)
              + tuple((b, True, g, G) for b in (1, 2, 3) for g in (None, 32) if b < 3 or g is None))
MEASURED_KEYS = tuple(c for c in KEY_MENU if c[0] <= 3)  # KL measured, not extrapolated
MEASURED_VALUES = tuple(c for c in VALUE_MENU if c[0] <= 3)
JOINT = "joint"  # a key choice ("joint", bits, floor) from the joint key calibration (joint.py)
WINDOW_SEED = 4  # the window's rotation, apart from the keys' (1), values' (2) and stage's (3)
CELLS = 20000  # the knapsack's resolution: item sizes round up by at most budget / CELLS each


def key_codec(choice, block: int, rope: tuple = ()) -> IntQuant:
    """A key choice's codec; rope: the model's RoPE frequencies, which a turned choice needs."""
    bits, rotate, group, levels, turned = choice
    if turned and not rope:
        raise KvshrinkError("a turned key choice needs the model's RoPE frequencies (this model has none)")
    return IntQuant(bits, "channel", group or block, rotate=rotate, seed=coded.KEY_SEED, levels=levels,
                    derope=rope if turned else ())


def value_codec(choice) -> IntQuant:
    """Gaussian choices store one 8-bit scale a group, the root mean square (codecs/scales.py: a byte a group where
    float16 mean and deviation took 4, 8-bit ones 2). The mean's byte bought nothing: on the bundled model each layer's
    values measured the same KL within the calibration's noise without it, and the budget spends the byte (a ninth of
    a one-bit head vector's) elsewhere (docs/budget.md, "One scale byte for values")."""
    bits, rotate, group, levels = choice
    return IntQuant(bits, "token", group, rotate=rotate, seed=2, levels=levels,
                    scales="rms8" if levels == G else "fp16")


def window_codec(bits: int) -> IntQuant | None:
    """The recent window's per-token codes: rotated, over the whole head; None for float16 (16 bits)."""
    return None if bits == 16 else IntQuant(bits, "token", rotate=True, seed=WINDOW_SEED)


def stage_bytes(choice, block: int, spec) -> float:
    """Bytes of one key token (all KV heads) waiting in the stage under this key choice: per-token codes
    (core/layer.py's `stage_codec`), whose size does not depend on the states."""
    return _stage_bytes(tuple(choice), block, tuple(spec.rope), spec.num_kv_heads, spec.head_dim)


def codec_bytes(codec, heads: int, d: int) -> float:
    """Bytes of one token (all KV heads) under a per-token codec, whose size does not depend on the states."""
    return float(codec.nbytes(codec.encode(torch.zeros(1, heads, 1, d), 1)))


@functools.lru_cache(maxsize=256)
def _stage_bytes(choice: tuple, block: int, rope: tuple, heads: int, d: int) -> float:
    # every cache an allocation builds asks again (a server builds one per request): coded once
    return codec_bytes(stage_codec(key_codec(choice, block, rope)), heads, d)


def fits(choice, size: int) -> bool:
    """Whether a menu entry's group divides `size`: the head for values, the block for keys."""
    return choice[2] is None or size % choice[2] == 0


def describe_layer(choice) -> str:
    """A layer's choice, or its heads' (a list) joined by |."""
    return "|".join(describe_choice(c) for c in choice) if isinstance(choice, list) else describe_choice(choice)


def describe_choice(choice) -> str:
    if choice[0] == vector.VECTOR:  # ("vector", bits): vector value levels (vector.py)
        return f"{choice[1]}v"
    if choice[0] == JOINT:  # ("joint", bits, floor): joint-basis keys (joint.py)
        return f"J{choice[1]}{'f' + str(choice[2]) if choice[2] else ''}"
    bits, rotate, group, levels = choice[:4]
    turned = "t" if choice[4:] and choice[4] else ""
    return f"{bits}{turned}{'r' if rotate else ''}{'/' + str(group) if group else ''}{'g' if levels == G else ''}"


@dataclass(eq=False)
class BudgetCalibration:
    """proxy_k (L, len(KEY_MENU)), proxy_v (L, len(VALUE_MENU)): loss proxy of each choice per layer
    (inf where a choice does not fit the head); bytes_k, bytes_v: its bytes per coded token (all KV
    heads). A key token waiting in the stage takes `stage_bytes`, a function of the choice, not measured."""

    proxy_k: torch.Tensor
    proxy_v: torch.Tensor
    bytes_k: torch.Tensor
    bytes_v: torch.Tensor
    header: dict

    def check(self, model, block: int) -> None:
        check_header(self.header, model, "auto")
        if self.header.get("block") != block:
            raise KvshrinkError(f"budget calibration is for blocks of {self.header.get('block')} tokens, not {block}")

    def save(self, path: str) -> None:
        save_tensors(path, {k: getattr(self, k) for k in _TENSORS}, FORMAT, self.header)

    @classmethod
    def load(cls, path: str, model=None, block: int | None = None) -> "BudgetCalibration":
        tensors, header = load_tensors(path, FORMAT, _TENSORS, "a budget calibration")
        calib = cls(**tensors, header=header)
        if model is not None:
            calib.check(model, block if block is not None else header.get("block"))
        return calib


_TENSORS = ("proxy_k", "proxy_v", "bytes_k", "bytes_v")


def _proxy(x: torch.Tensor, g: torch.Tensor, codec: IntQuant, block: int) -> tuple[float, float]:
    """(loss proxy, bytes per token) of coding x (H, n, D), n a multiple of block, with codec."""
    h, n, d = x.shape
    packed = codec.encode(x[None], block)
    err = codec.decode(packed)[0] - x
    first = (g * err).sum(-1).double()  # (H, n): first-order loss change per token and head
    return 0.5 * float((first ** 2).sum()), codec.nbytes(packed) / n


def _anchor(menu, choice) -> int:
    """The measured 3-bit choice whose KL scales an unmeasured one's first-order proxy: the same rotation
    (and turn, for keys) over whole groups, else the rotated one."""
    same = (3, choice[1], None, U, *choice[4:])
    return menu.index(same if same in menu else (3, True, None, U, *choice[4:]))


def _measured(model, ids, sink: int, block: int, first_k, first_v, d: int, rope: tuple = (), progress=None):
    """The proxies in KL per token: measured for MEASURED_*, the first-order ones scaled to them for the rest."""
    perturbed = Perturbed(model, ids, recent=RECENT)
    out = []
    for first, menu, measured, which, make, size in (
            (first_k, KEY_MENU, MEASURED_KEYS, "key", lambda c: key_codec(c, block, rope), block),
            (first_v, VALUE_MENU, MEASURED_VALUES, "value", value_codec, d)):
        kl = first.clone()
        for i in range(first.shape[0]):
            for c in measured:
                if fits(c, size) and torch.isfinite(first[i, menu.index(c)]):
                    kl[i, menu.index(c)] = max(perturbed.kl(i, which, body_round_trip(make(c), sink, block)), 0.0)
                    if progress is not None:
                        progress()
            for j, c in enumerate(menu):
                if c not in measured and torch.isfinite(first[i, j]):
                    a = _anchor(menu, c)
                    kl[i, j] = first[i, j] * kl[i, a] / max(float(first[i, a]), 1e-30)
        out.append(kl)
    return out


def calibrate(model, ids: torch.Tensor, data: dict | None = None, sink: int = 4, block: int = 128,
              progress=None) -> BudgetCalibration:
    """Measure every menu choice on `ids` (sequences, length): each sequence's tokens after the sink,
    cut to whole blocks, as the cache codes them; the KL of the widths in MEASURED_* on the first
    sequence."""
    spec = spec_from_config(model.config)
    L = spec.num_layers
    t0 = time.time()
    keep = {i: [] for i in range(L)}
    n = (ids.shape[1] - sink) // block * block
    if n == 0:
        raise KvshrinkError(f"calibration sequences of {ids.shape[1]} tokens hold no block of {block} after the sink")
    for layers in collect(model, ids, sink):
        for i, (_, k, gk, v, gv) in layers.items():
            keep[i].append(tuple(t[:, :n].float() for t in (k, gk, v, gv)))
    pk = torch.full((L, len(KEY_MENU)), float("inf"), dtype=torch.float64)
    pv = torch.full((L, len(VALUE_MENU)), float("inf"), dtype=torch.float64)
    bk, bv = torch.zeros_like(pk), torch.zeros_like(pv)
    d = spec.head_dim
    for i in range(L):
        k, gk, v, gv = (torch.cat([p[j] for p in keep[i]], 1) for j in range(4))
        for j, c in enumerate(KEY_MENU):
            if fits(c, block) and (spec.rope or not c[4]):  # turned choices for RoPE models only
                pk[i, j], bk[i, j] = _proxy(k, gk, key_codec(c, block, spec.rope), block)
        for j, c in enumerate(VALUE_MENU):
            if fits(c, d):
                pv[i, j], bv[i, j] = _proxy(v, gv, value_codec(c), block)
    keep.clear()
    kl_k, kl_v = _measured(model, ids[:1], sink, block, pk, pv, d, spec.rope, progress)
    header = {**model_header(model), "data": data or {}, "sink_excluded": sink, "block": block,
              "key_menu": [list(c) for c in KEY_MENU], "value_menu": [list(c) for c in VALUE_MENU],
              "measured_keys": [list(c) for c in MEASURED_KEYS], "measured_values": [list(c) for c in MEASURED_VALUES],
              "proxy": "KL per token (measured, or first-order scaled to it)", "recent": RECENT,
              "tokens_per_layer": n * ids.shape[0], "seconds": round(time.time() - t0, 1)}
    return BudgetCalibration(kl_k, kl_v, bk, bv, header)


def allocate(costs: list, budget: float, cells: int = CELLS) -> tuple[list, float]:
    """Multiple-choice knapsack: for items of (proxy, bytes) arrays (one entry per choice), one choice
    each minimizing the summed proxy with summed bytes <= budget (sizes rounded up to budget / cells,
    so the result always fits; sizes in whole units with cells = budget are exact). Returns (choices, summed
    proxy); raises if nothing fits."""
    unit = budget / cells
    best = np.full(cells + 1, np.inf)
    best[0] = 0.0
    picks, sizes = [], []
    for proxy, nbytes in costs:
        size = np.ceil(np.asarray(nbytes, dtype=np.float64) / unit - 1e-9).astype(np.int64)
        nxt = np.full(cells + 1, np.inf)
        arg = np.full(cells + 1, -1, dtype=np.int64)
        for j, (p, s) in enumerate(zip(np.asarray(proxy, dtype=np.float64), size)):
            if not np.isfinite(p) or s > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[s:] = best[:cells + 1 - s] + p
            better = cand < nxt
            nxt[better], arg[better] = cand[better], j
        best = nxt
        picks.append(arg)
        sizes.append(size)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise KvshrinkError(f"no allocation fits a budget of {budget:.0f} bytes")
    total, choices = float(best[end]), []
    for arg, size in zip(reversed(picks), reversed(sizes)):
        j = int(arg[end])
        choices.append(j)
        end -= int(size[j])
    return choices[::-1], total


@dataclass
class Allocation:
    """One choice per layer for keys and for values, and what the allocator expects of it."""

    keys: list  # per layer a menu entry (bits, rotate, group, levels, turned), or a list of one per KV head
    values: list
    proxy: float
    ratio: float  # expected ratio against fp16 at `context` tokens after a prefill
    body: list = field(default_factory=list)  # per layer, the mean bytes of a coded token's keys and values

    def describe(self) -> str:
        ks = " ".join(describe_layer(c) for c in self.keys)
        vs = " ".join(describe_layer(c) for c in self.values)
        return (f"bits per layer for keys [{ks}] and values [{vs}] (t: RoPE turned back within groups, r: rotated, "
                f"/N: groups, g: Gaussian levels, one 8-bit scale; JN: joint-basis keys, N bits a channel, "
                f"f2: every axis coded; Nv: vector levels, N bits a value; a|b|c: one per KV head), "
                f"{self.ratio:.2f}x expected")


def held_tokens(spec, layer: int, context: int, sink: int, block: int, window: int = 0,
                share: float = 0.0) -> tuple[int, int, int, int]:
    """(sink, window, coded, staged): the tokens a layer holds after a prefill of `context`. A full layer: the
    float16 sink, the `window` most recent tokens, whole blocks between them, the partial block; with a high class
    (`share`, families/mixed), `high_count` of the tokens between them are not in the blocks. A sliding layer has
    no sink and frees whole blocks once they leave its window (core/layer.py), so it holds its window - 1 tokens
    and up to a block more: counting it as window - 1 tokens with a sink and a partial block put Gemma 3's
    `auto-4x` at 4.27x."""
    s = 0 if spec.is_sliding(layer) else min(sink, context)
    w = min(window, context - s)
    middle = context - s - w
    middle -= high_count(share, middle)
    coded = middle // block * block
    if spec.is_sliding(layer):
        extra = context - (spec.sliding_window - 1)  # freed in whole blocks, as StoreLayer._slide does
        if extra >= block:
            coded -= min(extra, coded) // block * block
    return s, w, coded, middle % block


def high_count(share: float, left: int) -> int:
    """Tokens per KV head in a high class after `left` tokens left the window (families/mixed's running quota)."""
    return round(share * left)


@dataclass(frozen=True)
class HighClass:
    """What a high class costs beside the body (families/mixed over the budget's codecs): `share` of the tokens
    that left an observation window, each in `codec`'s per-token codes for keys and values with a float32
    score per KV head, and with `places` an int32 place (families/mixed's crop=true: the demoted tokens' places,
    whose count depends on the text, are not priced); the window's tokens hold two float32 scores per KV head."""

    share: float
    codec: IntQuant
    places: bool = False

    def bytes(self, spec, window: int, left: int) -> float:
        heads = spec.num_kv_heads
        per_high = 2 * codec_bytes(self.codec, heads, spec.head_dim) + (8 if self.places else 4) * heads
        return high_count(self.share, left) * per_high + window * 8 * heads


def calibration_shape(spec) -> tuple[int, int]:
    """(sequences, length) of the calibration tokens. Where sliding and full layers mix (Gemma 2 and 3), sequences
    as long as the ratio's default context: within 512 tokens a full layer sees no more than a sliding one, so
    its keys' loss was understated and Gemma 3's `auto-6x` gave its last full layer 1-bit keys."""
    hybrid = spec.has_sliding and not all(spec.is_sliding(i) for i in range(spec.num_layers))
    return (2, CONTEXT) if hybrid else (4, 512)


def layer_bytes(calib: BudgetCalibration, spec, context: int, sink: int, block: int, joint_calib=None,
                window: int = 0, window_codec=None, coded=None, joint1: bool = False,
                vector_calib=None, high: HighClass | None = None) -> tuple[list, float]:
    """(items, fixed): per layer, keys then values, (proxy, bytes held at `context` tokens) arrays over
    the menu (the key menu followed by the joint key choices where `joint_calib` is given); fixed: the float16
    sink's and the window's bytes (float16, or `window_codec`'s per-token codes), and the code tables where the
    keys are entropy-coded (`coded`: coded.py's calibration, whose bytes per token the joint keys' and the coded menu
    keys' blocks then take); joint1: whether the joint choice of one bit a channel is offered (joint.ONE_BIT).
    vector_calib: vector.py's calibration, whose value choices then follow the menu's (its codebooks counted as fixed).
    A layer holds what `held_tokens` says: the sink and window, whole coded blocks, and a partial block whose keys
    wait at the stage codec's width. high: a high class (HighClass), its tokens out of the blocks and its bytes and
    the window's scores counted as fixed."""
    row = 2 * spec.num_kv_heads * spec.head_dim * 2  # fp16 bytes of one token's keys and values in a layer
    staging = np.array([stage_bytes(c, block, spec) for c in KEY_MENU])
    recent = row if window_codec is None else 2 * codec_bytes(window_codec, spec.num_kv_heads, spec.head_dim)
    items, fixed = [], 0.0 if coded is None else float(coded.table_bytes())
    if vector_calib is not None:
        fixed += vector.book_bytes(vector_calib)
    for i in range(spec.num_layers):
        share = 0.0 if high is None else high.share
        s, w, held, staged = held_tokens(spec, i, context, sink, block, window, share)
        fixed += s * row + w * recent
        if high is not None:
            fixed += high.bytes(spec, w, context - s - w)
        per_token = calib.bytes_k[i].numpy()
        if coded is not None:  # the coded menu keys' streams (coded.py)
            streams = coded.menu_bytes(i)
            per_token = np.array([streams.get(tuple(c), b) for c, b in zip(KEY_MENU, per_token)])
        keys = (calib.proxy_k[i].numpy(), held * per_token + staged * staging)
        if joint_calib is not None:
            jp, jb = joint.items(joint_calib, i, held, staged,
                                 lambda bits: stage_bytes((bits, True, None, U, True), block, spec),
                                 None if coded is None else coded.bytes[i], joint1)
            keys = (np.concatenate([keys[0], jp]), np.concatenate([keys[1], jb]))
        items.append(keys)
        values = (calib.proxy_v[i].numpy(), (held + staged) * calib.bytes_v[i].numpy())
        if vector_calib is not None:
            vp, vb = vector.items(vector_calib, i, held + staged)
            values = (np.concatenate([values[0], vp]), np.concatenate([values[1], vb]))
        items.append(values)
    return items, fixed


def choose(calib: BudgetCalibration, spec, ratio: float, context: int, sink: int, block: int,
           joint_calib=None, window: int = 0, window_codec=None, coded=None, joint1: bool = False,
           vector_calib=None, high: HighClass | None = None, head_calib=None, head_layers: int = 0) -> Allocation:
    """The allocation meeting `ratio` x fp16 at `context` tokens (`layer_bytes`), with the joint key choices
    beside the menu's where `joint_calib` (joint.py's calibration) is given, entropy-coded where `coded` is, the
    vector value choices beside the menu's where `vector_calib` (vector.py's) is, a high class paid for from the
    same bytes where `high` is, and one choice per KV head in the `head_layers` layers whose loss `head_calib`
    (heads.py's shares) finds most concentrated in one head."""
    items, fixed = layer_bytes(calib, spec, context, sink, block, joint_calib, window, window_codec, coded, joint1,
                               vector_calib, high)
    apart = set(heads.most_concentrated(head_calib, head_layers)) if head_calib is not None else set()
    per = [spec.num_kv_heads if i in apart else 1 for i in range(spec.num_layers)]  # items per layer and kind
    if apart:
        items = [x for j, item in enumerate(items)
                 for x in (heads.split_one(item, head_calib, j // 2, "key" if j % 2 == 0 else "value")
                           if j // 2 in apart else [item])]
    full = spec.fp16_bytes(context)
    budget = full / ratio - fixed
    if budget <= 0:
        raise KvshrinkError(f"a ratio of {ratio:g}x cannot be met at {context} tokens: the float16 sink and window"
                            f"{'' if high is None else ' and the high class'} alone take more")
    least = fixed + sum(float(nbytes[np.isfinite(proxy)].min()) for proxy, nbytes in items)
    if least > budget + fixed:
        raise KvshrinkError(f"a ratio of {ratio:g}x does not fit this model at {context} tokens: its smallest codes "
                            f"(1 bit, with their scales and the float16 sink) reach {full / least:.2f}x")
    picks, proxy = allocate(items, budget)
    held = fixed + sum(float(nbytes[j]) for (_, nbytes), j in zip(items, picks))
    share = 0.0 if high is None else high.share
    tokens = [sum(held_tokens(spec, i, context, sink, block, window, share)[2:]) for i in range(spec.num_layers)]
    starts = np.cumsum([0] + [2 * n for n in per])  # a layer's items: keys then values, each per head where apart
    body = [sum(float(items[j][1][picks[j]]) for j in range(starts[i], starts[i + 1])) / max(n, 1)
            for i, n in enumerate(tokens)]
    keys, values = [], []
    for i in range(spec.num_layers):
        at, n = int(starts[i]), per[i]
        ks = [_key_choice(j) for j in picks[at:at + n]]
        vs = [_value_choice(j) for j in picks[at + n:at + 2 * n]]
        same = len(set(zip(ks, vs))) == 1  # a layer whose heads all took one pair is held as one
        keys.append(ks[0] if same else ks)
        values.append(vs[0] if same else vs)
    return Allocation(keys, values, proxy, full / held, body)


def _key_choice(j: int):
    return KEY_MENU[j] if j < len(KEY_MENU) else (JOINT, *joint.CHOICES[j - len(KEY_MENU)])


def _value_choice(j: int):
    return VALUE_MENU[j] if j < len(VALUE_MENU) else (vector.VECTOR, vector.CHOICES[j - len(VALUE_MENU)])


def uniform(calib: BudgetCalibration, key_choice, value_choice) -> float:
    """The summed proxy of one choice for every layer (what the allocator must not do worse than)."""
    return float(calib.proxy_k[:, KEY_MENU.index(key_choice)].sum()
                 + calib.proxy_v[:, VALUE_MENU.index(value_choice)].sum())


def data_tag(data: dict) -> str:
    """8 hex digits naming a calibration's corpus range (its digest, tokens and shape) in file names."""
    key = json.dumps([data.get("corpus_sha256"), data.get("tokens"), data.get("sequences"), data.get("length")])
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def default_path(model, data: dict, block: int) -> str:
    """Keyed by the model's weights, the calibration corpus (its digest) and token range, the block and
    the file format (a file of an older menu is measured again, not refused)."""
    return os.path.join(calibration_dir(), f"auto-{model_fingerprint(model)}-{data_tag(data)}-b{block}-v{FORMAT.rsplit('-', 1)[1]}.safetensors")


def load_or_calibrate(model, tokenizer, corpus: str | None = None, sink: int = 4, block: int = 128,
                      log=print) -> tuple[BudgetCalibration, str]:
    """(calibration, path): the one for this model, corpus range and block, measured first if missing."""
    ids, desc = calibration_ids(tokenizer, corpus, *calibration_shape(spec_from_config(model.config)))
    path = default_path(model, desc, block)
    if os.path.isfile(path):
        return BudgetCalibration.load(path, model, block), path
    log(f"auto: no budget calibration for this model, corpus range and block at {path}; measuring it "
        "(about 15 minutes on 2 cores for the bundled 135M model)")
    calib = measure(model, ids, desc, sink, block)
    calib.save(path)
    return calib, path


def _load_or_measure(model, tokenizer, corpus, path: str, load, measure, what: str, log):
    """(calibration, path): the file at `path` (`load(path)`), else `measure(ids, desc)` on the budget calibration's
    corpus range, saved there first."""
    if os.path.isfile(path):
        return load(path), path
    ids, desc = calibration_ids(tokenizer, corpus, *calibration_shape(spec_from_config(model.config)))
    log(f"auto: no {what} at {path}; measuring it")
    calib = measure(ids, desc)
    calib.save(path)
    return calib, path


def load_or_calibrate_joint(model, tokenizer, budget_path: str, corpus: str | None = None, sink: int = 4,
                            block: int = 128, log=print):
    """The joint key calibration beside the budget calibration at `budget_path`, measured first if missing
    (on the same corpus range: about 3 minutes on 2 cores for the bundled model)."""
    return _load_or_measure(model, tokenizer, corpus, joint.path_beside(budget_path),
                            lambda p: joint.JointCalibration.load(p, model, block),
                            lambda ids, desc: measure_joint(model, ids, desc, sink, block), "joint key calibration",
                            log)


def load_or_calibrate_coded(model, tokenizer, found, corpus: str | None = None, sink: int = 4, block: int = 128,
                            log=print):
    """The key code tables beside the joint key calibration `found` (calibration, path), fitted first if missing
    (on the same corpus range: about half a minute on 2 cores for the bundled model)."""
    return _load_or_measure(model, tokenizer, corpus, coded.path_beside(found[1]),
                            lambda p: coded.CodedCalibration.load(p, model, block, found[0]),
                            lambda ids, desc: coded.calibrate(model, ids, found[0], desc, sink, block, KEY_MENU),
                            "key code tables", log)


def load_or_calibrate_vector(model, tokenizer, budget_path: str, corpus: str | None = None, sink: int = 4,
                             block: int = 128, log=print):
    """The vector value calibration beside the budget calibration at `budget_path`, measured first if missing (on
    the same corpus range: about a minute on 2 cores for the bundled model)."""
    return _load_or_measure(model, tokenizer, corpus, vector.path_beside(budget_path),
                            lambda p: vector.VectorCalibration.load(p, model, block),
                            lambda ids, desc: measure_vector(model, ids, desc, sink, block),
                            "vector value calibration", log)


def load_or_calibrate_heads(model, tokenizer, budget_path: str, corpus: str | None = None, sink: int = 4,
                            block: int = 128, log=print):
    """The head share calibration beside the budget calibration at `budget_path`, measured first if missing (on the
    same tokens read as one sequence: about 10 minutes on 2 cores for the bundled model)."""
    return _load_or_measure(model, tokenizer, corpus, heads.path_beside(budget_path),
                            lambda p: heads.HeadCalibration.load(p, model, block),
                            lambda ids, desc: measure_heads(model, ids, desc, sink, block), "head share calibration",
                            log)


def measure_heads(model, ids: torch.Tensor, data: dict, sink: int = 4, block: int = 128):
    """heads.calibrate with the reference choices' codecs and a progress bar over its forward passes."""
    spec = spec_from_config(model.config)
    total = 2 * spec.num_layers * spec.num_kv_heads
    return with_progress("head share calibration", total, lambda advance: heads.calibrate(
        model, ids, key_codec(heads.KEY_REF, block, spec.rope), value_codec(heads.VALUE_REF), data, sink, block,
        progress=advance))


def with_progress(label: str, total: int, run):
    """run(advance) under a progress bar of `total` forward passes."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("", total=total)
        return run(lambda: bar.advance(task))


def measure_vector(model, ids: torch.Tensor, data: dict, sink: int = 4, block: int = 128):
    """vector.calibrate with a progress bar over its forward passes."""
    total = spec_from_config(model.config).num_layers * len(vector.CHOICES)
    return with_progress("vector value calibration", total,
                          lambda advance: vector.calibrate(model, ids, data, sink, block, progress=advance))


def measure_joint(model, ids: torch.Tensor, data: dict, sink: int = 4, block: int = 128):
    """joint.calibrate with a progress bar over its forward passes."""
    total = spec_from_config(model.config).num_layers * len(joint.CHOICES)
    return with_progress("joint key calibration", total,
                          lambda advance: joint.calibrate(model, ids, data, sink, block, progress=advance))


def measure(model, ids: torch.Tensor, data: dict, sink: int = 4, block: int = 128) -> BudgetCalibration:
    """`calibrate` with a progress bar over its forward passes."""
    spec = spec_from_config(model.config)
    per_layer = (sum(fits(c, block) and (bool(spec.rope) or not c[4]) for c in MEASURED_KEYS)
                 + sum(fits(c, spec.head_dim) for c in MEASURED_VALUES))
    return with_progress("auto calibration", spec.num_layers * per_layer,
                          lambda advance: calibrate(model, ids, data, sink, block, advance))
