"""The properties' oracle: which documented exception an input must raise (predicted from the
input alone, in the order the API checks), and exact comparison with tests/reference.py."""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch

import qengine
import reference as R

Expected = Optional[tuple[type, str]]  # (exception class, regex its message must match)


def quantize_error(x: torch.Tensor, fmt, blocksize, double_quant: bool) -> Expected:
    """The error qengine.quantize must raise for these arguments, or None."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return TypeError, r"x must be float32, float16 or bfloat16"
    if not x.is_contiguous():
        return ValueError, r"x must be contiguous"
    if x.numel() == 0:
        return ValueError, r"empty tensor"
    if blocksize is not None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int):
            return TypeError, r"blocksize must be an int"
        if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
            return ValueError, r"blocksize must be a power of two"
    if not torch.isfinite(x).all():
        return ValueError, r"NaN or Inf"
    r = R.quantize(x, fmt, blocksize, False)
    if not torch.isfinite(r.scales).all():  # minmax: max - min past float32
        return ValueError, r"overflows float32"
    if double_quant:
        for part in (r.scales, r.offsets):
            if part is not None and not torch.isfinite(part - part.mean()).all():
                return ValueError, r"double quantization"
    return None


def check_raises(expected: tuple[type, str], fn: Callable, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the class is checked exactly below
        assert type(e) is expected[0], f"expected {expected[0].__name__}, got {type(e).__name__}: {e}"
        assert re.search(expected[1], str(e)), f"message {str(e)!r} does not match {expected[1]!r}"
        return
    raise AssertionError(f"no exception; expected {expected[0].__name__} matching {expected[1]!r}")


def assert_quantized_equal(q: qengine.QuantizedTensor, r: R.RefQuantized, x: torch.Tensor) -> None:
    """Packed codes byte for byte, scales/offsets (or their nested parts) bit for bit (minmax
    parts may differ in the sign of a zero, which the spec leaves open), and every dequantized
    dtype equal to the reference."""
    fmt = qengine.get_format(q.format)
    absmax = fmt.rule == "absmax"
    assert q.shape == x.shape and q.dtype == x.dtype
    assert torch.equal(q.packed, r.packed), "packed codes differ from the reference"
    for part, rpart, rnest in ((q.scales, r.scales, r.nested_scales), (q.offsets, r.offsets, r.nested_offsets)):
        if rpart is None:
            assert part is None
            continue
        if rnest is None:
            assert R.same_bits(part, rpart, signed_zeros=absmax and part is q.scales), "scales/offsets differ"
        else:
            inner = part.quantized
            assert torch.equal(inner.packed, rnest.quantized.packed), "nested codes differ"
            assert R.same_bits(inner.scales, rnest.quantized.scales), "nested scales differ"
            assert R.same_bits(part.mean.reshape(()), rnest.mean.reshape(())), "nested mean differs"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got, want = q.dequantize(dtype), R.dequantize(r, dtype)
        assert torch.equal(got, want), f"dequantize({dtype}) differs from the reference"


def matmul_bound(x64: torch.Tensor, w64: torch.Tensor, dtype: torch.dtype, extra=0.0,
                 roundings: int = 2) -> torch.Tensor:
    """tests/test_matmul.py's bound: float32 accumulation over K (~sqrt(K) * eps) plus the
    rounding of the output to `dtype`, on the magnitude |x| @ |W|^T (+ extra terms).

    For float16/bfloat16 x the rounding term counts twice: more than 16 rows (and bfloat16 on
    AVX512-BF16) hold the weight at x's precision, as dense half-precision F.linear does, and
    the output is rounded again. With K = 1 nothing averages out, and one term was exceeded
    (found by the property test, n = k = 1, 17 float16 rows). With LoRA on that path the base
    product and the side path are rounded to x's dtype separately before their sum
    (roundings=3; found with k = 1, 18 float16 rows)."""
    k = x64.shape[-1]
    mag = x64.abs() @ w64.abs().t() + extra
    eps_out = {torch.float32: 2.0**-24, torch.float16: roundings * 2.0**-11, torch.bfloat16: roundings * 2.0**-8}[dtype]
    return 8 * max(k, 1) ** 0.5 * 2.0**-24 * mag + eps_out * mag + underflow(x64, dtype)


def underflow(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Absolute error of results (and weights held at x's precision) in the subnormal range
    of `dtype`: one subnormal spacing per unit of sum |x| (e.g. float16 outputs of 1e-37
    weights are 0, as dense float16 F.linear gives). bfloat16 GEMMs (torch's dense path on
    AVX512-BF16 CPUs, vdpbf16ps) treat subnormal products as zero: up to the smallest normal
    per product term (found by the property test: 1e-37 weights, 40 bfloat16 rows)."""
    info = torch.finfo(dtype)
    bound = (x64.abs().sum(-1, keepdim=True) + 1) * info.smallest_normal * info.eps
    if dtype == torch.bfloat16:
        bound = bound + x64.shape[-1] * info.smallest_normal
    return bound
