"""Quantizers of the microscaling formats ``mxfp4`` (OCP MX v1.0) and ``nvfp4`` (NVIDIA).

Both store E2M1 element codes (formats.E2M1_VALUES, the spec's raw values) and one scale byte
per block, held as the codes of a nested table so that every kernel decodes them as it decodes
double-quantized scales: ``scale = table[code] * absmax + mean`` with

- mxfp4: table = E8M0 (2**(c - 127)), absmax = 1.0, mean = 0.0: the exact power of two;
- nvfp4: table = non-negative FP8 E4M3, absmax = the float32 tensor scale, mean = 0.0: the
  float32 product e4m3 * tensor scale (multiplying by 1.0 or adding +0.0 to a non-negative
  float32 changes no bit).

The element of a weight is then ``E2M1[code] * scale`` in float32 (one more rounding for nvfp4).

Rules (blocks run over the flattened tensor; a partial last block is padded with zeros):

- mxfp4: shared exponent X = floor(log2(amax)) - 2 (2 = emax of E2M1), clamped below to E8M0's
  -127 (amax < 2**128 keeps it below 127); an all-zero block gets code 0 (2**-127) like the
  gguf package. Elements: x / 2**X rounded to nearest, ties to even, saturating at +-6, the
  sign kept (a tiny negative becomes -0).
- nvfp4: tensor scale g = amax_tensor / (448 * 6) in float32 (1.0 for an all-zero tensor);
  block scale = E4M3(amax_block / 6 / g) rounded to nearest even, saturating at 448; elements
  x / (e4m3 * g) rounded to nearest even E2M1, saturating; a block whose scale rounds to 0
  stores zeros.

Divisions are done in float64 on float32 operands, where a tie is a tie exactly.
"""

from __future__ import annotations

import torch

from ._fit import finite_blocks
from .formats import Format, get_format
from .tensor import NESTED_BLOCKSIZE, NestedScales, QuantizedTensor

__all__ = ["block_scale_codes", "e2m1_codes", "microscaling_tensor", "nvfp4_tensor_scale", "quantize_microscaling",
           "round_to_table", "scale_values", "tensor_scale_blocksize", "tensor_scale_of"]

_CHUNK = 1 << 22  # elements per float64 pass (bounds the temporary memory)
# Up to this many value x midpoint comparisons round_to_table compares with every midpoint:
# torch.searchsorted wakes its worker threads even for a few values (milliseconds a call on a
# busy machine), and GPTQ's sweep rounds one column of a few hundred values at a time.
_COMPARE_MAX = 1 << 20


def tensor_scale_blocksize(nblocks: int) -> int:
    """The nested block size of a microscaling weight's scale codes: one nested absmax (1.0 or
    the tensor scale) for all of them, a power of two (the kernels then shift, not divide)."""
    return max(NESTED_BLOCKSIZE, 1 << max(0, int(nblocks - 1).bit_length()))


