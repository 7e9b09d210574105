"""Properties of qengine.matmul (bias, LoRA, double quant, every format incl. user codebooks,
views of x, batch shapes incl. empty, the x gradient): the documented exception, or a result
within tests/test_matmul.py's bound of the float64 product with the reference weight; inputs
never modified."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import qengine
import reference as R
from checks import check_raises, matmul_bound, underflow
from profiles import PROFILE
from strategies import any_dtypes, blocksizes, formats, make_values, make_view, unchanged, value_specs

DIM = st.sampled_from([1, 2, 3, 7, 16, 31, 33, 64, 127, 128, 129, 200, 256, 384]) | st.integers(1, 300)
BATCH = st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 9, 16, 17]), min_size=0, max_size=2).map(tuple)


@PROFILE
@given(n=DIM, k=DIM, fmt=formats(), bs=blocksizes(allow_invalid=False), dq=st.booleans(),
       wspec=value_specs(allow_nonfinite=False, allow_huge=False), batch=BATCH, xdtype=any_dtypes(),
       xview=st.sampled_from(["contiguous", "offset", "transposed", "strided"]),
       xseed=st.integers(0, 2**31 - 1), k_delta=st.sampled_from([0] * 12 + [-1, 1]),
       bias_case=st.sampled_from(["none", "none", "good", "wrong"]),
       lora_case=st.sampled_from(["none", "none", "good", "good_half", "wrong_shape", "no_scale"]),
       rank=st.integers(1, 8), grad=st.booleans())
def test_matmul_matches_reference_or_raises(n, k, fmt, bs, dq, wspec, batch, xdtype, xview, xseed, k_delta,
                                            bias_case, lora_case, rank, grad):
    wspec.log2_scale = max(-8, min(8, wspec.log2_scale))  # products stay far from float32 limits
    w = make_values(wspec, (n, k), torch.float32)
    if not torch.isfinite(w).all() or (qengine.get_format(fmt).rule == "minmax" and w.abs().max() > 1e30):
        return
    q = qengine.quantize(w, fmt, bs, double_quant=dq)
    g = torch.Generator().manual_seed(xseed)
    kx = max(k + k_delta, 1)
    x = torch.randn(*batch, kx, generator=g)
    x = make_view(x.to(xdtype) if xdtype.is_floating_point or xdtype.is_complex else (x * 10).to(xdtype), xview)
    a = b = bias = None
    lora = None
    fdtype = xdtype if xdtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    if lora_case != "none":
        adt = torch.bfloat16 if lora_case == "good_half" else fdtype
        a = (torch.randn(rank, k if lora_case != "wrong_shape" else k + 1, generator=g) * 0.1).to(adt)
        b = (torch.randn(n, rank, generator=g) * 0.1).to(adt)
        lora = (a, b, 0.75) if lora_case != "no_scale" else (a, b)
    if bias_case != "none":
        bias = torch.randn(n if bias_case == "good" else n + 1, generator=g).to(fdtype)
    inputs = [t for t in (x, a, b, bias) if t is not None]
    saved = [(t.clone(), t.stride()) for t in inputs]
    packed_before = q.packed.clone()

    if xdtype not in (torch.float32, torch.float16, torch.bfloat16):
        expected = (TypeError, r"x must be float32")
    elif kx != k:
        expected = (ValueError, r"x must end in in_features")
    elif lora_case == "no_scale":
        expected = (TypeError, r"lora must be a tuple")
    elif lora_case == "wrong_shape":
        expected = (ValueError, r"LoRA shapes")
    elif bias_case == "wrong":
        expected = (ValueError, r"bias must have shape")
    else:
        expected = None

    if expected is not None:
        check_raises(expected, qengine.matmul, x, q, bias, lora)
    else:
        xg = x.detach().requires_grad_(grad)
        y = qengine.matmul(xg, q, bias, lora)
        assert y.shape == (*batch, n) and y.dtype == xdtype
        w64 = R.dequantize(R.quantize(w, fmt, bs, dq), torch.float32).to(torch.float64)
        x64 = x.to(torch.float64).reshape(-1, k)
        ref = x64 @ w64.t()
        extra = torch.zeros(())
        if lora is not None:
            a64, b64 = a.to(torch.float64), b.to(torch.float64)
            ref = ref + 0.75 * (x64 @ a64.t()) @ b64.t()
            extra = 0.75 * (x64.abs() @ a64.abs().t()) @ b64.abs().t()
        if bias is not None:
            ref = ref + bias.to(torch.float64)
            extra = extra + bias.to(torch.float64).abs()
        y64 = y.detach().to(torch.float64).reshape(-1, n)
        # bias (added to the product already in x's dtype) and LoRA each round once more
        bound = matmul_bound(x64, w64, xdtype, extra, roundings=3 if lora is not None or bias is not None else 2)
        # A result past the dtype's range is +-inf, as in dense F.linear (float16: |y| > 65504).
        top = torch.finfo(xdtype).max
        overflow = torch.isinf(y64) & (ref.abs() + bound >= top) & (torch.sign(y64) == torch.sign(ref))
        err = (y64 - ref).abs()
        assert ((err <= bound) | overflow).all(), f"max error {err[~overflow].max().item():.3g}"
        if grad and y.numel() and not overflow.any():
            gy = torch.randn(y.shape, generator=g).to(xdtype)
            y.backward(gy)
            g64 = gy.to(torch.float64).reshape(-1, n)
            gref = g64 @ w64
            gmag = g64.abs() @ w64.abs()
            if lora is not None:
                gref = gref + 0.75 * (g64 @ b64) @ a64
                gmag = gmag + 0.75 * (g64.abs() @ b64.abs()) @ a64.abs()
            # as y's bound, with one more rounding of the summed gradient parts in x's dtype
            eps = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[xdtype]
            if lora is not None:  # the side path's gradient is rounded to x's dtype before the sum too
                eps *= 1.5
            tol = 8 * max(n, 1) ** 0.5 * 2.0**-24 * gmag + eps * gmag + underflow(g64, xdtype)
            got_g = xg.grad.to(torch.float64).reshape(-1, k)
            gerr = (got_g - gref).abs()
            # a gradient past x's dtype's range is +-inf (the sum over out_features overflows)
            gover = torch.isinf(got_g) & (gref.abs() + tol >= torch.finfo(xdtype).max)
            assert ((gerr <= tol) | gover).all(), f"max gradient error {gerr[~gover].max().item():.3g}"
    for t, (before, stride) in zip(inputs, saved):
        assert unchanged(t, before, stride), "matmul modified an input"
    assert torch.equal(q.packed, packed_before)
