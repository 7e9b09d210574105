"""Properties of qengine.qat.fake_quantize / FakeQuantLinear and of the 2:4 sparse layout over
generated shapes, dtypes, block sizes (valid and not), formats (incl. user codebooks), values
(NaN, +-Inf, subnormals, +-0, huge, equal blocks) and views: the documented exception, or the
float64 reference (fake_quantize: the reference quantize -> dequantize bit for bit, gradient
the identity, or zero outside the clip range; 2:4: reference dequantize bit for bit, matmul
within the accumulation bound); inputs are never modified."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import qengine
import reference as R
from checks import check_raises, matmul_bound, quantize_error
from profiles import PROFILE
from qengine.qat import FakeQuantLinear, fake_quantize
from sparse_reference import ref_sparse_dequantize
from strategies import (any_dtypes, blocksizes, formats, make_values, make_view, shapes, unchanged, value_specs,
                        views)

HALF_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _clip_reference(w: torch.Tensor, bs: int, clip: float) -> torch.Tensor:
    """w clamped to +-clip * (its block's max |w|), blocks of bs over the flat tensor (float32)."""
    flat = w.reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = torch.cat([flat.abs(), flat.new_zeros((-n) % bs)]).reshape(-1, bs)
    bound = (blocks.amax(1) * torch.tensor(clip, dtype=torch.float32)).repeat_interleave(bs)[:n]
    return torch.maximum(torch.minimum(flat, bound), -bound).to(w.dtype).reshape(w.shape), flat.abs() <= bound


@PROFILE
@given(shape=shapes(), dtype=any_dtypes(), bs=blocksizes(), fmt=formats(), dq=st.booleans(), spec=value_specs(),
       view=views(), clip=st.sampled_from([1.0, 1.0, 1.0, 0.9, 0.5]), gseed=st.integers(0, 2**31 - 1))
def test_fake_quantize_matches_reference_or_raises(shape, dtype, bs, fmt, dq, spec, view, clip, gseed):
    w = make_view(make_values(spec, shape, dtype), view)
    before, stride = w.clone(), w.stride()
    absmax = qengine.get_format(fmt).rule == "absmax"
    if clip < 1 and not absmax:
        clip = 1.0
    # fake_quantize takes any view (it copies a non-contiguous one) and checks, in order: the
    # dtype, the block size, emptiness, finiteness; then quantize's own conditions.
    if not dtype.is_floating_point or dtype == torch.float64:
        expected = (TypeError, r"w must be float32, float16 or bfloat16")
    elif bs is not None and (isinstance(bs, bool) or not isinstance(bs, int)):
        expected = (TypeError, r"blocksize must be an int")
    elif bs is not None and (bs < 32 or bs > 4096 or bs & (bs - 1)):
        expected = (ValueError, r"blocksize must be a power of two")
    elif w.numel() == 0:
        expected = (ValueError, r"cannot fake-quantize an empty tensor")
    elif not torch.isfinite(w).all():
        expected = (ValueError, r"w contains NaN or Inf")
    else:  # (of the clamped weights when clip < 1)
        rbs = (w.shape[-1] if w.dim() else 1) if bs is None else bs
        expected = quantize_error(_clip_reference(w.contiguous(), rbs, clip)[0] if clip < 1 else w.contiguous(),
                                  fmt, bs, dq)
    if expected is not None:
        check_raises(expected, fake_quantize, w, fmt, bs, dq, clip)
    else:
        wg = w.detach().requires_grad_(True)
        y = fake_quantize(wg, fmt, bs, dq, clip)
        rbs = (w.shape[-1] if w.dim() else 1) if bs is None else bs
        wc, inside = _clip_reference(w.contiguous(), rbs, clip) if clip < 1 else (w.contiguous(), None)
        want = R.dequantize(R.quantize(wc, fmt, bs, dq), dtype).reshape(w.shape)
        assert y.dtype == dtype and y.shape == w.shape
        assert torch.equal(y.detach(), want), "fake_quantize differs from the reference quantize -> dequantize"
        gy = torch.randn(w.shape, generator=torch.Generator().manual_seed(gseed)).to(dtype)
        y.backward(gy)
        gref = gy if inside is None else gy * inside.reshape(w.shape).to(dtype)
        assert torch.equal(wg.grad, gref), "the straight-through gradient is not the identity (inside the clip)"
    assert unchanged(w, before, stride), "fake_quantize modified its input"


@PROFILE
@given(n=st.sampled_from([1, 3, 17, 64]) | st.integers(1, 80), k=st.sampled_from([1, 7, 32, 33, 64, 129]),
       fmt=formats(), bs=blocksizes(allow_invalid=False), dq=st.booleans(), bias=st.booleans(),
       wspec=value_specs(allow_nonfinite=False, allow_huge=False), rows=st.sampled_from([1, 2, 5, 17, 40]),
       xdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), xseed=st.integers(0, 2**31 - 1))
