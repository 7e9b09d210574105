"""Packing helpers of the 2:4 sparse layout and of stored pruning masks (pure torch; the byte
order is documented in csrc/cpu/sparse/sparse24.h and mirrored here).

2:4 layout: each group of 4 consecutive weights along the last dimension keeps 2 values.
The kept values in natural order (v = 2g + k, k = 0 the lower position) are permuted within
each full chunk of 128 (storage element e = 4i + (j ^ 1) holds v = 32j + i) and quantized by
the dense machinery; positions are 2 bits each, byte i bits 2j..2j+1 of a chunk's 32 bytes
holding the position of v = 32j + i. A trailing partial chunk keeps natural order (byte t
bits 2j..2j+1: v = 4t + j).
"""

from __future__ import annotations

from typing import Optional

import torch

from .formats import Format

CHUNK = 128  # stored values per chunk


def _storage_to_natural() -> torch.Tensor:
    e = torch.arange(CHUNK)
    return 32 * ((e & 3) ^ 1) + (e >> 2)


_PERM = _storage_to_natural()


def select_24(x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept values (natural order, x.dtype, flat [numel / 2]) and their positions (int64) of x
    (last dim % 4 == 0): the 2 largest |x| of each group of 4 (ties: the lower position), or
    the mask's True entries (at most 2 a group; a group with fewer fills up with zeros at the
    lowest free positions)."""
    g = x.reshape(-1, 4)
    if mask is None:
        order = torch.argsort(-g.abs().float(), dim=1, stable=True)[:, :2]
        keep = order.sort(dim=1).values
        return g.gather(1, keep).reshape(-1), keep.reshape(-1)
    m = mask.reshape(-1, 4)
    if bool((m.sum(1) > 2).any()):
        raise ValueError("mask keeps more than 2 of some group of 4 consecutive weights; a 2:4 mask keeps at most 2")
    order = torch.argsort((~m).to(torch.uint8), dim=1, stable=True)[:, :2]
    keep = order.sort(dim=1).values
    vals = torch.where(m.gather(1, keep), g.gather(1, keep), torch.zeros((), dtype=x.dtype, device=x.device))
    return vals.reshape(-1), keep.reshape(-1)


def to_storage(natural: torch.Tensor) -> torch.Tensor:
    """Natural order -> storage order (flat, any dtype)."""
    full = natural.numel() // CHUNK * CHUNK
    out = natural.clone()
    out[:full] = natural[:full].reshape(-1, CHUNK)[:, _PERM.to(natural.device)].reshape(-1)
    return out


def from_storage(stored: torch.Tensor) -> torch.Tensor:
    """Storage order -> natural order (flat, any dtype)."""
    full = stored.numel() // CHUNK * CHUNK
    out = stored.clone()
    chunks = out[:full].view(-1, CHUNK)
    chunks[:, _PERM.to(stored.device)] = stored[:full].reshape(-1, CHUNK)
    return out


def pack_positions(pos: torch.Tensor) -> torch.Tensor:
    """Positions (natural order, values 0..3, flat [S]) -> uint8 [ceil(S / 4)]."""
    s = pos.numel()
    full = s // CHUNK * CHUNK
    p = pos.to(torch.int32)
    shifts = (2 * torch.arange(4, dtype=torch.int32, device=pos.device))
    head = (p[:full].reshape(-1, 4, 32) << shifts.reshape(1, 4, 1)).sum(1).reshape(-1)
    tail = p[full:]
    pad = (-tail.numel()) % 4
    tail = torch.cat([tail, tail.new_zeros(pad)]).reshape(-1, 4)
    tail = (tail << shifts.reshape(1, 4)).sum(1)
    return torch.cat([head, tail]).to(torch.uint8)


def unpack_positions(packed: torch.Tensor, s: int) -> torch.Tensor:
    """uint8 [ceil(S / 4)] -> positions (natural order, int64, flat [S])."""
    full = s // CHUNK * CHUNK
    b = packed.to(torch.int64)
    shifts = 2 * torch.arange(4, device=packed.device)
    head = (b[: full // 4].reshape(-1, 1, 32) >> shifts.reshape(1, 4, 1)) & 3
    tail = ((b[full // 4:].reshape(-1, 1) >> shifts.reshape(1, 4)) & 3).reshape(-1)[: s - full]
    return torch.cat([head.reshape(-1), tail])


def has_exact_zero(fmt: Format) -> bool:
    """True when a zero weight always decodes to exactly 0.0: absmax scaling (0 / absmax = 0 is
    nearest to the table's 0.0, and 0.0 * scale = 0). Minmax formats and codebooks without
    0.0 decode zeros to the nearest level, which is generally not zero."""
    return fmt.rule == "absmax" and 0.0 in fmt.values


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [numel] -> uint8 [ceil(numel / 8)], element i in bit i % 8 of byte i // 8."""
    m = mask.reshape(-1).to(torch.uint8)
    m = torch.cat([m, m.new_zeros((-m.numel()) % 8)]).reshape(-1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=m.device)).reshape(1, 8)
    return (m.to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(numel / 8)] -> bool [numel]."""
    bits = (packed.to(torch.int32).reshape(-1, 1) >> torch.arange(8, device=packed.device).reshape(1, 8)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)
