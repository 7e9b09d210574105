"""The CUDA backend against the CPU (the tested reference) and float64: quantize bytes equal
the CPU's for every format, block size, dtype and odd size (double quantization included),
dequantize equal, the fused small-batch matmul / matmul_t (word and element paths, row
splits) against float64 and the CPU, LoRA, bias and gradients, torch's current stream, and
mixed-device arguments. Every test needs a GPU (marked `cuda`; skipped without one)."""

from __future__ import annotations

import pytest
import torch

import qengine
import reference as R
from cases import DTYPES, FORMAT_NAMES, SPECIAL, TORCH_JIT_DEPRECATION, fmt_of, make_input
from support import check_bias_lora_and_gradients, matmul_bound, random_quantized

pytestmark = pytest.mark.cuda

FORMATS = FORMAT_NAMES + ["dynamic8"]  # dynamic8: the grid rule of the double-quant map
CUDA_BLOCKSIZES = [32, 64, 256, 4096, None]
SHAPES = [(257, 33), (7,), (3, 1000)]


def _same_quantized(a: qengine.QuantizedTensor, b: qengine.QuantizedTensor) -> None:
    """Byte equality of two quantized tensors (a on the GPU, b on the CPU), nested state included."""
    assert a.device.type == "cuda" and b.device.type == "cpu"
    assert torch.equal(a.packed.cpu(), b.packed)
    for pa, pb in ((a.scales, b.scales), (a.offsets, b.offsets)):
        assert (pa is None) == (pb is None)
        if pa is None:
            continue
        if isinstance(pb, qengine.NestedScales):
            assert R.same_bits(pa.mean.cpu(), pb.mean)
            _same_quantized(pa.quantized, pb.quantized)
        else:
            assert R.same_bits(pa.cpu(), pb)


# ---------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", CUDA_BLOCKSIZES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_bytes_equal_cpu(fmt, blocksize, dtype, shape):
    x = make_input(shape, dtype)
    xg = x.cuda()
    before = xg.clone()
    qg = qengine.quantize(xg, fmt_of(fmt), blocksize)
    _same_quantized(qg, qengine.quantize(x, fmt_of(fmt), blocksize))
    assert torch.equal(xg, before)


@pytest.mark.parametrize("blocksize", [64, None])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "uint4", "cb200"])
def test_double_quant_bytes_equal_cpu(fmt, blocksize):
    x = make_input((300, 129), torch.bfloat16)  # 604 blocks of 64: three nested blocks, one partial
    _same_quantized(qengine.quantize(x.cuda(), fmt_of(fmt), blocksize, double_quant=True),
                    qengine.quantize(x, fmt_of(fmt), blocksize, double_quant=True))


@pytest.mark.parametrize("case", list(SPECIAL))
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_special_values_equal_cpu(fmt, case):
    x = SPECIAL[case]
    if qengine.get_format(fmt_of(fmt)).rule == "minmax" and case in ("float32_max", "huge"):
        x = x.abs() / 4  # max - min must stay finite for the minmax rule
    for blocksize in (32, 64):
        _same_quantized(qengine.quantize(x.cuda(), fmt_of(fmt), blocksize), qengine.quantize(x, fmt_of(fmt), blocksize))


def test_large_blocks_and_many_blocks():
    """Per-tensor block (one CTA reduces 300k elements) and a grid of 40k small blocks."""
    x = make_input((300_001,), torch.float32)
    for blocksize in (None, 4096, 32):
        _same_quantized(qengine.quantize(x.cuda(), "nf4", blocksize), qengine.quantize(x, "nf4", blocksize))
        _same_quantized(qengine.quantize(x.cuda(), "uint8", blocksize), qengine.quantize(x, "uint8", blocksize))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", ["nf4", "uint8", "dynamic8"])
def test_non_finite_raises(fmt, bad):
    x = make_input((1000,), torch.float32)
    x[517] = bad
    xg = x.cuda()
    before = xg.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        qengine.quantize(xg, fmt_of(fmt), 64)
    assert torch.equal(xg.isnan(), before.isnan()) and torch.equal(xg.nan_to_num(0.0), before.nan_to_num(0.0))