def round_to_table(v: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Codes (int64) of the non-negative float64 magnitudes v in `values` (sorted, increasing,
    float64, the code = the index, mantissa in the low bit): nearest, ties to the even code
    (round-to-nearest-even for E2M1 and E4M3), saturating at the last value."""
    mids = (values[:-1] + values[1:]) / 2
    if v.numel() * len(mids) <= _COMPARE_MAX:  # the same count, without searchsorted's thread start-up
        idx = (v.unsqueeze(-1) > mids).sum(-1)
    else:
        idx = torch.searchsorted(mids, v, side="left")  # midpoints strictly below v: ties go low
    tie = (idx < len(mids)) & (mids[idx.clamp(max=len(mids) - 1)] == v) & (idx % 2 == 1)
    return idx + tie.to(idx.dtype)


def e2m1_codes(ratio: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes of the float64 ratios (sign bit 3; the sign of -0.0 kept)."""
    mag = round_to_table(ratio.abs(), positive)
    return mag | (torch.signbit(ratio).to(mag.dtype) << 3)


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """nvfp4's float32 tensor scale g [1] of a tensor whose float32 max |x| is `amax` (a
    0-d tensor): amax / (448 * 6), 1.0 for an all-zero tensor, the smallest positive float32
    for a subnormal amax below 2688 * 2**-149."""
    g = amax / 2688.0 if bool(amax > 0) else torch.ones((), device=amax.device)
    if not bool(g > 0):
        g = torch.tensor(torch.finfo(torch.float32).tiny * 2**-23, device=amax.device)
    return g.reshape(1).to(torch.float32)


def tensor_scale_of(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The float32 tensor scale [1] of x in `fmt`: 1.0 for mxfp4, nvfp4_tensor_scale for nvfp4."""
    if fmt.scale_format == "_e8m0":
        return torch.ones(1, dtype=torch.float32, device=x.device)
    return nvfp4_tensor_scale(x.detach().abs().amax().to(torch.float32))


def scale_values(scale_codes: torch.Tensor, fmt: Format, tensor_scale: torch.Tensor) -> torch.Tensor:
    """float32 block scales of the int64 scale codes, exactly as the kernels decode them:
    mxfp4 2**(code - 127); nvfp4 float32 E4M3[code] * tensor_scale (one rounding)."""
    if fmt.scale_format == "_e8m0":
        return torch.ldexp(torch.ones_like(scale_codes, dtype=torch.float64), scale_codes - 127).to(torch.float32)
    table = get_format(fmt.scale_format).kernel_tables(scale_codes.device)[0]  # float32, storage order
    return table.take(scale_codes) * tensor_scale


def block_scale_codes(amax: torch.Tensor, fmt: Format, tensor_scale: torch.Tensor) -> torch.Tensor:
    """The format's scale codes (int64) of blocks whose max |x| is the float32 `amax` [nb]
    (see the module docstring): mxfp4 floor(log2 amax) - 2 + 127, 0 for an all-zero block;
    nvfp4 E4M3(amax / 6 / g), rounded to nearest even, saturating."""
    if fmt.scale_format == "_e8m0":
        _, exp = torch.frexp(amax.to(torch.float64))  # amax = m * 2**exp, m in [0.5, 1)
        shared = (exp.to(torch.int64) - 1 - 2).clamp(min=-127)
        return torch.where(amax > 0, shared + 127, torch.zeros_like(shared))
    table = torch.tensor(get_format(fmt.scale_format).values, dtype=torch.float64, device=amax.device)
    # amax / 6 / g: float32 operands, the quotient in float64 (a tie in E4M3 is then exact).
    return round_to_table(amax.to(torch.float64) / 6.0 / tensor_scale.to(torch.float64), table)


def microscaling_tensor(codes: torch.Tensor, scale_codes: torch.Tensor, tensor_scale: torch.Tensor, fmt: Format,
                        shape: torch.Size, dtype: torch.dtype) -> QuantizedTensor:
    """The QuantizedTensor of a microscaling weight from its E2M1 storage codes (int, flat
    [numel]), its scale codes (int, [nblocks]) and float32 tensor scale [1] (1.0 for mxfp4):
    codes packed two per byte (code 2k in the high nibble, an odd count padded with 0), the
    scale codes nested under the tensor scale (see the module docstring)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = ((codes[0::2] << 4) | codes[1::2]).contiguous()
    nblocks = scale_codes.numel()
    inner = QuantizedTensor(scale_codes.to(torch.uint8).contiguous(), tensor_scale, None, get_format(fmt.scale_format),
                            torch.Size([nblocks]), torch.float32, tensor_scale_blocksize(nblocks))
    scales = NestedScales(inner, torch.zeros((), dtype=torch.float32, device=codes.device))
    return QuantizedTensor(packed, scales, None, fmt, shape, dtype, fmt.fixed_blocksize)


def quantize_microscaling(x: torch.Tensor, fmt: Format | str) -> QuantizedTensor:
    """x (float, contiguous, finite) quantized in mxfp4 or nvfp4 (see the module docstring)."""
    fmt = get_format(fmt)
    if fmt.scale_format not in ("_e8m0", "_e4m3"):
        raise ValueError(f"{fmt.name!r} is not a microscaling format")
    bs = fmt.fixed_blocksize
    blocks = finite_blocks(x, bs)
    numel, nblocks, flat = x.numel(), blocks.shape[0], blocks.reshape(-1)
    amax = blocks.abs().amax(dim=1)
    positive = torch.tensor(fmt.values[:8], dtype=torch.float64, device=x.device)
    tensor_scale = tensor_scale_of(flat, fmt)
    scale_codes = block_scale_codes(amax, fmt, tensor_scale)
    block_scale = scale_values(scale_codes, fmt, tensor_scale).to(torch.float64)
    codes = torch.empty(nblocks * bs, dtype=torch.int64, device=x.device)
    rows = max(1, _CHUNK // bs)
    for b0 in range(0, nblocks, rows):
        b1 = min(nblocks, b0 + rows)
        sc = block_scale[b0:b1, None]
        ratio = blocks[b0:b1].to(torch.float64) / torch.where(sc > 0, sc, torch.ones_like(sc))
        ratio = torch.where(sc > 0, ratio, torch.copysign(torch.zeros_like(ratio), ratio))
        codes[b0 * bs:b1 * bs] = e2m1_codes(ratio, positive).reshape(-1)
    return microscaling_tensor(codes[:numel], scale_codes, tensor_scale, fmt, x.shape, x.dtype)
