"""Dense bit packing of small unsigned integer codes into bytes.

`bits` codes are packed little-endian along the last dimension: a 2-bit code
takes a quarter of a byte, a 3-bit code packs eight codes into three bytes.
"""

from __future__ import annotations

from math import gcd

import torch

from ..errors import KvshrinkError


def _unit(bits: int) -> tuple[int, int]:
    """(codes per unit, bytes per unit): the smallest whole-byte run of codes."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise KvshrinkError(f"impossible bit width {bits!r}: packing supports 1 to 8 bits")
    codes = 8 // gcd(8, bits)
    return codes, codes * bits // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for `n` codes of `bits` bits (rounded up to whole units)."""
    codes, nbytes = _unit(bits)
    return -(-n // codes) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) along the last dim into a uint8 tensor."""
    per_unit, unit_bytes = _unit(bits)
    n = codes.shape[-1]
    pad = (-n) % per_unit
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    lead = codes.shape[:-1]
    c = codes.reshape(*lead, -1, per_unit)
    if unit_bytes == 1:
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
        word = (c.to(torch.int32) << shifts).sum(-1)
        return word.to(torch.uint8)
    shifts = torch.arange(per_unit, dtype=torch.int64, device=codes.device) * bits
    word = (c.to(torch.int64) << shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(unit_bytes, dtype=torch.int64, device=codes.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first `n` codes along the last dim, as uint8."""
    per_unit, unit_bytes = _unit(bits)
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if unit_bytes == 1:
        # scalar shifts: a broadcast shift tensor takes a much slower kernel
        parts = [(packed >> s) & mask if s else packed & mask for s in range(0, 8, bits)]
        codes = torch.stack(parts, dim=-1) if len(parts) > 1 else parts[0]
        return codes.reshape(*lead, -1)[..., :n]
    units = packed.reshape(*lead, -1, unit_bytes).to(torch.int64)
    byte_shifts = torch.arange(unit_bytes, dtype=torch.int64, device=packed.device) * 8
    word = (units << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(per_unit, dtype=torch.int64, device=packed.device) * bits
    codes = ((word >> shifts) & mask).to(torch.uint8)
    return codes.reshape(*lead, -1)[..., :n]