def test_minmax_overflow_raises():
    x = torch.tensor([3.0e38, -3.0e38] * 32, device="cuda")
    with pytest.raises(ValueError, match="overflows"):
        qengine.quantize(x, "uint4", 64)


# ---------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_dequantize_equals_cpu(fmt, dq, dtype):
    q = qengine.quantize(make_input((129, 67), torch.float32), fmt_of(fmt), 64, double_quant=dq)
    want = q.dequantize(dtype)
    assert R.same_bits(q.to("cuda").dequantize(dtype).cpu(), want)
    out = torch.empty(129, 67, dtype=dtype, device="cuda")
    assert R.same_bits(q.to("cuda").dequantize(out=out).cpu(), want)


# ---------------------------------------------------------------------------- matmul
# (out_features, in_features, blocksize): word path (K % 128 == 0; per-row; 8448 columns are
# two x tiles even for one row of x), element path (blocks straddling rows; odd per-row K:
# rows start mid-byte; 2500 columns are two tiles of the element kernel).
LAYERS = [(96, 256, 64), (33, 384, None), (48, 8448, 128), (30, 200, 64), (17, 99, None), (20, 2500, None)]
BATCHES = [1, 3, 16, 17, 64]


def _layer_id(layer):
    n, k, bs = layer
    return f"{n}x{k}-{'row' if bs is None else bs}"


def _cuda_bound(x64, w64, dtype, extra=0.0):
    """test_matmul's bound, plus, for more than 16 rows in half precision (the dense path:
    the weight rounded to x's dtype, and cuBLAS allowed reduced-precision reductions), two
    more roundings of that dtype."""
    bound = matmul_bound(x64, w64, dtype, extra)
    rows = x64.reshape(-1, x64.shape[-1]).shape[0]
    if rows > qengine.ops.SMALL_BATCH_ROWS and dtype != torch.float32:
        eps = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
        bound = bound + 2 * eps * (x64.abs() @ w64.abs().t() + extra)
    return bound


def _check_against_reference(y, x, w64, dtype, extra=0.0):
    x64 = x.detach().to(torch.float64).cpu()
    ref = x64 @ w64.t()
    assert y.dtype == dtype and y.device.type == "cuda"
    err = (y.detach().cpu().to(torch.float64) - ref.reshape(y.shape)).abs()
    assert (err <= _cuda_bound(x64, w64, dtype, extra).reshape(y.shape)).all()


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("layer", LAYERS, ids=_layer_id)
def test_matmul_matches_reference_and_cpu(layer, m, dtype, dq):
    n, k, bs = layer
    q, w64 = random_quantized(n, k, "nf4", bs, dq)
    x = torch.randn(m, k).to(dtype)
    y = qengine.matmul(x.cuda(), q.to("cuda"))
    _check_against_reference(y, x, w64, dtype)
    # CPU and GPU each within the bound of the float64 result, so within twice of each other.
    y_cpu = qengine.matmul(x, q)
    gap = (y.cpu().to(torch.float64) - y_cpu.to(torch.float64)).abs()
    assert (gap <= 2 * _cuda_bound(x.to(torch.float64), w64, dtype)).all()


@pytest.mark.parametrize("m", [1, 2, 5, 9, 16])
@pytest.mark.parametrize("layer", [(40, 256, 64), (30, 200, 64)], ids=_layer_id)
@pytest.mark.parametrize("fmt", ["fp4", "int4", "int8", "uint4", "uint8", "cb5", "cb200"])
def test_matmul_every_format(fmt, layer, m):
    n, k, bs = layer
    q, w64 = random_quantized(n, k, fmt, bs, True)
    x = torch.randn(2, m, k)
    _check_against_reference(qengine.matmul(x.cuda(), q.to("cuda")), x, w64, torch.float32)


