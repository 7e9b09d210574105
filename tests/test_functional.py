"""quantize / dequantize are bit-exact against the slow reference (tests/reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qengine
import reference as ref
from cases import BLOCKSIZES, DTYPES, FORMAT_NAMES, ODD_SHAPES, SPECIAL, fmt_of, make_input
from qengine.tensor import QuantizedTensor


def assert_matches_reference(q: QuantizedTensor, r: ref.RefQuantized, x: torch.Tensor):
    """Byte-exact packed codes, bit-exact scales/offsets and exactly equal dequantized values.

    Absmax scales are compared bit for bit (max|x| is never -0.0); minmax scales and offsets
    may carry the sign of a zero input, which the spec leaves open, so only there -0.0 == +0.0.
    """
    fmt = qengine.get_format(q.format)
    n = x.numel()
    assert q.packed.dtype == torch.uint8 and q.packed.dim() == 1
    assert q.packed.numel() == math.ceil(n * fmt.bits / 8)
    if not torch.equal(q.packed, r.packed):
        bad = (q.packed != r.packed).nonzero().reshape(-1)
        raise AssertionError(f"packed codes differ from the reference at {bad.numel()} bytes, first {bad[:8].tolist()}: "
                             f"got {q.packed[bad[:8]].tolist()}, expected {r.packed[bad[:8]].tolist()}")
    assert q.scales.dtype == torch.float32 and q.scales.shape == (math.ceil(n / r.blocksize),)
    absmax = fmt.rule == "absmax"
    assert torch.equal(q.scales, r.scales), "scales differ from the reference"
    assert ref.same_bits(q.scales, r.scales, signed_zeros=absmax), \
        f"scales differ from the reference in the sign of zero: got {q.scales[q.scales == 0][:4].tolist()}"
    if fmt.rule == "minmax":
        assert q.offsets is not None and q.offsets.dtype == torch.float32
        assert torch.equal(q.offsets, r.offsets), "offsets differ from the reference"
    else:
        assert q.offsets is None
    out = q.dequantize()
    assert out.dtype == x.dtype and out.shape == x.shape
    expected = ref.dequantize(r)
    if not torch.equal(out, expected):
        bad = (out != expected).nonzero()
        raise AssertionError(f"dequantized values differ from the reference at {bad.shape[0]} elements, "
                             f"first {bad[:4].tolist()}")


# ---------------------------------------------------------------------------- the cross product
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_quantize_matches_reference(fmt, dtype, blocksize, shape):
    x = make_input(shape, dtype)
    q = qengine.quantize(x, fmt_of(fmt), blocksize)
    r = ref.quantize(x, fmt_of(fmt), blocksize)
    assert q.shape == x.shape and q.dtype == dtype
    assert q.blocksize == (shape[-1] if blocksize is None else blocksize)
    assert q.per_row == (blocksize is None)
    assert not q.double_quant
    assert_matches_reference(q, r, x)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_dequantize_to_other_dtypes(fmt, out_dtype):
    x = make_input((257, 33), torch.bfloat16)
    q = qengine.quantize(x, fmt_of(fmt), 64)
    r = ref.quantize(x, fmt_of(fmt), 64)
    expected = ref.dequantize(r, out_dtype)
    got = q.dequantize(out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, expected)
    assert torch.equal(qengine.dequantize(q, dtype=out_dtype), expected)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["nf4", "uint8", "cb5"])
def test_dequantize_into_out(fmt, out_dtype):
    x = make_input((3, 5, 31), torch.float32)
    q = qengine.quantize(x, fmt_of(fmt), 32)
    out = torch.full(x.shape, float("nan"), dtype=out_dtype)
    res = q.dequantize(out=out)
    assert res is out
    assert torch.equal(out, ref.dequantize(ref.quantize(x, fmt_of(fmt), 32), out_dtype))
    out2 = torch.empty(x.shape, dtype=out_dtype)
    assert qengine.dequantize(q, out=out2) is out2
    assert torch.equal(out2, out)
    out3 = torch.empty(x.shape, dtype=out_dtype)
    assert torch.equal(q.dequantize(dtype=out_dtype, out=out3), out)


# ---------------------------------------------------------------------------- larger tensors
# Big enough for the threaded paths and every SIMD main loop; fewer combinations.
@pytest.mark.parametrize("blocksize", [64, None])
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_large_matrix_matches_reference(fmt, blocksize):
    dtype = torch.bfloat16 if fmt in ("nf4", "int8", "cb200") else torch.float32
    x = make_input((512, 1000), dtype)
    assert_matches_reference(qengine.quantize(x, fmt_of(fmt), blocksize), ref.quantize(x, fmt_of(fmt), blocksize), x)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "uint4", "cb5"])
def test_odd_row_blocks_across_threads(fmt):
    """Per-row 4-bit blocks of odd length share bytes between blocks (and between threads'
    ranges once the tensor is large enough to be split)."""
    x = make_input((2049, 33), torch.float16)
    assert_matches_reference(qengine.quantize(x, fmt_of(fmt), None), ref.quantize(x, fmt_of(fmt), None), x)


@pytest.mark.parametrize("n", [4095, 4096, 4097, 8191, 40961])
@pytest.mark.parametrize("fmt", ["nf4", "uint8"])
def test_partial_last_block(fmt, n):
    x = make_input((n,), torch.float32)
    assert_matches_reference(qengine.quantize(x, fmt_of(fmt), 4096), ref.quantize(x, fmt_of(fmt), 4096), x)


# ---------------------------------------------------------------------------- special values
@pytest.mark.parametrize("case", list(SPECIAL))
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_special_values(fmt, case):
    x = SPECIAL[case]
    if fmt_of(fmt) in ("uint4", "uint8") or (isinstance(fmt_of(fmt), qengine.Format) and fmt_of(fmt).rule == "minmax"):
        # max - min must stay finite for the minmax rule (float32_max - (-3e38) overflows).
        if case == "float32_max":
            x = x.abs()
        if case == "huge":
            x = x / 4
    for blocksize in (32, 64):
        q = qengine.quantize(x, fmt_of(fmt), blocksize)
        assert_matches_reference(q, ref.quantize(x, fmt_of(fmt), blocksize), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nf4", "uint8", "int8"])
def test_half_precision_extremes(fmt, dtype):
    info = torch.finfo(dtype)
    x = torch.tensor([info.max, -info.max / 2, info.tiny, -info.tiny, info.smallest_normal / 4, 0.0, 1.0, -1.0] * 9,
                     dtype=dtype)
    if qengine.get_format(fmt_of(fmt)).rule == "minmax":
        x = x.abs()
    q = qengine.quantize(x, fmt_of(fmt), 32)
    assert_matches_reference(q, ref.quantize(x, fmt_of(fmt), 32), x)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_ties_go_to_the_lower_value(fmt):
    """Inputs exactly on a float32 midpoint go to the lower neighbour (and the values
    themselves map to their own code). One block per probe: its max is 1 (min 0 for minmax),
    so the normalised value equals the input exactly."""
    f = qengine.get_format(fmt_of(fmt))
    values = torch.tensor(f.values, dtype=torch.float32)
    mids = ref.midpoints(values)
    order = ref.sorted_order(values)
    svals = values[order]
    probes = torch.cat([mids, svals])
    bs = 32
    # slot 0 holds 1.0 (the block max), slot 1 the probe, the rest alternate 1 and -1 (absmax)
    # or 1 and 0 (minmax), so scale = 1 (and offset = 0): v = x * 1 exactly.
    other = -1.0 if f.rule == "absmax" else 0.0
    blocks = torch.tensor([1.0, other] * (bs // 2)).repeat(probes.numel(), 1)
    blocks[:, 1] = probes
    x = blocks.reshape(-1)
    q = qengine.quantize(x, f, bs)
    r = ref.quantize(x, f, bs)
    assert torch.equal(r.scales, torch.ones(probes.numel()))
    assert_matches_reference(q, r, x)
    codes = ref.unpack(q.packed, f.bits, x.numel()).reshape(-1, bs)[:, 1].long()
    nm = mids.numel()
    # midpoint i sits between sorted values i and i+1: it must pick sorted value i
    expected_mid_codes = torch.tensor(order[:nm])
    # FP4's two zeros: the midpoint between them (0.0) and 0.0 itself pick the first, code 0
    assert torch.equal(codes[:nm], expected_mid_codes)
    first_code_of_value = {}
    for i in order:
        first_code_of_value.setdefault(f.values[i], i)
    expected_value_codes = torch.tensor([first_code_of_value[v] for v in svals.tolist()])
    assert torch.equal(codes[nm:], expected_value_codes)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "uint4", "cb5"])
@pytest.mark.parametrize("n", [1, 3, 33, 65])
def test_odd_count_pads_with_the_code_of_zero(fmt, n):
    f = qengine.get_format(fmt_of(fmt))
    x = make_input((n,), torch.float32)
    q = qengine.quantize(x, f, 32)
    values = torch.tensor(f.values, dtype=torch.float32)
    zero_code = ref.code_of_zero(values)
    assert int(q.packed[-1]) & 0x0F == zero_code
    if fmt == "fp4":
        assert zero_code == 0  # stable sort keeps storage code 0 before 8
    if fmt in ("nf4", "int4"):
        assert zero_code == 7


def test_nibble_order_is_high_first():
    """Element 2k in the high nibble of byte k: with int4, +1 is code 14 and -1 is code 0."""
    x = torch.tensor([1.0, -1.0] * 16 + [0.0, 1.0] * 16)
    q = qengine.quantize(x, "int4", 32)
    assert q.packed[:16].tolist() == [(14 << 4) | 0] * 16
    assert q.packed[16:].tolist() == [(7 << 4) | 14] * 16


def test_partial_block_divides_full_blocks_multiply():
    """Full blocks normalise by x * float32(1 / scale), a partial last block by x / scale
    (bitsandbytes' rule). With scale 3 the two differ in the last bit for many x; a dense
    sweep through the codebook then exercises both rules at many midpoints."""
    x = torch.linspace(-3.0, 3.0, 64 + 40)
    x[0] = 3.0
    x[64] = 3.0
    xs = x[64:] / 3.0
    assert not torch.equal(x[64:] * (torch.ones(()) / 3.0), x[64:] / 3.0) or xs.numel() == 0
    q = qengine.quantize(x, "nf4", 64)
    assert_matches_reference(q, ref.quantize(x, "nf4", 64), x)


def test_per_row_is_one_block_per_row():
    x = make_input((5, 37), torch.float32)
    q = qengine.quantize(x, "nf4", None)
    assert q.per_row and q.blocksize == 37 and q.scales.shape == (5,)
    assert torch.equal(q.scales, x.abs().amax(dim=1))


@pytest.mark.parametrize("fmt", ["uint4", "uint8", "cb200"])
def test_minmax_scales_and_offsets(fmt):
    x = make_input((4, 64), torch.float32)
    q = qengine.quantize(x, fmt_of(fmt), 64)
    assert torch.equal(q.offsets, x.amin(dim=1))
    assert torch.equal(q.scales, x.amax(dim=1) - x.amin(dim=1))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_quantize_does_not_modify_input(fmt):
    for dtype in DTYPES:
        x = make_input((65, 33), dtype)
        before = x.clone()
        q = qengine.quantize(x, fmt_of(fmt), 64, double_quant=True)
        assert torch.equal(x, before)
        parts = [q.packed.clone()]
        q.dequantize()
        q.dequantize(torch.float32)
        assert torch.equal(q.packed, parts[0])


def test_quantize_detaches_autograd_input():
    x = torch.randn(64, requires_grad=True)
    q = qengine.quantize(x, "nf4", 64)
    assert not q.packed.requires_grad and not q.scales.requires_grad
    assert torch.equal(q.packed, qengine.quantize(x.detach(), "nf4", 64).packed)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "uint8", "cb5"])
def test_cuda_matches_cpu(fmt):
    x = make_input((257, 33), torch.bfloat16)
    q_cpu = qengine.quantize(x, fmt_of(fmt), 64)
    q_gpu = qengine.quantize(x.cuda(), fmt_of(fmt), 64)
    assert torch.equal(q_gpu.packed.cpu(), q_cpu.packed)
    assert torch.equal(q_gpu.scales.cpu(), q_cpu.scales)
    assert torch.equal(q_gpu.dequantize().cpu(), q_cpu.dequantize())
    assert torch.equal(q_cpu.to("cuda").dequantize().cpu(), q_cpu.dequantize())


# ---------------------------------------------------------------------------- property test
@st.composite
def quant_cases(draw):
    fmt = draw(st.sampled_from(FORMAT_NAMES))
    dtype = draw(st.sampled_from(DTYPES))
    blocksize = draw(st.sampled_from([32, 64, None]))
    n = draw(st.integers(min_value=1, max_value=200))
    # float16 overflows past 65504: keep |x| <= 2**15 there
    exponent = draw(st.integers(min_value=-40, max_value=15 if dtype == torch.float16 else 30))
    values = draw(st.lists(st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, width=32), min_size=n,
                           max_size=n))
    x = torch.tensor(values, dtype=torch.float32) * (2.0 ** exponent)
    if draw(st.booleans()):  # sprinkle exact zeros and repeated values
        x[:: draw(st.integers(min_value=2, max_value=7))] = 0.0
    return fmt, x.to(dtype), blocksize


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quant_cases())
def test_property_matches_reference(case):
    fmt, x, blocksize = case
    q = qengine.quantize(x, fmt_of(fmt), blocksize)
    assert_matches_reference(q, ref.quantize(x, fmt_of(fmt), blocksize), x)
