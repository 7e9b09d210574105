"""Properties of quantize / dequantize over generated shapes, dtypes, block sizes (valid and
not), formats (incl. user codebooks), values (NaN, +-Inf, subnormals, +-0, huge, equal
blocks) and views: the documented exception, or bytes equal to the float64 reference; the
input is never modified."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import qengine
import reference as R
from checks import assert_quantized_equal, check_raises, quantize_error
from profiles import PROFILE
from strategies import (any_dtypes, blocksizes, formats, make_values, make_view, shapes, unchanged, value_specs,
                        views)


@PROFILE
@given(shape=shapes(), dtype=any_dtypes(), bs=blocksizes(), fmt=formats(), dq=st.booleans(), spec=value_specs(),
       view=views())
def test_quantize_matches_reference_or_raises(shape, dtype, bs, fmt, dq, spec, view):
    x = make_view(make_values(spec, shape, dtype), view)
    before, stride = x.clone(), x.stride()
    expected = quantize_error(x, fmt, bs, dq)
    if expected is not None:
        check_raises(expected, qengine.quantize, x, fmt, bs, double_quant=dq)
    else:
        q = qengine.quantize(x, fmt, bs, double_quant=dq)
        assert_quantized_equal(q, R.quantize(x, fmt, bs, dq), x)
    assert unchanged(x, before, stride), "quantize modified its input"


@PROFILE
@given(shape=shapes(allow_empty=False), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       bs=blocksizes(allow_invalid=False), fmt=formats(), dq=st.booleans(),
       spec=value_specs(allow_nonfinite=False, allow_huge=False), out_case=st.sampled_from(
           ["none", "good", "good_f32", "wrong_shape", "wrong_dtype", "non_contiguous", "conflict"]))
def test_dequantize_out_matches_reference_or_raises(shape, dtype, bs, fmt, dq, spec, out_case):
    x = make_values(spec, shape, dtype)
    q = qengine.quantize(x, fmt, bs, double_quant=dq)
    r = R.quantize(x, fmt, bs, dq)
    packed_before = q.packed.clone()
    if out_case == "none":
        assert torch.equal(qengine.dequantize(q), R.dequantize(r))
    elif out_case in ("good", "good_f32"):
        odt = dtype if out_case == "good" else torch.float32
        out = torch.full(shape, float("nan"), dtype=odt)
        assert qengine.dequantize(q, out=out) is out
        assert torch.equal(out, R.dequantize(r, odt))
    elif out_case == "wrong_shape":
        out = torch.empty(x.numel() + 1, dtype=dtype)
        check_raises((ValueError, r"out must have shape"), qengine.dequantize, q, out=out)
    elif out_case == "wrong_dtype":
        out = torch.empty(shape, dtype=torch.float64)
        check_raises((TypeError, r"out must be float32"), qengine.dequantize, q, out=out)
    elif out_case == "non_contiguous":
        out = torch.empty(*shape[:-1], shape[-1] * 2, dtype=dtype)[..., ::2]
        if out.is_contiguous():  # e.g. a [1, 1] slice: then it is a good buffer
            assert torch.equal(qengine.dequantize(q, out=out), R.dequantize(r, dtype))
        else:
            check_raises((ValueError, r"out must be contiguous"), qengine.dequantize, q, out=out)
    else:
        out = torch.empty(shape, dtype=torch.float32)
        check_raises((ValueError, r"conflicts with out.dtype"), qengine.dequantize, q, torch.float16, out=out)
    assert torch.equal(q.packed, packed_before)
