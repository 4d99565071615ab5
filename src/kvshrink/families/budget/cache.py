"""The budget family's cache: a CompressedCache (families/quant) whose layers each get the key and
value codecs the allocation chose, read in place by the same compiled kernel (any width per layer).

The calibration is measured once per model, calibration corpus range and block (allocate.py) and
kept by model in memory after `prepare`, so `from_method` needs no tokenizer.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

from ...attention.function import require_kvshrink_attention, use_kvshrink_attention, uses_kvshrink_attention
from ...codecs import huffman
from ...codecs.jointcoded import CodedJointKeys
from ...errors import KvshrinkError
from ...spec import spec_from_config
from ..quant.cache import CompressedCache
from . import allocate, coded, heads, joint, vector
from .config import BudgetConfig

_CALIBS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {block: (calibration, path), ...}


class BudgetCache(CompressedCache):
    """A CompressedCache with one (key codec, value codec) per layer, chosen under one budget."""

    def __init__(self, config, allocation: allocate.Allocation, calibration: str, block: int, data: dict | None = None,
                 found=None, tables=None, vectors=None, shares=None, **kwargs):
        """found: (joint key calibration, its path), or None where joint keys were not on offer; tables: (code
        tables, their path) where the keys are entropy-coded (coded.py: joint keys and turned 2- and 3-bit menu
        keys), else None; vectors: (vector value calibration, its path) where vector levels were on offer; shares:
        (head share calibration, its path) where the allocation was made per KV head (heads.py)."""
        pairs = layer_codecs(allocation, block, spec_from_config(config).rope, found, tables, vectors)
        super().__init__(config, layer_codecs=pairs, block=block, **kwargs)
        self.allocation, self.calibration, self.data = allocation, calibration, data or {}
        self.joint_path = found[1] if found is not None else None
        self.tables_path = tables[1] if tables is not None else None
        self.vector_path = vectors[1] if vectors is not None else None
        self.shares_path = shares[1] if shares is not None else None

    def coding_stats(self) -> dict:
        """Entropy-coded keys (entropy=true): bits a symbol of their codes against the Shannon entropy of the same
        symbols (each width's histogram over the cache: the limit of one order-0 code per width, as the tables
        are), over every layer's coded classes; {} where nothing is coded. The bench's coding table."""
        counts: dict = {}
        for layer in self.layer_parts():
            codec = layer.k.codec
            if not isinstance(codec, CodedJointKeys) or not layer.is_initialized:
                continue
            for part in layer.k.body_parts():
                for w, (c, bits) in codec.coded_counts(part).items():
                    have = counts.get(w, (0, 0))
                    counts[w] = (have[0] + c, have[1] + bits)
        n = sum(int(c.sum()) for c, _ in counts.values())
        if not n:
            return {}
        bits = sum(b for _, b in counts.values())
        ent = sum(huffman.entropy_bits(c) for c, _ in counts.values())
        return {"keys": {"bits_per_symbol": bits / n, "entropy_bits_per_symbol": ent / n, "symbols": n,
                         "tables": len(counts)}}

    def _describe(self) -> str:
        where = (f" ({self.data['corpus']} tokens {self.data['tokens'][0]}..{self.data['tokens'][1]})"
                 if "tokens" in self.data else "")
        keys = f"; joint keys {self.joint_path}" if self.joint_path else "; menu keys only (joint=false, or no joint calibration)"
        if self.tables_path:
            keys += f", and turned 2- and 3-bit menu keys, Huffman-coded ({self.tables_path})"
        if self.vector_path:
            keys += f"; vector value levels {self.vector_path}"
        if self.shares_path:
            keys += f"; allocated per KV head by the shares in {self.shares_path}"
        return (f"{self.allocation.describe()}, sink {self.sink}, "
                f"{f'window {self.window}{self._window_code()}, ' if self.window else ''}block {self.block}, "
                f"{self._how_it_attends()}; "
                f"calibration {self.calibration}{where}{keys}")


def layer_codecs(allocation: allocate.Allocation, block: int, rope: tuple, found=None, tables=None,
                 vectors=None) -> list:
    """Per layer, the (key codec, value codec) of the allocation's choices (calibrations beside it as BudgetCache);
    where its KV heads took different choices, (first, stop, key codec, value codec) per run of heads alike."""
    out = []
    for i, (k, v) in enumerate(zip(allocation.keys, allocation.values)):
        if isinstance(k, list):
            out.append([(a, b, _key_codec(kc, i, block, rope, found, tables).heads(a, b),
                         _value_codec(vc, vectors).heads(a, b)) for a, b, kc, vc in heads.groups(k, v)])
        else:
            out.append((_key_codec(k, i, block, rope, found, tables), _value_codec(v, vectors)))
    return out


def _key_codec(choice, layer: int, block: int, rope: tuple, found, tables=None):
    if choice[0] == allocate.JOINT:
        j = joint.CHOICES.index(tuple(choice[1:]))
        if tables is not None:
            return tables[0].codec(found[0], layer, j, block, rope)
        return found[0].codec(layer, j, block, rope)
    if tables is not None and tuple(choice) in tables[0].menu_bytes(layer):  # a coded menu choice
        return tables[0].menu_codec(choice, block, rope)
    return allocate.key_codec(choice, block, rope)


def _value_codec(choice, vectors):
    if choice[0] == vector.VECTOR:
        return vectors[0].codec(choice[1])
    return allocate.value_codec(choice)


def calibration_for(model, block: int, tokenizer=None, corpus=None):
    """(calibration, path) for this model and block: memo, else the file at $KVSHRINK_AUTO_CALIBRATION
    (checked against the model and block), else the file for the corpus range, else measured."""
    memo = _CALIBS.setdefault(model, {})
    env = os.environ.get("KVSHRINK_AUTO_CALIBRATION")
    if env:
        if memo.get(block, (None, None))[1] != env:
            memo[block] = allocate.BudgetCalibration.load(env, model, block), env
    elif block not in memo:
        if tokenizer is None:
            raise KvshrinkError("auto methods need a budget calibration: run kvshrink.prepare(model, 'auto-6x', "
                                "tokenizer) first (or `kvshrink calibrate --method auto`)")
        memo[block] = allocate.load_or_calibrate(model, tokenizer, corpus, block=block)
    return memo[block]


def joint_for(model, block: int, path: str, tokenizer=None, corpus=None):
    """(joint key calibration, its path) beside the budget calibration at `path` (joint.py): memo, else the file,
    else measured where a tokenizer is given and the budget calibration is not a $KVSHRINK_AUTO_CALIBRATION file
    (whose corpus range is not known here); else a clear error."""
    def rope():
        if not spec_from_config(model.config).rope:
            raise KvshrinkError("joint-basis keys need a RoPE model (keys are turned back within their blocks)")

    side = joint.path_beside(path)
    return _beside(model, ("joint", block), side, rope, lambda p: joint.JointCalibration.load(p, model, block),
                   lambda: allocate.load_or_calibrate_joint(model, tokenizer, path, corpus, block=block), tokenizer,
                   f"joint=true needs a joint key calibration at {side}: run kvshrink.prepare(model, "
                   "'auto-6x:joint=true', tokenizer) first (or `kvshrink calibrate --method auto`)")


def tables_for(model, block: int, found, tokenizer=None, corpus=None):
    """(key code tables, their path) beside the joint key calibration `found` (coded.py), as joint_for finds the
    joint calibration (fitted in about 20 s on the bundled model)."""
    side = coded.path_beside(found[1])
    return _beside(model, ("coded", block), side, lambda: None,
                   lambda p: coded.CodedCalibration.load(p, model, block, found[0]),
                   lambda: allocate.load_or_calibrate_coded(model, tokenizer, found, corpus, block=block), tokenizer,
                   f"entropy=true needs key code tables at {side}: run kvshrink.prepare(model, "
                   "'auto-6x:entropy=true', tokenizer) first (or `kvshrink calibrate --method auto`)")


def vector_for(model, block: int, path: str, tokenizer=None, corpus=None):
    """(vector value calibration, its path) beside the budget calibration at `path` (vector.py), as joint_for finds
    the joint calibration (about a minute on the bundled model)."""
    side = vector.path_beside(path)
    return _beside(model, ("vector", block), side, lambda: None,
                   lambda p: vector.VectorCalibration.load(p, model, block),
                   lambda: allocate.load_or_calibrate_vector(model, tokenizer, path, corpus, block=block), tokenizer,
                   f"vector=true needs a vector value calibration at {side}: run kvshrink.prepare(model, "
                   "'auto-6x:vector=true', tokenizer) first (or `kvshrink calibrate --method auto`)")


def heads_for(model, block: int, path: str, tokenizer=None, corpus=None):
    """(head share calibration, its path) beside the budget calibration at `path` (heads.py), as joint_for finds the
    joint calibration (about 10 minutes on the bundled model)."""
    side = heads.path_beside(path)
    return _beside(model, ("heads", block), side, lambda: None, lambda p: heads.HeadCalibration.load(p, model, block),
                   lambda: allocate.load_or_calibrate_heads(model, tokenizer, path, corpus, block=block), tokenizer,
                   f"heads=N needs a head share calibration at {side}: run kvshrink.prepare(model, "
                   "'auto-6x:heads=8', tokenizer) first (or `kvshrink calibrate --method auto`)")


def _beside(model, key: tuple, side: str, check, load, measure, tokenizer, missing: str):
    """A calibration kept beside the budget calibration: memo, else (after `check()`) the file at `side`, else measured
    where a tokenizer is given and the budget calibration is not a $KVSHRINK_AUTO_CALIBRATION file (whose corpus range
    is not known here); else the error `missing`."""
    memo = _CALIBS.setdefault(model, {})
    if memo.get(key, (None, None))[1] != side:
        check()
        if os.path.isfile(side):
            memo[key] = load(side), side
        elif tokenizer is not None and not os.environ.get("KVSHRINK_AUTO_CALIBRATION"):
            memo[key] = measure()
        else:
            raise KvshrinkError(missing)
    return memo[key]


def prepare(config: BudgetConfig, model, tokenizer=None, corpus=None):
    """The budget calibration loaded or measured (about 15 minutes on the bundled model the first time), and the
    model switched to the "kvshrink" attention in place (decode steps read the codes)."""
    _, path = calibration_for(model, config.block, tokenizer, corpus)
    if config.joint:
        found = joint_for(model, config.block, path, tokenizer, corpus)
        if config.entropy:
            tables_for(model, config.block, found, tokenizer, corpus)
    if config.vector:
        vector_for(model, config.block, path, tokenizer, corpus)
    if config.heads:
        heads_for(model, config.block, path, tokenizer, corpus)
    if config.attend != "decode":
        use_kvshrink_attention(model)
    return model


@dataclass
class Chosen:
    """An allocation with what its cache needs: the calibration's path and corpus range, and the calibrations
    beside it that its choices read (None where not on offer), and the window's codec."""

    allocation: allocate.Allocation
    path: str
    data: dict | None
    found: tuple | None
    tables: tuple | None
    vectors: tuple | None
    recent: object
    shares: tuple | None = None


