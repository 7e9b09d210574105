"""Invalid arguments raise TypeError / ValueError before any kernel runs, and inputs are
never modified (also when the call fails)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qengine
from cases import DTYPES, FORMAT_NAMES, fmt_of, make_input


def unchanged(x: torch.Tensor, before: torch.Tensor) -> bool:
    """Exact equality where NaN equals NaN (same positions)."""
    if x.is_floating_point():
        return torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(0.0), before.nan_to_num(0.0))
    return torch.equal(x, before)


def quantize_fails(exc, x, *args, **kwargs):
    before = x.clone()
    with pytest.raises(exc):
        qengine.quantize(x, *args, **kwargs)
    assert unchanged(x, before)


# ---------------------------------------------------------------------------- non-finite
NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("position", ["first", "middle", "last", "partial_block"])
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["nf4", "int8", "uint4", "cb200"])
def test_non_finite_input(fmt, dtype, bad, position):
    x = make_input((1000,), dtype)
    idx = {"first": 0, "middle": 517, "last": 999, "partial_block": 990}[position]
    x[idx] = bad
    quantize_fails(ValueError, x, fmt_of(fmt), 64)


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_input_large_and_threaded(bad):
    x = torch.randn(512, 1024)
    x[400, 1000] = bad
    quantize_fails(ValueError, x, "nf4", 64)
    quantize_fails(ValueError, x, "nf4", 64, double_quant=True)
    quantize_fails(ValueError, x, "uint8", None)


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_input_fit_codebook(bad):
    x = torch.randn(64, 64)
    x[63, 63] = bad
    before = x.clone()
    with pytest.raises(ValueError):
        qengine.fit_codebook(x)
    assert unchanged(x, before)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), pos=st.data(), bad=st.sampled_from(NONFINITE), fmt=st.sampled_from(FORMAT_NAMES),
       blocksize=st.sampled_from([32, 64, None]))
def test_non_finite_anywhere(n, pos, bad, fmt, blocksize):
    x = torch.randn(n)
    x[pos.draw(st.integers(0, n - 1))] = bad
    with pytest.raises(ValueError):
        qengine.quantize(x, fmt_of(fmt), blocksize)


# ---------------------------------------------------------------------------- empty, dtype, layout
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 64)])
@pytest.mark.parametrize("blocksize", [64, None])
def test_empty_tensor(shape, blocksize):
    quantize_fails(ValueError, torch.empty(shape), "nf4", blocksize)


def test_empty_tensor_fit_codebook():
    with pytest.raises(ValueError):
        qengine.fit_codebook(torch.empty(0, 64))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool])
def test_integer_dtype(dtype):
    quantize_fails(TypeError, torch.ones(128, dtype=dtype), "nf4", 64)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_dtype(dtype):
    quantize_fails(TypeError, torch.ones(128, dtype=dtype), "nf4", 64)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64])
def test_fit_codebook_bad_dtype(dtype):
    with pytest.raises(TypeError):
        qengine.fit_codebook(torch.ones(128, dtype=dtype))


@pytest.mark.parametrize("obj", [[1.0, 2.0], 3.0, None, "tensor"], ids=["list", "float", "None", "str"])
def test_not_a_tensor(obj):
    with pytest.raises(TypeError):
        qengine.quantize(obj, "nf4", 64)


@pytest.mark.parametrize("view", ["transposed", "strided", "expanded", "permuted"])
def test_non_contiguous(view):
    base = torch.randn(64, 128)
    x = {
        "transposed": base.t(),
        "strided": base[:, ::2],
        "expanded": torch.randn(1, 128).expand(64, 128),
        "permuted": torch.randn(4, 8, 32).permute(2, 0, 1),
    }[view]
    assert not x.is_contiguous()
    quantize_fails(ValueError, x, "nf4", 64)
    quantize_fails(ValueError, x, "nf4", None)


# ---------------------------------------------------------------------------- block size, format
@pytest.mark.parametrize("blocksize", [0, 1, 2, 16, 31, 33, 48, 96, 100, 1000, 4095, 4097, 8192, -64])
def test_bad_blocksize(blocksize):
    quantize_fails(ValueError, torch.randn(8192), "nf4", blocksize)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_valid_blocksize(blocksize):
    q = qengine.quantize(torch.randn(5000), "nf4", blocksize)
    assert q.blocksize == blocksize and q.scales.numel() == -(-5000 // blocksize)


@pytest.mark.parametrize("blocksize", [64.0, "64", True])
def test_blocksize_of_wrong_type(blocksize):
    with pytest.raises((TypeError, ValueError)):
        qengine.quantize(torch.randn(128), "nf4", blocksize)


@pytest.mark.parametrize("name", ["nf5", "", "float8", "NF4 "])
def test_unknown_format(name):
    quantize_fails(ValueError, torch.randn(128), name, 64)


def test_double_quant_must_be_bool():
    with pytest.raises(TypeError):
        qengine.quantize(torch.randn(128), "nf4", 64, double_quant="yes")


# ---------------------------------------------------------------------------- dequantize(out=...)
@pytest.fixture
def q():
    return qengine.quantize(torch.randn(16, 64), "nf4", 64)


@pytest.mark.parametrize("shape", [(16, 63), (64, 16), (1024,), (16, 64, 1)])
def test_out_wrong_shape(q, shape):
    out = torch.zeros(shape)
    with pytest.raises(ValueError):
        q.dequantize(out=out)
    assert torch.equal(out, torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.complex64])
def test_out_wrong_dtype(q, dtype):
    out = torch.zeros(16, 64, dtype=dtype)
    with pytest.raises((TypeError, ValueError)):
        q.dequantize(out=out)
    assert torch.equal(out, torch.zeros(16, 64, dtype=dtype))


def test_out_non_contiguous(q):
    out = torch.zeros(64, 16).t()
    assert out.shape == (16, 64) and not out.is_contiguous()
    with pytest.raises((TypeError, ValueError)):
        q.dequantize(out=out)
    assert torch.equal(out, torch.zeros(16, 64))


def test_out_dtype_conflict(q):
    with pytest.raises(ValueError):
        q.dequantize(dtype=torch.float16, out=torch.zeros(16, 64, dtype=torch.float32))


def test_out_not_a_tensor(q):
    with pytest.raises((TypeError, ValueError)):
        q.dequantize(out=[0.0] * 1024)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8])
def test_dequantize_bad_dtype(q, dtype):
    with pytest.raises(TypeError):
        q.dequantize(dtype)


def test_dequantize_not_a_quantized_tensor():
    with pytest.raises(TypeError):
        qengine.dequantize(torch.randn(4))


def test_dequantize_leaves_the_quantized_tensor_alone():
    q = qengine.quantize(torch.randn(100, 64), "uint4", 64, double_quant=True)
    parts = [q.packed, q.scales.quantized.packed, q.scales.quantized.scales, q.scales.mean, q.offsets.quantized.packed]
    before = [p.clone() for p in parts]
    q.dequantize()
    q.dequantize(torch.bfloat16, out=torch.empty(100, 64, dtype=torch.bfloat16))
    assert all(torch.equal(p, b) for p, b in zip(parts, before))


# ---------------------------------------------------------------------------- the ops themselves
def test_op_rejects_short_tables():
    """The op layer re-checks every buffer a kernel will read."""
    fmt = qengine.get_format("nf4")
    table, mids, order = fmt.kernel_tables("cpu")[:3]
    x = torch.randn(128)
    args = list(fmt.kernel_tables("cpu"))
    extra = args[3:]  # optional tables of newer builds (e.g. a search grid), passed through
    with pytest.raises(ValueError):
        torch.ops.qengine.quantize_blockwise(x, table[:8], mids, order, *extra, 4, 64, 0, True)
    with pytest.raises(ValueError):
        torch.ops.qengine.quantize_blockwise(x, table, mids[:15], order, *extra, 4, 64, 0, True)
    with pytest.raises(TypeError):
        torch.ops.qengine.quantize_blockwise(x, table, mids, order.to(torch.int32), *extra, 4, 64, 0, True)


def test_op_rejects_inconsistent_dequantize_args():
    q = qengine.quantize(torch.randn(1000), "nf4", 64)
    table = q.format.kernel_tables("cpu")[0]
    deq = torch.ops.qengine.dequantize_blockwise
    with pytest.raises(ValueError):  # packed too short for numel
        deq(q.packed[:-1], table, q.scales, None, 4, 64, 1000, torch.float32)
    with pytest.raises(ValueError):  # numel larger than the packed codes
        deq(q.packed, table, q.scales, None, 4, 64, 1002, torch.float32)
    with pytest.raises(ValueError):  # scales too short
        deq(q.packed, table, q.scales[:-1], None, 4, 64, 1000, torch.float32)
    with pytest.raises(ValueError):  # blocksize implying more blocks than scales
        deq(q.packed, table, q.scales, None, 4, 32, 1000, torch.float32)
    with pytest.raises(ValueError):  # table of the wrong size for the bit width
        deq(q.packed, table, q.scales, None, 8, 64, 500, torch.float32)
    with pytest.raises(TypeError):
        deq(q.packed.to(torch.int8), table, q.scales, None, 4, 64, 1000, torch.float32)
    with pytest.raises(ValueError):
        deq(q.packed, table, q.scales, None, 4, 0, 1000, torch.float32)
    out = torch.empty(999)
    with pytest.raises(ValueError):
        torch.ops.qengine.dequantize_blockwise_out(q.packed, table, q.scales, None, 4, 64, 1000, out)


# ---------------------------------------------------------------------------- inputs untouched
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_inputs_never_modified(fmt):
    for dtype in DTYPES:
        for blocksize in (32, None):
            x = make_input((33, 65), dtype)
            before = x.clone()
            qengine.quantize(x, fmt_of(fmt), blocksize, double_quant=True)
            assert torch.equal(x, before)


def test_fit_codebook_does_not_modify_input():
    x = make_input((64, 128), torch.bfloat16)
    before = x.clone()
    qengine.fit_codebook(x, bits=4, blocksize=64)
    qengine.fit_codebook(x, bits=8, blocksize=64, rule="minmax", iters=3)
    assert torch.equal(x, before)


@pytest.mark.parametrize("kwargs", [{"bits": 3}, {"bits": 16}, {"rule": "symmetric"}, {"iters": 0},
                                    {"blocksize": 48}])
def test_fit_codebook_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        qengine.fit_codebook(torch.randn(64, 64), **kwargs)


@pytest.mark.parametrize("op", ["dequantize_cpu", "dequantize_range_cpu", "dequantize_columns_cpu",
                                "sparse24_dequantize_cpu"])
def test_native_dequantize_refuses_unknown_dtype_codes(op):
    """An output dtype code the native side does not know raises before anything is written."""
    from qengine import _C
    from support import native_ref

    q = qengine.quantize(torch.randn(16, 256), "nf4", 64, double_quant=True,
                         sparsity="2:4" if op.startswith("sparse24") else None)
    kw, weight = native_ref(q)  # noqa: F841 (kw keeps the weight's tensors alive)
    out = torch.full((16 * 256,), 7.0)
    with pytest.raises(ValueError):
        if op == "dequantize_cpu":
            _C.dequantize_cpu(weight, out.numel(), out.data_ptr(), 3, False)
        elif op == "dequantize_range_cpu":
            _C.dequantize_range_cpu(weight, 0, out.numel(), out.data_ptr(), 3)
        elif op == "dequantize_columns_cpu":
            _C.dequantize_columns_cpu(weight, 16, 256, 0, 256, out.data_ptr(), 3)
        else:
            _C.sparse24_dequantize_cpu(weight, out.numel() // 2, out.data_ptr(), 3)
    assert (out == 7.0).all()  # nothing written


@pytest.mark.parametrize("rows, k, k0, cols", [(16, 256, -1, 8), (16, 256, 0, -1), (16, 256, 250, 7), (16, 256, 257, 0),
                                              (-1, 256, 0, 8), (17, 256, 0, 8), (1 << 62, 1 << 10, 0, 8)])
def test_native_dequantize_columns_refuses_bad_ranges(rows, k, k0, cols):
    """Columns outside [0, K), negative counts, more rows than the weight holds and a rows * K
    that overflows raise ValueError before anything is written."""
    from qengine import _C
    from support import native_ref

    q = qengine.quantize(torch.randn(16, 256), "nf4", 64, double_quant=True)
    kw, weight = native_ref(q)  # noqa: F841 (kw keeps the weight's tensors alive)
    out = torch.full((16 * 256,), 7.0)
    with pytest.raises(ValueError):
        _C.dequantize_columns_cpu(weight, rows, k, k0, cols, out.data_ptr(), 1)
    assert (out == 7.0).all()


def test_native_products_refuse_dimensions_whose_product_overflows():
    """N * K that would wrap int64 (or pass what the WeightRef checks can count) raises ValueError
    in the binding: a wrapped count would let the weight's buffer checks pass a buffer shorter
    than what the kernel reads."""
    from qengine import _C
    from support import native_ref

    q = qengine.quantize(torch.randn(16, 256), "nf4", 64, double_quant=True)
    kw, weight = native_ref(q)  # noqa: F841 (kw keeps the weight's tensors alive)
    x, y = torch.zeros(1, 256), torch.full((16,), 7.0)
    huge = 1 << 40
    with pytest.raises(ValueError, match="overflows"):
        _C.matmul_cpu(x.data_ptr(), 0, 1, huge, huge, huge, weight, y.data_ptr())
    with pytest.raises(ValueError, match="overflows"):
        _C.dequantize_columns_cpu(weight, huge, huge, 0, 8, y.data_ptr(), 0)
    assert (y == 7.0).all()
