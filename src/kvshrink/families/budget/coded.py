"""Entropy-coded joint-basis keys for the budget (`entropy=true`; codecs/jointcoded.py): code tables fitted once per
joint key calibration, in a file beside it (its path with `-coded1`), and the coded bytes of every (layer, joint
choice) that the allocator then spends the budget on.

On the joint calibration's own tokens and positions, every layer's keys go through every joint choice; the tuple
counts of each width's symbols, pooled over layers and choices, give one Huffman code per width (every tuple
given a code). Each (layer, choice)'s bytes per token are then its coded body's real bytes (streams in whole bytes,
their int32 offsets, the float16 min and step per axis), measured by coding the same keys with those tables. The
tables themselves (code lengths, codes and 10-bit decoding lookups, about 7.4 KB a width) are counted once a cache.

Measured before it was built (docs/budget.md, "Entropy coding of the symbols"): at the same bytes, 26% less KL for
`auto-6x` and 46% for `auto-8x` with keys and values coded; the keys alone gave half of that at 6x, 36 of the 46
points at 8x. Values stay fixed-width: their symbols are closer to uniform and each coded side costs decode time.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from ...codecs.jointcoded import CODED, CodedJointKeys, WidthTables
from ...core.calibfile import check_header, load_tensors, model_header, save_tensors
from ...core.sensitivity import collect
from ...errors import KvshrinkError
from ...spec import spec_from_config
from . import joint

FORMAT = "kvshrink-budget-coded-1"
_TENSORS = ("lengths", "bytes")


def joint_digest(joint_calib) -> str:
    """What the tables were fitted for: the joint calibration's maps and widths (its symbols follow from them)."""
    h = hashlib.sha256(joint_calib.inverse.numpy().tobytes())
    h.update(joint_calib.widths.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(eq=False)
class CodedCalibration:
    """lengths (widths, 256) uint8: each width's code lengths (header["widths"]: which widths); bytes (L, choices)
    float64: each joint choice's coded bytes per token (all KV heads)."""

    lengths: torch.Tensor
    bytes: torch.Tensor
    header: dict

    @property
    def tables(self) -> WidthTables:
        """Built once: every codec, layer and cache of this calibration shares them (counted once a cache)."""
        if "_tables" not in self.__dict__:
            widths = self.header["widths"]
            self.__dict__["_tables"] = WidthTables({w: self.lengths[i].numpy() for i, w in enumerate(widths)})
        return self.__dict__["_tables"]

    def table_bytes(self) -> int:
        return self.tables.nbytes()

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
    suffix = "-coded" + FORMAT.rsplit("-", 1)[1]
    return joint_path[:-len(".safetensors")] + suffix + ".safetensors" if joint_path.endswith(".safetensors") \
        else joint_path + suffix


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
              block: int = 128) -> CodedCalibration:
    """Tables and coded bytes from the keys of `ids` (sequences, length) at the joint calibration's positions."""
    spec = spec_from_config(model.config)
    t0 = time.time()
    keys = _keys(model, ids, sink, block, joint_calib.header.get("positions"))
    fixed = [[joint_calib.codec(i, j, block, spec.rope) for j in range(len(joint.CHOICES))]
             for i in range(spec.num_layers)]
    counts: dict = {}
    for i, codecs in enumerate(fixed):
        for c in codecs:
            axes = c.quantize(keys[i], block)[0]
            for a, n, w in (x for x in c.classes if x[2] in CODED):
                sym = axes[..., a:a + n, :].reshape(-1, n * c.group).numpy()
                counts[w] = counts.get(w, 0) + WidthTables.count(w, sym)
    fitted = WidthTables.fit(counts)  # its lengths: (widths, 256) in the order of its widths, as the file holds them
    header = {**model_header(model), "data": data or {}, "sink_excluded": sink, "block": block, "widths": fitted.widths,
              "joint": joint_digest(joint_calib), "positions": joint_calib.header.get("positions"),
              "tokens": int(keys[0].shape[0] * keys[0].shape[2]) if keys else 0}
    nbytes = torch.zeros(spec.num_layers, len(joint.CHOICES), dtype=torch.float64)
    calib = CodedCalibration(fitted.lengths, nbytes, header)
    calib.__dict__["_tables"] = fitted
    for i in range(spec.num_layers):
        tokens = keys[i].shape[0] * keys[i].shape[2]
        for j in range(len(joint.CHOICES)):
            codec = calib.codec(joint_calib, i, j, block, spec.rope)
            calib.bytes[i, j] = codec.encode(keys[i], block).nbytes() / tokens
    calib.header["seconds"] = round(time.time() - t0, 1)
    return calib
