"""Slow, obvious PyTorch references for qengine's blockwise quantization.

Written from the format specification only: nothing here calls a qengine kernel or op. The
codebook tables are data, so they are read from ``qengine.formats.get_format(name).values``
(or from a Format object) and nothing else of the package is used.

Spec, in short:
  * sorted order = stable sort of the storage-order values (FP4's two zeros: code 0 before 8);
    midpoints = float32 (s[i] + s[i+1]) / 2.
  * per block: absmax: scale = max|x|; minmax: scale = float32(max - min), offset = min;
    div = max(scale, 1e-38) (float32), inv = float32(1 / div);
    v = x * inv for full blocks, v = x / div for a partial last block (minmax: x - offset first).
  * sorted index = number of midpoints strictly below v (ties go down); code = storage index.
  * 4-bit packing: byte k = code[2k] << 4 | code[2k+1]; an odd count is padded with the code of 0.0.
  * dequantize: float32(values[q] * scale) (absmax) or float32(values[q] * scale + offset) in one
    rounding (minmax; float64 product is exact, then fma_to_float32), then cast to the dtype.
  * double quantization: mean = scales.mean(); nested = quantize(scales - mean, dynamic8, 256);
    scales_hat = dequantize(nested) + mean (float32).

Two bitsandbytes-compatibility rules adopted by qengine after the first spec (commit 15052ff,
"double-quant state equals bitsandbytes'"), modelled here behind flags:
  * PARTIAL_BLOCK_CLAMP: the absmax scale *stored* for a partial last block is the clamped
    divisor max(absmax, 1e-38) (bitsandbytes' quantize_4bit stores `absmax.clamp(min=1e-38)`
    there); full blocks and the minmax rule store the raw value.
  * GRID_SEARCH: a format whose ``search`` attribute is "grid" (dynamic8, the double-quant
    map) encodes like bitsandbytes' 8-bit quantize_blockwise on the CPU: every block
    (partial ones too) is normalised by v = x * float32(1 / absmax), v is clamped to [-1, 1]
    and mapped to k = trunc(((v + 1) * 0.5) * 65535 + 0.5) (float32 arithmetic); the code is
    the nearest-value code (midpoint rule) of grid point float32((k + k) / 65535) - 1. An
    all-zero block stores scale 0 and code 0 everywhere. Its stored scale is never clamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from qengine.formats import get_format

MIN_DIV = torch.tensor(1e-38, dtype=torch.float32)
NESTED_FORMAT = "dynamic8"
NESTED_BLOCKSIZE = 256
GRID_POINTS = 65536

# See the module docstring: bitsandbytes-compatibility rules (set False for the plain spec).
PARTIAL_BLOCK_CLAMP = True
GRID_SEARCH = True


@dataclass
class RefFormat:
    values: torch.Tensor  # float32, storage order
    bits: int
    rule: str
    search: str = "nearest"

    @classmethod
    def of(cls, fmt) -> "RefFormat":
        f = get_format(fmt)
        search = str(getattr(f, "search", "nearest")) if GRID_SEARCH else "nearest"
        return cls(torch.tensor(list(f.values), dtype=torch.float32), int(f.bits), str(f.rule), search)


@dataclass
class RefQuantized:
    packed: torch.Tensor  # uint8, 1-D
    scales: torch.Tensor  # float32 [nblocks] (the decoded values when double-quantized)
    offsets: Optional[torch.Tensor]
    codes: torch.Tensor  # uint8, one per element (unpacked)
    blocksize: int
    numel: int
    shape: torch.Size
    dtype: torch.dtype
    fmt: RefFormat
    nested_scales: Optional["RefNested"] = None
    nested_offsets: Optional["RefNested"] = None


@dataclass
class RefNested:
    quantized: RefQuantized
    mean: torch.Tensor  # float32 scalar
    values: torch.Tensor  # float32, dequantize(quantized) + mean


def sorted_order(values: torch.Tensor) -> list[int]:
    """Storage indices in ascending order of value; Python's sort is stable."""
    vals = values.tolist()
    return sorted(range(len(vals)), key=lambda i: vals[i])


def midpoints(values: torch.Tensor) -> torch.Tensor:
    s = values[sorted_order(values)].to(torch.float32)
    return (s[:-1] + s[1:]) / 2  # float32 arithmetic