def test_matmul_misaligned_codes_take_the_element_path():
    """Packed codes at an odd address (a contiguous view one byte into its buffer) cannot be
    read as 4-byte words; the result must not change."""
    q = qengine.quantize(torch.randn(64, 256), "nf4", 64).to("cuda")
    table = q.format.kernel_tables("cuda")[0]
    buf = torch.empty(q.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    buf[1:].copy_(q.packed)
    x = torch.randn(3, 256, device="cuda")
    args = (table, q.scales, [], None, 4, 64, 64, None, None, 0.0)
    aligned = torch.ops.qengine.matmul(x, q.packed, *args)
    shifted = torch.ops.qengine.matmul(x, buf[1:], *args)
    assert torch.allclose(shifted, aligned, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("layer", [(40, 256, 64), (1024, 256, 64), (1000, 200, 64), (64, 8448, 128), (257, 99, None)],
                         ids=_layer_id)
@pytest.mark.parametrize("fmt", ["nf4", "uint8"])
def test_matmul_t_matches_reference(fmt, layer, m):
    """gx = g @ W: one split (40 rows), 16 row splits summed in a second pass (1000+ rows), the
    element path (200 and 99 columns)."""
    n, k, bs = layer
    q, w64 = random_quantized(n, k, fmt, bs, True)
    table = q.format.kernel_tables("cuda")[0]
    qg = q.to("cuda")
    scales, nested = qg._kernel_scales()
    offsets = qg._block_values(qg.offsets)
    g = torch.randn(m, n)
    gx = torch.ops.qengine.matmul_t(g.cuda(), qg.packed, table, scales, nested, offsets, q.format.bits, q.blocksize, k)
    _check_against_reference(gx, g, w64.t().contiguous(), torch.float32)
    again = torch.ops.qengine.matmul_t(g.cuda(), qg.packed, table, scales, nested, offsets, q.format.bits, q.blocksize,
                                       k)
    assert torch.equal(gx, again)  # the split sums are added in a fixed order


@pytest.mark.parametrize("m", [1, 4, 16, 40])
@pytest.mark.parametrize("layer", [(64, 256, 64), (30, 200, 64)], ids=["aligned", "straddling"])
def test_bias_lora_and_gradients(m, layer):
    for t in check_bias_lora_and_gradients(m, layer, "cuda"):
        assert t.grad.device.type == "cuda"


@pytest.mark.parametrize("m", [1, 20])
def test_half_precision_lora_adapters(m):
    q = qengine.quantize(torch.randn(40, 256), "nf4", 64)
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    a = (torch.randn(8, 256) * 0.1).to(torch.bfloat16)
    b = (torch.randn(40, 8) * 0.1).to(torch.bfloat16)
    y = qengine.matmul(x.cuda(), q.to("cuda"), lora=(a.cuda(), b.cuda(), 1.5))
    x64, a64, b64 = x.to(torch.float64), a.to(torch.float64), b.to(torch.float64)
    extra = 1.5 * (x64 @ a64.t()).abs() @ b64.abs().t()
    w64 = q.dequantize().to(torch.float64)
    ref = x64 @ w64.t() + 1.5 * (x64 @ a64.t()) @ b64.t()
    err = (y.cpu().to(torch.float64) - ref).abs()
    assert (err <= _cuda_bound(x64, w64, torch.bfloat16, extra)).all()


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
def test_opcheck():
    q = qengine.quantize(torch.randn(32, 256), "nf4", 64, double_quant=True).to("cuda")
    table = q.format.kernel_tables("cuda")[0]
    scales, nested = q._kernel_scales()
    for m in (1, 20):
        x = torch.randn(m, 256, device="cuda", requires_grad=True)
        torch.library.opcheck(torch.ops.qengine.matmul.default,
                              (x, q.packed, table, scales, nested, None, 4, 64, 32, None, None, 0.0))
        g = torch.randn(m, 32, device="cuda")
        torch.library.opcheck(torch.ops.qengine.matmul_t.default,
                              (g, q.packed, table, scales, nested, None, 4, 64, 256))


# ---------------------------------------------------------------------------- streams
def _busy_then_write(dst: torch.Tensor, src: torch.Tensor) -> None:
    """On the current stream: keep the GPU busy (~tens of ms), then copy src into dst. A kernel
    that ignored the current stream would run before the copy and see the old dst."""
    torch.cuda._sleep(100_000_000)
    dst.copy_(src)


def test_kernels_run_on_the_current_stream():
    q = qengine.quantize(torch.randn(64, 256), "nf4", 64, double_quant=True)
    qg = q.to("cuda")
    x_old, x_new = torch.randn(3, 256), torch.randn(3, 256)
    w_old, w_new = make_input((100, 64), torch.float32), make_input((100, 64), torch.float32)
    x, w = x_old.cuda(), w_old.cuda()
    g_old, g_new = torch.randn(3, 64), torch.randn(3, 64)
    g = g_old.cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _busy_then_write(x, x_new.cuda())
        y = qengine.matmul(x, qg)
        _busy_then_write(g, g_new.cuda())
        gx = torch.ops.qengine.matmul_t(g, qg.packed, q.format.kernel_tables("cuda")[0], *qg._kernel_scales(), None,
                                        4, 64, 256)
        _busy_then_write(w, w_new.cuda())
        qw = qengine.quantize(w, "nf4", 64)
        deq = qw.dequantize()
    torch.cuda.synchronize()
    assert torch.allclose(y.cpu(), qengine.matmul(x_new, q), rtol=1e-5, atol=1e-4)
    table = q.format.kernel_tables()[0]
    scales, nested = q._kernel_scales()
    gx_cpu = torch.ops.qengine.matmul_t(g_new, q.packed, table, scales, nested, None, 4, 64, 256)
    assert torch.allclose(gx.cpu(), gx_cpu, rtol=1e-5, atol=1e-4)
    _same_quantized(qw, qengine.quantize(w_new, "nf4", 64))
    assert R.same_bits(deq.cpu(), qengine.quantize(w_new, "nf4", 64).dequantize())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the launches must go to cuda:1."""
    x = make_input((64, 128), torch.float32)
    q = qengine.quantize(x, "nf4", 64, double_quant=True)
    with torch.cuda.device(0):
        q1 = qengine.quantize(x.to("cuda:1"), "nf4", 64, double_quant=True)
        _same_quantized(q1, q)
        xs = torch.randn(2, 128)
        y = qengine.matmul(xs.to("cuda:1"), q1)
    assert y.device == torch.device("cuda:1")
    assert torch.allclose(y.cpu(), qengine.matmul(xs, q), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["x_cpu", "x_cuda", "lora_cpu", "bias_cpu", "g_cpu", "table_cpu", "nested_cpu"])
def test_device_mix_raises(case):
    q = qengine.quantize(torch.randn(16, 128), "nf4", 64, double_quant=True)
    qg = q.to("cuda")
    x = torch.randn(2, 128)
    table_g = q.format.kernel_tables("cuda")[0]
    scales_g, nested_g = qg._kernel_scales()
    with pytest.raises(ValueError, match="device|cuda|cpu"):
        if case == "x_cpu":
            qengine.matmul(x, qg)
        elif case == "x_cuda":
            qengine.matmul(x.cuda(), q)
        elif case == "lora_cpu":
            qengine.matmul(x.cuda(), qg, lora=(torch.randn(4, 128), torch.randn(16, 4), 1.0))
        elif case == "bias_cpu":
            qengine.matmul(x.cuda(), qg, torch.randn(16))
        elif case == "g_cpu":
            torch.ops.qengine.matmul_t(torch.randn(2, 16), qg.packed, table_g, scales_g, nested_g, None, 4, 64, 128)
        elif case == "table_cpu":
            torch.ops.qengine.matmul(x.cuda(), qg.packed, q.format.kernel_tables()[0], scales_g, nested_g, None, 4, 64,
                                     16, None, None, 0.0)
        else:
            nested_mixed = [nested_g[0], nested_g[1], nested_g[2].cpu(), nested_g[3]]
            torch.ops.qengine.matmul(x.cuda(), qg.packed, table_g, scales_g, nested_mixed, None, 4, 64, 16, None,
                                     None, 0.0)


def test_quantize_tables_on_another_device_raise():
    fmt = qengine.get_format("nf4")
    table, mids, order, _ = fmt.kernel_tables("cpu")
    with pytest.raises(ValueError, match="device|cuda|cpu"):
        torch.ops.qengine.quantize_blockwise(torch.randn(64, device="cuda"), table, mids, order, None, 4, 64, 0, True)