def test_fake_quant_linear_forward(n, k, fmt, bs, dq, bias, wspec, rows, xdtype, xseed):
    """y = x @ fq(W)^T + b, fq(W) the reference quantize -> dequantize of W (float32)."""
    wspec.log2_scale = max(-8, min(8, wspec.log2_scale))
    lin = torch.nn.Linear(k, n, bias=bias)
    g = torch.Generator().manual_seed(xseed)
    with torch.no_grad():
        lin.weight.copy_(make_values(wspec, (n, k), torch.float32))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    if qengine.get_format(fmt).rule == "minmax" and lin.weight.abs().max() > 1e30:
        return
    layer = FakeQuantLinear.from_linear(lin, fmt, bs, dq)
    assert layer.weight is lin.weight
    x = torch.randn(rows, k, generator=g).to(xdtype)
    xb = x.clone()
    y = layer(x)
    w64 = R.dequantize(R.quantize(lin.weight.detach(), fmt, bs, dq), torch.float32).to(xdtype).double()
    x64 = x.double()
    ref = x64 @ w64.t()
    extra = torch.zeros(())
    if bias:
        b64 = lin.bias.detach().to(xdtype).double()
        ref, extra = ref + b64, b64.abs()
    err = (y.double() - ref).abs()
    bound = matmul_bound(x64, w64, xdtype, extra)
    top = torch.finfo(xdtype).max
    over = torch.isinf(y.double()) & (ref.abs() + bound >= top)
    assert ((err <= bound) | over).all(), f"max error {err[~over].max().item():.3g}"
    assert unchanged(x, xb, xb.stride())


@PROFILE
@given(rows=st.lists(st.sampled_from([1, 2, 3, 5, 7, 13]), min_size=0, max_size=2).map(tuple),
       k=st.sampled_from([4, 8, 12, 64, 128, 132, 256, 260, 516]) | st.integers(1, 40),
       dtype=any_dtypes(), bs=blocksizes(allow_invalid=False), fmt=formats(), dq=st.booleans(),
       spec=value_specs(allow_huge=False), xdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       xrows=st.sampled_from([1, 3, 16, 17, 33]), xseed=st.integers(0, 2**31 - 1))
def test_sparse24_matches_reference_or_raises(rows, k, dtype, bs, fmt, dq, spec, xdtype, xrows, xseed):
    shape = (*rows, k)
    x = make_values(spec, shape, dtype)
    before, stride = x.clone(), x.stride()
    expected = quantize_error(x, fmt, bs, dq) if dtype.is_floating_point else (TypeError, r"x must be float32")
    if k % 4 and (expected is None or expected[0] is not TypeError and "empty" not in expected[1]):
        expected = (ValueError, r"sparsity='2:4' needs the last dimension \(in_features\) divisible by 4")
    if expected is not None and "NaN or Inf" in expected[1]:
        expected = (ValueError, r"NaN or Inf")
    if expected is not None and expected[0] is ValueError and "overflow" in expected[1]:
        expected = None  # the kept half may not overflow: decided by the reference below
    if expected is not None:
        check_raises(expected, qengine.quantize, x, fmt, bs, dq, sparsity="2:4")
        assert unchanged(x, before, stride)
        return
    try:  # (decoded float16 values may round past 65504 to inf, in the library as here)
        want = ref_sparse_dequantize(x, fmt, bs, dq, dtype)
        ref_ok = bool(torch.isfinite(ref_sparse_dequantize(x, fmt, bs, dq, torch.float32)).all())
    except (ValueError, RuntimeError):
        ref_ok = False
    if not ref_ok:  # scales past float32 in the reference: quantize must refuse, not return garbage
        check_raises((ValueError, r"overflow|double quantization"), qengine.quantize, x, fmt, bs, dq, sparsity="2:4")
        return
    q = qengine.quantize(x, fmt, bs, dq, sparsity="2:4")
    assert q.layout == "2:4" and q.shape == x.shape
    assert torch.equal(q.dequantize(), want), "2:4 dequantize differs from the reference"
    assert unchanged(x, before, stride), "quantize modified its input"
    # weights inside every x dtype's range (more than 16 half rows hold the weight in x's dtype)
    if len(shape) == 2 and x.dtype == torch.float32 and float(x.abs().max()) < 2.0**12:
        g = torch.Generator().manual_seed(xseed)
        xin = torch.randn(xrows, k, generator=g).to(xdtype)
        y = qengine.matmul(xin, q)
        w64 = want.to(torch.float32).double()
        x64 = xin.double()
        ref = x64 @ w64.t()
        err = (y.double() - ref).abs()
        bound = matmul_bound(x64, w64, xdtype)
        over = torch.isinf(y.double()) & (ref.abs() + bound >= torch.finfo(xdtype).max)
        assert ((err <= bound) | over).all(), f"2:4 matmul: max error {err[~over].max().item():.3g}"
