"""The format registry: every codebook table of qengine lives here and only here.

A format is data: a codebook of at most 2**bits float32 values (in storage order: code q
decodes to values[q]) and a scale rule for its blocks:

- ``absmax``: ``x ~= values[q] * scale`` with ``scale = max|x|`` over the block; values in [-1, 1].
- ``minmax``: ``x ~= values[q] * scale + offset`` with ``scale = max - min``, ``offset = min``;
  values in [0, 1].

Quantization picks the nearest value: it counts the float32 midpoints between sorted
neighbours that lie strictly below the normalised input (ties go to the lower value), which
is bitsandbytes' rule, so NF4/FP4 produce its exact bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Format", "get_format", "codebook", "available_formats", "register_format"]

# QLoRA's NormalFloat4 (bitsandbytes' table, storage order = sorted order).
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# bitsandbytes' FP4 (e2m1 with its own exponent bias); storage order: bit 3 is the sign.
_FP4 = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
    0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)


def _symmetric_int(bits: int) -> tuple[float, ...]:
    # 2**(bits-1) - 1 levels each side and an exact zero; the most negative code is unused,
    # so the table stays symmetric (as int4/int8 symmetric quantization in torchao).
    qmax = 2 ** (bits - 1) - 1
    return tuple(float(torch.tensor(k / qmax, dtype=torch.float32)) for k in range(-qmax, qmax + 1))


def _unsigned_int(bits: int) -> tuple[float, ...]:
    qmax = 2**bits - 1
    return tuple(float(torch.tensor(k / qmax, dtype=torch.float32)) for k in range(qmax + 1))


def _dynamic_signed() -> tuple[float, ...]:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)): a dynamic
    exponent with a shrinking fraction; used to quantize the scales in double quantization."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return tuple(float(v) for v in torch.tensor(data, dtype=torch.float32))


# The 8-bit optimizer states' codes: dynamic codes in the manner of bitsandbytes' maps (fine
# steps near the block's max, coarse ones far below it) built as two-piece minifloats without
# subnormals, so that SIMD kernels decode and encode them with shifts instead of table lookups
# (csrc/include/qengine/optim_math.h, MinifloatForm). The code of s * k (s = +-1, magnitude
# k >= 0) is zero_code + s * k; k_top = 255 - zero_code is 1.0, the `top_binades` binades below
# it hold 2**top_mantissa_bits evenly spaced magnitudes each, the binades below those
# 2**mantissa_bits each, and k = 0 is 0.0 (both moments are scaled by their block's max).
# (top_mantissa_bits, top_binades, mantissa_bits, zero_code):
# m's scale is signed (its block's element of largest magnitude, with its sign), so that element
# is always +1.0; (5, 1, 3) beat (5, 2, 3), (5, 2, 2) and (6, 1, 2) on the least-squares problem
# of docs/optimizers.md (fine steps below the max matter less than the range below 2**-10).
STATE8_SIGNED_FORM = (5, 1, 3, 127)  # m: 0.0, +-[2**-13, 0.5) in 1/8 binades (from 1.125 * 2**-13), +-[0.5, 1) in 1/32, and +1.0
STATE8_UNSIGNED_FORM = (5, 4, 3, -1)  # v: [2**-20, 2**-4) in 1/8 binades, [2**-4, 1) in 1/32, 1.0; no zero


# OCP MX v1.0 E2M1 (FP4) element values in their bit order (code = s e1 e0 m): the raw values,
# scaled by the block's power of two (mxfp4) or E4M3 scale (nvfp4), not normalised to [-1, 1].
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e8m0_values() -> tuple[float, ...]:
    """E8M0 scale codes 0..254: 2**(c - 127) (exact in float32; c = 255 is NaN, not a value)."""
    return tuple(math.ldexp(1.0, c - 127) for c in range(255))


def e4m3_values() -> tuple[float, ...]:
    """Non-negative FP8 E4M3 (OCP, bias 7, no infinities) codes 0..126: 0 to 448 (0x7f is NaN;
    codes >= 128 are the negatives, never a block scale)."""
    return tuple(math.ldexp(c & 7, -9) if c >> 3 == 0 else math.ldexp(8 + (c & 7), (c >> 3) - 10) for c in range(127))


# FP8 E4M3 (OCP "fn": bias 7, no infinities, S.1111.111 NaN, max 448) codes whose bits hold no
# value; the fp8_e4m3 table holds 0.0 there, its quantizer never produces them and loading refuses them.
E4M3_NAN_CODES = (0x7F, 0xFF)


def fp8_e4m3_values() -> tuple[float, ...]:
    """The 256 FP8 E4M3 values in bit order (code = s eeee mmm; the raw values, not normalised):
    codes 0..126 as e4m3_values(), 128..254 their negatives (0x80 is -0.0); 0.0 at the NaN codes."""
    pos = e4m3_values()
    return pos + (0.0,) + tuple(-v for v in pos) + (0.0,)


def _state8_code(form: tuple[int, int, int, int]) -> tuple[float, ...]:
    """The 256 sorted values of a state code (see STATE8_SIGNED_FORM)."""
    top_bits, top_binades, low_bits, zero_code = form
    first_top = 255 - zero_code - (top_binades << top_bits)

    def magnitude(k: int) -> float:
        bits = top_bits if k >= first_top else low_bits
        j = k - first_top  # negative below the top piece: >> and & then count down from its first binade
        return 2.0 ** (-top_binades + (j >> bits)) * (1 + (j & ((1 << bits) - 1)) / 2**bits)

    values = [0.0 if c == zero_code else math.copysign(magnitude(abs(c - zero_code)), c - zero_code)
              for c in range(256)]
    assert values == sorted(values) and len(set(values)) == 256
    return tuple(values)


@dataclass(frozen=True, eq=False)
class Format:
    """A quantization format: codebook values in storage order, bit width and scale rule."""

    name: str
    bits: int
    values: tuple[float, ...]
    rule: str = "absmax"
    description: str = ""
    # "nearest": the nearest value (midpoint search). "grid": bitsandbytes' quantize_blockwise
    # rule, a 65536-point lookup over [-1, 1] that is nearest up to grid resolution; used by
    # dynamic8 so double-quantized scales have bitsandbytes' exact bytes.
    search: str = "nearest"
    # Microscaling formats (mxfp4, nvfp4): the block size the format fixes and the private
    # format of its block scales (a nested table: "_e8m0" or "_e4m3"); "" for the others.
    # Their codebooks are the spec's raw values (not in [-1, 1]) and are not stored per tensor.
    fixed_blocksize: int = 0
    scale_format: str = ""
    # False: the table is a constant of the format's specification (not counted in nbytes).
    stored_table: bool = True
    # "e4m3": the codes are a minifloat's own bits (fp8_e4m3), quantized by qengine/fp8.py, not by
    # the kernels' nearest-code search; "" for the others.
    quantizer: str = ""
    # Codes that decode to no value (E4M3's NaNs): never produced, refused when a state dict loads.
    invalid_codes: tuple[int, ...] = ()
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rule_code(self) -> int:
        return 0 if self.rule == "absmax" else 1

    @property
    def identity_order(self) -> bool:
        return list(self.values) == sorted(self.values)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Format)
            and self.name == other.name
            and self.bits == other.bits
            and self.rule == other.rule
            and self.values == other.values
            and self.search == other.search
        )

    def __hash__(self) -> int:
        return hash((self.name, self.bits, self.rule, self.values, self.search))

    def kernel_tables(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """(table, midpoints, sorted_to_code, grid_lut) as the kernels read them.

        table: float32 [2**bits], values then zeros (unused codes); midpoints: float32
        [2**bits], sorted midpoints computed in float32, then +inf; sorted_to_code: uint8
        [2**bits], storage code of each sorted value; grid_lut: uint8 [65536] storage code of
        each grid point for search="grid", else None.
        """
        device = torch.device(device)
        key = str(device)
        if key not in self._cache:
            size = 2**self.bits
            vals = torch.tensor(self.values, dtype=torch.float32)
            table = torch.zeros(size, dtype=torch.float32)
            table[: len(self.values)] = vals
            # Stable sort: equal values (FP4's two zeros) keep storage order, like bitsandbytes.
            order = sorted(range(len(self.values)), key=lambda i: self.values[i])
            svals = vals[order]
            mids = torch.full((size,), math.inf, dtype=torch.float32)
            mids[: len(self.values) - 1] = (svals[:-1] + svals[1:]) / 2
            sorted_to_code = torch.full((size,), order[-1], dtype=torch.uint8)
            sorted_to_code[: len(order)] = torch.tensor(order, dtype=torch.uint8)
            grid = None
            if self.search == "grid":
                # The grid points exactly as bitsandbytes computes them in float32: (i + i) / 65535 - 1.
                i = torch.arange(65536, dtype=torch.float32)
                points = (i + i) / torch.full_like(i, 65535.0) - 1.0
                count = torch.searchsorted(mids[: len(self.values) - 1], points, side="left")
                grid = sorted_to_code[count.clamp(max=len(self.values) - 1)]
            self._cache[key] = tuple(t.to(device) if t is not None else None
                                     for t in (table, mids, sorted_to_code, grid))
        return self._cache[key]

    def to_dict(self) -> dict:
        return {"name": self.name, "bits": self.bits, "rule": self.rule}


_REGISTRY: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Adds a named format to the registry (names are unique)."""
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _validate_values(fmt.values, fmt.bits, fmt.rule, bounded=fmt.stored_table)
    if fmt.search not in ("nearest", "grid") or (fmt.search == "grid" and (fmt.bits != 8 or fmt.rule != "absmax")):
        raise ValueError("search must be 'nearest', or 'grid' for an 8-bit absmax format")
    _REGISTRY[fmt.name] = fmt
    return fmt