def allocation_for(config: BudgetConfig, model, method: str, high: allocate.HighClass | None = None) -> Chosen:
    """The allocation of `config` for this model (its calibrations prepared), with a high class paid for from the same
    bytes where `high` is (families/mixed)."""
    if not hasattr(model, "set_attn_implementation"):
        raise KvshrinkError(f"{method} needs the model, not its config (its allocation is calibrated on the "
                            f"weights): kvshrink.from_method({method!r}, model)")
    calib, path = calibration_for(model, config.block)
    memo = _CALIBS.setdefault(model, {})
    if high is None and ("allocation", config, path) in memo:  # a server builds a cache per request
        return memo["allocation", config, path]
    spec = spec_from_config(model.config)
    found = joint_for(model, config.block, path) if config.joint else None
    tables = tables_for(model, config.block, found) if config.entropy else None
    vectors = vector_for(model, config.block, path) if config.vector else None
    shares = heads_for(model, config.block, path) if config.heads else None
    recent = allocate.window_codec(config.window_bits) if config.window else None
    chosen = allocate.choose(calib, spec, config.budget, config.context, config.sink, config.block,
                             found[0] if found else None, config.window, recent, tables[0] if tables else None,
                             config.joint1, vectors[0] if vectors else None, high, shares[0] if shares else None,
                             config.heads)
    out = Chosen(chosen, path, calib.header.get("data"), found, tables, vectors, recent, shares)
    if high is None:
        memo["allocation", config, path] = out
    return out


def build(config: BudgetConfig, model, method: str) -> BudgetCache:
    c = allocation_for(config, model, method)
    attend = config.attend
    if attend == "auto":
        attend = "fused" if uses_kvshrink_attention(model.config) else "decode"
    elif attend == "fused":
        require_kvshrink_attention(model.config, method)
    return BudgetCache(model.config, c.allocation, c.path, config.block, c.data, c.found, c.tables, c.vectors,
                       c.shares, sink=config.sink, window=config.window, attend=attend, splits=config.splits,
                       method=method, window_codec=c.recent)