def nearest_codes(v: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Storage code for each float32 normalised value: count midpoints strictly below v."""
    mids = midpoints(values)
    order = torch.tensor(sorted_order(values), dtype=torch.int64)
    v = v.reshape(-1).to(torch.float32)
    out = torch.empty(v.numel(), dtype=torch.uint8)
    chunk = 1 << 16
    for i in range(0, v.numel(), chunk):
        part = v[i : i + chunk]
        idx = (part.unsqueeze(1) > mids.unsqueeze(0)).sum(dim=1)
        out[i : i + chunk] = order[idx].to(torch.uint8)
    return out


def code_of_zero(values: torch.Tensor) -> int:
    return int(nearest_codes(torch.zeros(1), values)[0])


def pack(codes: torch.Tensor, bits: int, values: torch.Tensor) -> torch.Tensor:
    codes = codes.to(torch.uint8).reshape(-1)
    if bits == 8:
        return codes.clone()
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([code_of_zero(values)], dtype=torch.uint8)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed[:numel].clone()
    codes = torch.empty(packed.numel() * 2, dtype=torch.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:numel]


def _normalise_rows(xb: torch.Tensor, rule: str, partial: bool):
    """xb: float32 [rows, len]. Returns (v, stored scale, offset) in float32."""
    if rule == "absmax":
        scale = xb.abs().amax(dim=1)
        offset = None
        centred = xb
    else:
        lo = xb.amin(dim=1)
        hi = xb.amax(dim=1)
        scale = hi - lo  # float32 subtraction
        offset = lo
        centred = xb - lo.unsqueeze(1)  # float32 subtraction
    div = torch.maximum(scale, MIN_DIV)
    if partial:
        v = centred / div.unsqueeze(1)
        if rule == "absmax" and PARTIAL_BLOCK_CLAMP:
            scale = div
    else:
        inv = torch.ones_like(div) / div  # float32 reciprocal
        v = centred * inv.unsqueeze(1)
    return v, scale, offset


_GRID_LUTS: dict = {}


def _grid_lut(values: tuple) -> torch.Tensor:
    """Nearest-value code (midpoint rule) of each grid point float32((k + k) / 65535) - 1."""
    if values not in _GRID_LUTS:
        i = torch.arange(GRID_POINTS, dtype=torch.float32)
        points = (i + i) / 65535.0 - 1.0
        _GRID_LUTS[values] = nearest_codes(points, torch.tensor(values, dtype=torch.float32))
    return _GRID_LUTS[values]


def grid_codes(xb: torch.Tensor, values: torch.Tensor):
    """The "grid" search (absmax only) of a [rows, len] float32 block matrix: (codes, scales)."""
    scale = xb.abs().amax(dim=1)
    inv = torch.ones_like(scale) / scale  # inf for an all-zero block (handled below)
    v = (xb * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    t = (v + 1.0) * 0.5
    k = (t * 65535.0 + 0.5).to(torch.int64)  # float32 ops, then truncation (t >= 0)
    lut = _grid_lut(tuple(values.tolist()))
    codes = lut[k.clamp(0, GRID_POINTS - 1)]
    codes[scale == 0] = 0
    return codes.reshape(-1), scale


def quantize(x: torch.Tensor, fmt, blocksize: Optional[int] = 64, double_quant: bool = False) -> RefQuantized:
    f = fmt if isinstance(fmt, RefFormat) else RefFormat.of(fmt)
    shape, dtype = x.shape, x.dtype
    if blocksize is None:
        blocksize = shape[-1] if x.dim() >= 1 else 1
    flat = x.detach().to(torch.float32).reshape(-1)  # exact for float16 / bfloat16
    n = flat.numel()
    full = n // blocksize
    rem = n - full * blocksize
    pieces = []
    if full:
        pieces.append((flat[: full * blocksize].reshape(full, blocksize), False))
    if rem:
        pieces.append((flat[full * blocksize :].reshape(1, rem), True))
    code_parts, scales, offsets = [], [], []
    for rows, partial in pieces:
        if f.search == "grid":
            assert f.rule == "absmax" and f.bits == 8
            c, s = grid_codes(rows, f.values)
            code_parts.append(c), scales.append(s), offsets.append(None)
        else:
            v, s, o = _normalise_rows(rows, f.rule, partial)
            code_parts.append(nearest_codes(v, f.values)), scales.append(s), offsets.append(o)
    codes = torch.cat(code_parts)
    scale_t = torch.cat(scales)
    offset_t = torch.cat(offsets) if f.rule == "minmax" else None
    q = RefQuantized(pack(codes, f.bits, f.values), scale_t, offset_t, codes, blocksize, n, shape, dtype, f)
    if double_quant:
        q.nested_scales = nest(scale_t)
        q.scales = q.nested_scales.values
        if offset_t is not None:
            q.nested_offsets = nest(offset_t)
            q.offsets = q.nested_offsets.values
    return q


def nest(values: torch.Tensor) -> RefNested:
    mean = values.mean()  # torch float32 mean, as the spec says
    inner = quantize(values - mean, NESTED_FORMAT, NESTED_BLOCKSIZE)
    decoded = dequantize(inner, torch.float32).reshape(-1) + mean
    return RefNested(inner, mean, decoded)


def _per_element(block_values: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    return block_values.repeat_interleave(blocksize)[:n]


def dequantize(q: RefQuantized, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    dtype = q.dtype if dtype is None else dtype
    vals = q.fmt.values[q.codes.to(torch.int64)].to(torch.float64)
    scale = _per_element(q.scales.to(torch.float64), q.blocksize, q.numel)
    prod = vals * scale  # exact: 24-bit x 24-bit significands fit in float64
    if q.fmt.rule == "minmax":
        return fma_to_float32(prod, _per_element(q.offsets.to(torch.float64), q.blocksize, q.numel)).to(dtype).reshape(
            q.shape)
    return prod.to(torch.float32).to(dtype).reshape(q.shape)


def fma_to_float32(prod: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32(prod + offset) rounded once, for an exact float64 product and a float32 offset.

    The float64 sum alone is not enough: when the offset is tiny next to the product (e.g. a
    subnormal block minimum) the float64 add rounds it away, and a product that lies exactly
    halfway between two float32 values then rounds to even instead of towards the offset's
    side (found by the property tests). The exact error of the float64 add (TwoSum) decides
    those ties."""
    s = prod + offset
    bb = s - prod
    err = (prod - (s - bb)) + (offset - bb)  # prod + offset == s + err exactly
    r32 = s.to(torch.float32)
    r = r32.to(torch.float64)
    toward = torch.where(s > r, torch.full_like(r32, math.inf), torch.full_like(r32, -math.inf))
    neighbour = torch.nextafter(r32, toward)
    tie = (s != r) & ((s - r).abs() * 2 == (neighbour.to(torch.float64) - r).abs())
    # At a tie the true value lies past the midpoint (towards the neighbour) when err points
    # the same way as s - r; before it when err points back; err == 0 keeps ties-to-even.
    past = tie & (err != 0) & ((err > 0) == (s > r))
    return torch.where(past, neighbour, r32)


def dequantize_parts(codes: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                     offsets: Optional[torch.Tensor], blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize from explicit parts (flat), for tests that corrupt or hand-build codes."""
    n = codes.numel()
    vals = values[codes.to(torch.int64)].to(torch.float64)
    prod = vals * _per_element(scales.to(torch.float64), blocksize, n)
    if offsets is not None:
        return fma_to_float32(prod, _per_element(offsets.to(torch.float64), blocksize, n)).to(dtype)
    return prod.to(torch.float32).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor, signed_zeros: bool = True) -> bool:
    """Bit-for-bit equality of two float tensors (NaN payloads and the sign of zero count);
    with signed_zeros=False, -0.0 and +0.0 are treated as the same value."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not signed_zeros:
        a, b = a + 0.0, b + 0.0  # -0.0 + 0.0 == +0.0, everything else unchanged
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}[a.dtype]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def nbytes(q: RefQuantized) -> int:
    """Every stored byte: packed codes, codebook table, scales/offsets or their nested parts."""
    total = q.packed.numel() + 4 * q.fmt.values.numel()
    for nested, plain in ((q.nested_scales, q.scales), (q.nested_offsets, q.offsets)):
        if nested is not None:
            total += nbytes(nested.quantized) + 4
        elif plain is not None:
            total += 4 * plain.numel()
    return total


def bits_per_param_formula(numel: int, bits: int, blocksize: int, ncodes: int, double_quant: bool,
                           minmax: bool = False) -> float:
    """Closed form of nbytes * 8 / numel, for cross-checking without quantizing."""
    nblocks = -(-numel // blocksize)
    total = -(-numel * bits // 8) + 4 * ncodes
    parts = 2 if minmax else 1
    for _ in range(parts):
        if double_quant:
            nested_blocks = -(-nblocks // NESTED_BLOCKSIZE)
            total += nblocks + 4 * nested_blocks + 4 * 256 + 4
        else:
            total += 4 * nblocks
    return 8.0 * total / numel


def e4m3(code: int) -> float:
    """OCP FP8 E4M3 ("fn") from its bits, in float64: sign bit 7, 4 exponent bits (bias 7), 3
    mantissa bits, no infinities, S.1111.111 NaN (the spec, written here once for the fp8 and
    microscaling tests)."""
    e, m = (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return math.nan
    mag = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -mag if code >> 7 else mag