def available_formats() -> list[str]:
    """Names of the registered formats (user codebooks are passed as Format objects)."""
    return [n for n in _REGISTRY if not n.startswith("_")]


def get_format(fmt: str | Format) -> Format:
    """Looks up a format by name, or returns a Format unchanged."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a name ({', '.join(available_formats())}) or a Format, got {type(fmt).__name__}")
    try:
        return _REGISTRY[fmt.lower()]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; available: {', '.join(available_formats())}") from None


def _validate_values(values: Sequence[float], bits: int, rule: str, bounded: bool = True) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if rule not in ("absmax", "minmax"):
        raise ValueError(f"rule must be 'absmax' or 'minmax', got {rule!r}")
    if not 2 <= len(values) <= 2**bits:
        raise ValueError(f"a {bits}-bit codebook needs 2 to {2**bits} values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("codebook values must be finite")
    lo, hi = (-1.0, 1.0) if rule == "absmax" else (0.0, 1.0)
    if bounded and (min(values) < lo or max(values) > hi):
        raise ValueError(f"codebook values for the {rule} rule must lie in [{lo}, {hi}]")


def codebook(values: Sequence[float] | torch.Tensor, rule: str = "absmax", bits: int | None = None,
             name: str = "codebook") -> Format:
    """A non-uniform format from a user table.

    Args:
        values: strictly increasing finite values, at most 16 (4 bits) or 256 (8 bits); in
            [-1, 1] for ``rule="absmax"`` (scaled by the block absmax) or [0, 1] for
            ``rule="minmax"`` (scaled by max - min, shifted by min).
        bits: 4 or 8 (codes of half a byte or a byte per weight). Default: 4, which holds at
            most 16 values; a larger table needs an explicit ``bits=8`` (ValueError otherwise),
            so that a table one value too long never doubles the storage silently.
    """
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"codebook must be 1-D, got shape {tuple(values.shape)}")
        if values.is_complex() or not values.is_floating_point():
            raise TypeError(f"codebook must be a floating-point tensor, got {values.dtype}")
        values = values.detach().to("cpu", torch.float32).tolist()
    vals = tuple(float(torch.tensor(float(v), dtype=torch.float32)) for v in values)
    if bits is None:
        if len(vals) > 16:
            raise ValueError(f"a codebook of {len(vals)} values does not fit 4 bits (at most 16 values); pass "
                             f"bits=8 for an 8-bit format (a byte per weight, up to 256 values), or use at most 16 "
                             f"values for 4 bits")
        bits = 4
    _validate_values(vals, bits, rule)
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError("codebook values must be sorted in strictly increasing order")
    return Format(name=name, bits=bits, values=vals, rule=rule, description="user codebook")


for _fmt in (
    Format("nf4", 4, _NF4, "absmax", "NormalFloat4 (QLoRA), bitsandbytes-compatible bytes"),
    Format("fp4", 4, _FP4, "absmax", "FP4 e2m1 (bitsandbytes' table), bitsandbytes-compatible bytes"),
    Format("int4", 4, _symmetric_int(4), "absmax", "symmetric uniform, levels k/7 for k in -7..7"),
    Format("int8", 8, _symmetric_int(8), "absmax", "symmetric uniform, levels k/127 for k in -127..127"),
    Format("uint4", 4, _unsigned_int(4), "minmax", "asymmetric uniform (affine), levels k/15, zero point = block min"),
    Format("uint8", 8, _unsigned_int(8), "minmax", "asymmetric uniform (affine), levels k/255, zero point = block min"),
    Format("dynamic8", 8, _dynamic_signed(), "absmax", "bitsandbytes' signed dynamic 8-bit map (double-quant scales)",
           search="grid"),
    # Private (not listed by available_formats): the 8-bit optimizer states' codes (PagedAdamW8bit).
    Format("_state8_signed", 8, _state8_code(STATE8_SIGNED_FORM), "absmax",
           "8-bit optimizer first moment: signed two-piece minifloat, 2**-13 to 1 (STATE8_SIGNED_FORM)"),
    Format("_state8_unsigned", 8, _state8_code(STATE8_UNSIGNED_FORM), "absmax",
           "8-bit optimizer second moment: unsigned two-piece minifloat, 2**-20 to 1 (STATE8_UNSIGNED_FORM)"),
    # Microscaling (see docs/formats.md): the block scale is a nested table (E8M0, or E4M3
    # times a float32 tensor scale) decoded by the kernels as double-quantized scales.
    Format("mxfp4", 4, E2M1_VALUES, "absmax", "OCP MXFP4: E2M1 elements, an E8M0 power-of-two scale per 32",
           fixed_blocksize=32, scale_format="_e8m0", stored_table=False),
    Format("nvfp4", 4, E2M1_VALUES, "absmax",
           "NVIDIA NVFP4: E2M1 elements, an E4M3 scale per 16 times a float32 tensor scale",
           fixed_blocksize=16, scale_format="_e4m3", stored_table=False),
    # FP8 weight-only (torchao / llm-compressor / vLLM): E4M3 codes in bit order (raw values up to
    # 448, scale = amax / 448 per block or row); the table is the spec's, not stored per tensor.
    Format("fp8_e4m3", 8, fp8_e4m3_values(), "absmax",
           "FP8 E4M3 (OCP fn) codes, a float32 scale amax / 448 per block or row (torchao / vLLM FP8 weight-only)",
           stored_table=False, quantizer="e4m3", invalid_codes=E4M3_NAN_CODES),
    Format("_e8m0", 8, e8m0_values(), "absmax", "E8M0 block scales (mxfp4): 2**(code - 127)", stored_table=False),
    Format("_e4m3", 8, e4m3_values(), "absmax", "FP8 E4M3 block scales (nvfp4), times the tensor scale",
           stored_table=False),
):
    register_format(_fmt)
