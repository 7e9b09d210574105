"""Double quantization: the per-block scales (and offsets) quantized again with dynamic8,
blockwise 256, after subtracting their mean; and the storage accounting (bits_per_param)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import qengine
import reference as ref
from cases import FORMAT_NAMES, fmt_of, make_input
from qengine.tensor import NestedScales


def assert_nested_matches(part, rnest: ref.RefNested, nblocks: int):
    assert isinstance(part, NestedScales)
    inner = part.quantized
    assert inner.format.name == "dynamic8"
    assert inner.blocksize == 256
    assert inner.numel == nblocks and inner.shape == (nblocks,)
    assert inner.offsets is None and not inner.double_quant
    assert inner.packed.dtype == torch.uint8 and inner.packed.numel() == nblocks
    assert torch.equal(inner.packed, rnest.quantized.packed), "nested codes differ from the reference"
    assert ref.same_bits(inner.scales, rnest.quantized.scales), "nested scales differ from the reference"
    assert part.mean.dtype == torch.float32 and part.mean.numel() == 1
    assert ref.same_bits(part.mean.reshape(()), rnest.mean.reshape(())), "mean differs from the reference"
    values = part.values()
    assert values.dtype == torch.float32
    assert torch.equal(values, rnest.values), "decoded scales differ from the reference"


def check_double_quant(x, fmt, blocksize):
    q = qengine.quantize(x, fmt, blocksize, double_quant=True)
    r = ref.quantize(x, fmt, blocksize, double_quant=True)
    assert q.double_quant
    # The element codes come from the raw scales: identical to single quantization.
    plain = qengine.quantize(x, fmt, blocksize)
    assert torch.equal(q.packed, plain.packed)
    assert torch.equal(q.packed, r.packed)
    nblocks = plain.scales.numel()
    assert_nested_matches(q.scales, r.nested_scales, nblocks)
    if qengine.get_format(fmt).rule == "minmax":
        assert_nested_matches(q.offsets, r.nested_offsets, nblocks)
    else:
        assert q.offsets is None
    out = q.dequantize()
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out, ref.dequantize(r)), "dequantized values differ from the reference"
    assert torch.equal(q.dequantize(torch.float32), ref.dequantize(r, torch.float32))
    return q, r


@pytest.mark.parametrize("shape", [(7,), (257, 33), (2, 3, 31)])
@pytest.mark.parametrize("blocksize", [32, 64, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_double_quant_matches_reference(fmt, dtype, blocksize, shape):
    check_double_quant(make_input(shape, dtype), fmt_of(fmt), blocksize)


@pytest.mark.parametrize("fmt, blocksize", [("nf4", 64), ("fp4", 32), ("uint8", 32), ("cb200", 128)])
def test_double_quant_many_nested_blocks(fmt, blocksize):
    """512 x 1000 at block 64 has 8000 scales: 31 full nested blocks and a partial one."""
    check_double_quant(make_input((512, 1000), torch.float16), fmt_of(fmt), blocksize)


def test_single_scale_centres_to_zero():
    """One block: the mean is the scale itself, the nested block is all zeros."""
    x = make_input((40,), torch.float32)
    q, r = check_double_quant(x, "nf4", 64)
    assert torch.equal(q.scales.mean.reshape(()), x.abs().max())
    assert torch.equal(q.scales.values(), x.abs().amax().reshape(1))


def test_double_quant_of_zero_blocks():
    x = torch.zeros(64 * 300)
    x[64 * 7 + 3] = 1.5
    check_double_quant(x, "nf4", 64)
    check_double_quant(x, "uint4", 64)


# ---------------------------------------------------------------------------- dynamic8 directly
@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 4096 + 17])
def test_dynamic8_matches_reference(n):
    x = torch.randn(n) * torch.exp(torch.randn(n))
    q = qengine.quantize(x, "dynamic8", 256)
    r = ref.quantize(x, "dynamic8", 256)
    assert torch.equal(q.packed, r.packed)
    assert ref.same_bits(q.scales, r.scales)
    assert torch.equal(q.dequantize(), ref.dequantize(r))


def test_dynamic8_codes_are_nearest_up_to_grid_resolution():
    """Whatever the search rule, a dynamic8 code is the nearest value up to the 65536-point
    grid over [-1, 1]: v lies within half a step (1/65535) of its grid point p, so
    |v - c(p)| <= |p - c(p)| + 1/65535 <= |p - c(v)| + 1/65535 <= |v - c(v)| + 2/65535."""
    x = torch.randn(256 * 64)
    q = qengine.quantize(x, "dynamic8", 256)
    values = torch.tensor(qengine.get_format("dynamic8").values, dtype=torch.float64)
    v = (x.reshape(-1, 256).double() / q.scales.double().unsqueeze(1)).reshape(-1)
    got = (v - values[q.packed.long()]).abs()
    best = (v.unsqueeze(1) - values.unsqueeze(0)).abs().amin(dim=1)
    assert bool((got <= best + 2.0 / 65535 + 1e-6).all())


# ---------------------------------------------------------------------------- robustness
TINY_CASES = {
    # scales that differ by subnormal amounts: centred values are subnormal, and some exactly 0
    "dq_subnormal_spread": """
        m, d = 1e-40, 1e-41
        x = torch.zeros(300, 64)
        x[:, 0] = torch.tensor([m - d, m, m + d]).repeat(100)
        q = qengine.quantize(x.reshape(-1), "nf4", 64, double_quant=True)
        raw = qengine.quantize(x.reshape(-1), "nf4", 64).scales
        s = q.scales.values()
        bound = 2 * q.scales.quantized.scales.abs().max()
        assert torch.isfinite(s).all() and ((s - raw).abs() <= bound).all(), (s, raw)
        assert torch.isfinite(q.dequantize()).all()
    """,
    "dynamic8_subnormal_absmax_with_zero": """
        d = 1e-41
        q = qengine.quantize(torch.tensor([-d, 0.0, d] * 10), "dynamic8", 256)
        out = q.dequantize()
        assert torch.isfinite(out).all() and (out.abs() <= d).all(), out
    """,
}


@pytest.mark.slow
def test_tiny_scales_do_not_crash():
    """A block whose absmax is so small that 1 / absmax overflows (and that holds an exact 0)
    must quantize without crashing or reading out of bounds. Runs in a subprocess so that a
    crash fails this test instead of killing the test session; each case announces itself on
    stderr first, so the report names the case that crashed."""
    parts = ["import sys, torch, qengine"]
    for name, body in TINY_CASES.items():
        parts.append(f"print('case: {name}', file=sys.stderr, flush=True)")
        parts.append(textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", "\n".join(parts)], capture_output=True, text=True, timeout=120)
    crashed = " (killed by a signal: crash)" if proc.returncode < 0 else ""
    assert proc.returncode == 0, f"subprocess exited with {proc.returncode}{crashed}; stderr:\n{proc.stderr[-2000:]}"


# ---------------------------------------------------------------------------- storage accounting
@pytest.mark.slow
def test_bits_per_param_nf4_4096x4096():
    w = torch.randn(4096, 4096)
    dq = qengine.quantize(w, "nf4", 64, double_quant=True)
    assert round(dq.bits_per_param, 3) == 4.127
    plain = qengine.quantize(w, "nf4", 64)
    assert round(plain.bits_per_param, 3) == 4.5
    for q, d in ((dq, True), (plain, False)):
        assert q.bits_per_param == pytest.approx(ref.bits_per_param_formula(w.numel(), 4, 64, 16, d), abs=1e-12)
    assert dq.nbytes < plain.nbytes


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(7,), (257, 33), (300, 256)])
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_nbytes_counts_every_stored_byte(fmt, shape, double_quant):
    x = make_input(shape, torch.float32)
    q = qengine.quantize(x, fmt_of(fmt), 32, double_quant=double_quant)
    r = ref.quantize(x, fmt_of(fmt), 32, double_quant=double_quant)
    assert q.nbytes == ref.nbytes(r)
    assert q.bits_per_param == pytest.approx(8.0 * ref.nbytes(r) / x.numel(), rel=1e-12)
    f = qengine.get_format(fmt_of(fmt))
    expected = ref.bits_per_param_formula(x.numel(), f.bits, 32, len(f.values), double_quant, f.rule == "minmax")
    assert q.bits_per_param == pytest.approx(expected, rel=1e-12)
    # and the state dict holds exactly those bytes, plus the JSON metadata
    sd = q.state_dict()
    tensor_bytes = sum(t.numel() * t.element_size() for k, t in sd.items() if not k.endswith("quant_meta"))
    assert tensor_bytes == q.nbytes
    assert math.isfinite(q.bits_per_param)


@pytest.mark.parametrize("fmt", ["nf4", "uint8"])
def test_scale_mean_overflow_is_named(fmt):
    """Finite weights whose block scales sum past float32 (found by the property tests): a
    ValueError that names double quantization, not a "NaN or Inf input" from the nested kernel;
    without double quantization they quantize."""
    x = torch.randn(128)
    x[0] = x[64] = torch.finfo(torch.float32).max
    x[1] = x[65] = -torch.finfo(torch.float32).max if fmt == "nf4" else 0.0
    if fmt == "uint8":
        x = x.abs()
    with pytest.raises(ValueError, match="double quantization"):
        qengine.quantize(x, fmt, 64, double_quant=True)
    assert torch.equal(qengine.quantize(x, fmt, 64).packed, ref.quantize(x, fmt, 64).packed)


@pytest.mark.parametrize("shape, blocksize", [((257, 33), 32), ((96, 1000), 64), ((40, 1024), 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "uint4", "int8", "uint8"])
def test_native_dequantize_decodes_nested_scales(fmt, dtype, shape, blocksize):
    """The native CPU dequantize takes the double-quantized scale codes themselves (what the
    large-batch fallback and the backward hand it) and decodes them with the reference's bits:
    whole tensors, and ranges that start and end inside blocks and cross the kernel's 256-block
    scale batches and thread ranges."""
    from qengine import _C
    from qengine._checks import DTYPE_CODES
    from support import native_ref

    x = make_input(shape, torch.float32)
    q = qengine.quantize(x, fmt, blocksize, double_quant=True)
    expected = ref.dequantize(ref.quantize(x, fmt_of(fmt), blocksize, double_quant=True), dtype).reshape(-1)
    kw, weight = native_ref(q)
    assert kw.nested  # the scales go in as codes
    n = x.numel()
    out = torch.empty(n, dtype=dtype)
    _C.dequantize_cpu(weight, n, out.data_ptr(), DTYPE_CODES[dtype], False)
    assert torch.equal(out, expected)
    for first, count in [(0, n), (3 * blocksize, n - 3 * blocksize), (blocksize // 2 + 5, n // 2), (n - 7, 7)]:
        part = torch.empty(count, dtype=dtype)
        _C.dequantize_range_cpu(weight, first, count, part.data_ptr(), DTYPE_CODES[dtype])
        assert torch.equal(part, expected[first:first + count]), (first, count)


@pytest.mark.parametrize("shape, blocksize", [((257, 33), 32), ((96, 1000), 64), ((40, 1024), 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "uint4", "int8", "uint8"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_native_dequantize_columns(fmt, dtype, shape, blocksize, double_quant):
    """_C.dequantize_columns_cpu (the backward's dense fallback, a tile of columns at a time):
    columns [k0, k0 + cols) of every row, bit for bit the reference's, for column ranges that
    start and end inside blocks, rows whose blocks run on into the next row (K not a multiple
    of the block size), and the whole width."""
    from qengine import _C
    from qengine._checks import DTYPE_CODES
    from support import native_ref

    x = make_input(shape, torch.float32)
    q = qengine.quantize(x, fmt, blocksize, double_quant=double_quant)
    rq = ref.quantize(x, fmt_of(fmt), blocksize, double_quant=double_quant)
    expected = ref.dequantize(rq, dtype).reshape(shape)
    kw, weight = native_ref(q)  # noqa: F841 (kw keeps the weight's tensors alive)
    rows, k = shape
    inside = min(blocksize // 2 + 3, k // 3)  # a start inside the row's first block
    second = min(blocksize, k - 1)
    for k0, cols in [(0, k), (0, 1), (inside, k // 2), (k - 7, 7), (second, k - second), (k, 0)]:
        tile = torch.full((rows, cols), float("nan"), dtype=dtype)
        _C.dequantize_columns_cpu(weight, rows, k, k0, cols, tile.data_ptr(), DTYPE_CODES[dtype])
        assert torch.equal(tile, expected[:, k0:k0 + cols]), (k0, cols)
