"""Entropy-coded keys for the budget (`entropy=true`; codecs/jointcoded.py): code tables fitted once per joint key
calibration, in a file beside it (its path with `-coded2`), and the coded bytes of every (layer, key choice) that the
allocator then spends the budget on.

Coded key choices: every joint choice, and the menu's turned keys at a coded width over the whole block (`menu_coded`:
2 and 3 bits, rotated or not). A menu key turned back within its group and coded per channel is a joint key
whose basis is the menu's Hadamard rotation (or none) with one width for every axis (`menu_codec`): the same codes,
so the same KL as the menu's own codec (its squared error agrees to 5 digits; the int8 map rounds its basis by
under 0.01%), in streams. Its map is one per rotation, shared by every layer (counted once a cache).

On the joint calibration's own tokens and positions, every layer's keys go through every coded choice; the tuple
counts of each width's symbols, pooled over layers and choices, give one Huffman code per width (every tuple
given a code). Each (layer, choice)'s bytes per token are then its coded body's real bytes (streams in whole bytes,
their int32 offsets, the float16 min and step per axis), measured by coding the same keys with those tables. The
tables themselves (code lengths, codes and 12-bit decoding lookups, 33 KB a width) are counted once a cache.

Measured before it was built (docs/budget.md, "Entropy coding of the symbols"): at the same bytes, 26% less KL for
`auto-6x` and 46% for `auto-8x` with keys and values coded; the keys alone gave half of that at 6x, 36 of the 46
points at 8x. Values stay fixed-width: their symbols are closer to uniform and each coded side costs decode time.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from ...codecs.hadamard import rotation
from ...codecs.joint import JointKeys
from ...codecs.jointcoded import CODED, CodedJointKeys, WidthTables
from ...codecs.levels import UNIFORM
from ...core.calibfile import beside, check_header, load_tensors, model_header, save_tensors
from ...core.sensitivity import collect
from ...errors import KvshrinkError
from ...spec import spec_from_config
from . import joint

FORMAT = "kvshrink-budget-coded-2"  # 2: menu keys coded too (`menu`)
_TENSORS = ("lengths", "bytes", "menu")
KEY_SEED = 1  # the menu keys' rotation (allocate.key_codec reads it here)


def menu_coded(choice) -> bool:
    """Whether a menu key choice (bits, rotate, group, levels, turned) is coded: turned, uniform, at a coded width,
    over the whole block (a joint key's parameters are per block: groups of 64 would need two sets a block)."""
    return len(choice) == 5 and choice[0] in CODED and bool(choice[4]) and choice[3] == UNIFORM and choice[2] is None


def menu_inverse(rotate: bool, heads: int, d: int) -> torch.Tensor:
    """(H, D, D) map from a menu key's coordinates back to keys: the transposed rotation, or the identity."""
    basis = rotation(d, KEY_SEED) if rotate else torch.eye(d)
    return basis.T.expand(heads, d, d).contiguous()


def joint_digest(joint_calib) -> str:
    """What the tables were fitted for: the joint calibration's maps and widths (its symbols follow from them)."""
    h = hashlib.sha256(joint_calib.inverse.numpy().tobytes())
    h.update(joint_calib.widths.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(eq=False)
class CodedCalibration:
    """lengths (widths, 256) uint8: each width's code lengths (header["widths"]: which widths); bytes (L, choices)
    float64: each joint choice's coded bytes per token (all KV heads); menu (L, len(header["menu"])): the same for
    the coded menu key choices, in the header's order."""

    lengths: torch.Tensor
    bytes: torch.Tensor
    menu: torch.Tensor
    header: dict

    @property
    def tables(self) -> WidthTables:
        """Built once: every codec, layer and cache of this calibration shares them (counted once a cache)."""
        if "_tables" not in self.__dict__:
            widths = self.header["widths"]
            self.__dict__["_tables"] = WidthTables({w: self.lengths[i].numpy() for i, w in enumerate(widths)})
        return self.__dict__["_tables"]

    def table_bytes(self) -> int:
        """The tables and the coded menu keys' maps (one per rotation, rotated or not), counted as fixed bytes."""
        return self.tables.nbytes() + 2 * joint.map_bytes(self.header["heads"], self.header["head_dim"])

    def menu_bytes(self, layer: int) -> dict:
        """{menu choice: coded bytes per token} of a layer."""
        return {tuple(c): float(b) for c, b in zip(self.header["menu"], self.menu[layer])}

    def menu_codec(self, choice, block: int, rope: tuple) -> CodedJointKeys:
        """A coded menu key choice as a joint key with the menu's rotation for basis (module docstring); one per
        (choice, block, RoPE) for every layer and cache, so that its map is counted once."""
        memo = self.__dict__.setdefault("_menu", {})
        bits, rotate = choice[:2]
        key = (tuple(choice), block, rope)
        if key not in memo:
            h, d = self.header["heads"], self.header["head_dim"]
            codec = CodedJointKeys(menu_inverse(rotate, h, d), [bits] * d, block, rope, bits, self.tables)
            maps = self.__dict__.setdefault("_maps", {})
            # one stored map per rotation, however many choices read it (the same rows)
            codec.inverse_rows, codec.inverse_scale = maps.setdefault(rotate, (codec.inverse_rows, codec.inverse_scale))
            memo[key] = codec
        return memo[key]

    def codec(self, joint_calib, layer: int, choice: int, block: int, rope: tuple) -> CodedJointKeys:
        """One codec per (layer, choice), as JointCalibration.codec (a server's sequences share it)."""
        memo = self.__dict__.setdefault("_codecs", {})
        key = (layer, choice, block, rope)
        if key not in memo:
            memo[key] = CodedJointKeys(joint_calib.inverse[layer], joint_calib.widths[layer, choice].tolist(), block,
                                       rope, joint.CHOICES[choice][0], self.tables)
        return memo[key]

    def check(self, model, block: int, joint_calib) -> None:
        check_header(self.header, model, "auto", what="key code tables")
        if self.header.get("block") != block:
            raise KvshrinkError(f"key code tables are for blocks of {self.header.get('block')} tokens, not {block}")
        if self.header.get("joint") != joint_digest(joint_calib):
            raise KvshrinkError("key code tables were fitted for another joint key calibration: delete the -coded "
                                "file beside it to measure them again")

    def save(self, path: str) -> None:
        save_tensors(path, {k: getattr(self, k) for k in _TENSORS}, FORMAT, self.header)

    @classmethod
    def load(cls, path: str, model=None, block: int | None = None, joint_calib=None) -> CodedCalibration:
        tensors, header = load_tensors(path, FORMAT, _TENSORS, "key code tables")
        calib = cls(**tensors, header=header)
        if model is not None:
            calib.check(model, block if block is not None else header.get("block"), joint_calib)
        return calib


def path_beside(joint_path: str) -> str:
    """Where a joint key calibration's code tables live."""
    return beside(joint_path, "-coded" + FORMAT.rsplit("-", 1)[1])


def _keys(model, ids: torch.Tensor, sink: int, block: int, offsets) -> dict:
    """{layer: keys (sequences, H, n, D)}: each sequence's keys after the sink, cut to whole blocks."""
    n = (ids.shape[1] - sink) // block * block
    if n == 0:
        raise KvshrinkError(f"calibration sequences of {ids.shape[1]} tokens hold no block of {block} after the sink")
    keep: dict = {}
    for layers in collect(model, ids, sink, offsets=offsets):
        for i, (_, k, _, _, _) in layers.items():
            keep.setdefault(i, []).append(k[:, :n].float())
    return {i: torch.stack(ks) for i, ks in keep.items()}


def calibrate(model, ids: torch.Tensor, joint_calib, data: dict | None = None, sink: int = 4,
              block: int = 128, menu: tuple = ()) -> CodedCalibration:
    """Tables and coded bytes from the keys of `ids` (sequences, length) at the joint calibration's positions, for
    the joint choices and the coded ones of the menu key choices `menu` (`menu_coded`)."""
    spec = spec_from_config(model.config)
    t0 = time.time()
    keys = _keys(model, ids, sink, block, joint_calib.header.get("positions"))
    menu = [tuple(c) for c in menu if menu_coded(c)]
    header = {**model_header(model), "data": data or {}, "sink_excluded": sink, "block": block,
              "joint": joint_digest(joint_calib), "positions": joint_calib.header.get("positions"),
              "tokens": int(keys[0].shape[0] * keys[0].shape[2]) if keys else 0, "menu": [list(c) for c in menu],
              "heads": spec.num_kv_heads, "head_dim": spec.head_dim}
    fixed_basis = [JointKeys(menu_inverse(c[1], spec.num_kv_heads, spec.head_dim), [c[0]] * spec.head_dim, block,
                             spec.rope, c[0]) for c in menu]  # the same for every layer
    rows = [[joint_calib.codec(i, j, block, spec.rope) for j in range(len(joint.CHOICES))] + fixed_basis
            for i in range(spec.num_layers)]
    counts: dict = {}
    for i, codecs in enumerate(rows):
        for c in codecs:
            axes = c.quantize(keys[i], block)[0]
            for a, n, w in (x for x in c.classes if x[2] in CODED):
                sym = axes[..., a:a + n, :].reshape(-1, n * c.group).numpy()
                counts[w] = counts.get(w, 0) + WidthTables.count(w, sym)
    fitted = WidthTables.fit(counts)  # its lengths: (widths, 256) in the order of its widths, as the file holds them
    header["widths"] = fitted.widths
    nbytes = torch.zeros(spec.num_layers, len(joint.CHOICES), dtype=torch.float64)
    calib = CodedCalibration(fitted.lengths, nbytes, torch.zeros(spec.num_layers, len(menu), dtype=torch.float64),
                             header)
    calib.__dict__["_tables"] = fitted
    for i in range(spec.num_layers):
        tokens = keys[i].shape[0] * keys[i].shape[2]
        for j in range(len(joint.CHOICES)):
            codec = calib.codec(joint_calib, i, j, block, spec.rope)
            calib.bytes[i, j] = codec.encode(keys[i], block).nbytes() / tokens
        for m, c in enumerate(menu):
            calib.menu[i, m] = calib.menu_codec(c, block, spec.rope).encode(keys[i], block).nbytes() / tokens
    calib.header["seconds"] = round(time.time() - t0, 1)
    return calib
