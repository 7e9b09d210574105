"""qengine.matmul (the dequantize-matmul with bias and LoRA): forward and backward against a
float64 reference built from the independent reference dequantization, on the fused small-batch
path (<= 16 rows), the dense large-batch path, odd shapes, every ISA, and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qengine
from cases import TORCH_JIT_DEPRECATION
from support import check_bias_lora_and_gradients, check_matmul_every_isa, matmul_bound, random_quantized

BATCHES = [1, 3, 16, 17, 64]
# (out_features, in_features, blocksize): the fused kernel's shape (K % 128 == 0), a
# block-aligned K that is not, per-row blocks, and flat blocks that straddle rows.
LAYERS = [(96, 256, 64), (40, 192, 32), (33, 384, None), (30, 200, 64)]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l[0]}x{l[1]}-{'row' if l[2] is None else l[2]}")
@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dq", [False, True])
def test_forward_matches_reference(layer, m, dtype, dq):
    n, k, bs = layer
    q, w64 = random_quantized(n, k, "nf4", bs, dq)
    x = torch.randn(m, k).to(dtype)
    y = qengine.matmul(x, q)
    assert y.dtype == dtype and y.shape == (m, n)
    x64 = x.to(torch.float64)
    ref = x64 @ w64.t()
    assert ((y.to(torch.float64) - ref).abs() <= matmul_bound(x64, w64, dtype)).all()


@pytest.mark.parametrize("fmt", ["fp4", "int4", "int8", "uint4", "uint8", "cb5", "cb200"])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_every_format(fmt, m):
    q, w64 = random_quantized(48, 256, fmt, 64, True)
    x = torch.randn(2, m, 256)
    y = qengine.matmul(x, q)
    x64 = x.to(torch.float64)
    ref = x64 @ w64.t()
    assert y.shape == (2, m, 48)
    assert ((y.to(torch.float64) - ref).abs() <= matmul_bound(x64, w64, torch.float32)).all()


@pytest.mark.parametrize("m", [1, 4, 16, 40])
@pytest.mark.parametrize("layer", [(64, 256, 64), (30, 200, 64)], ids=["aligned", "straddling"])
def test_bias_lora_and_gradients(m, layer):
    check_bias_lora_and_gradients(m, layer, "cpu")


def test_lora_zero_b_is_the_base():
    q = qengine.quantize(torch.randn(32, 128), "nf4", 64)
    x = torch.randn(3, 128)
    a = torch.randn(4, 128)
    b = torch.zeros(32, 4)
    assert torch.equal(qengine.matmul(x, q, lora=(a, b, 2.0)), qengine.matmul(x, q))


def test_isas_agree():
    q = qengine.quantize(torch.randn(64, 512), "nf4", 64, double_quant=True)
    x = torch.randn(5, 512)
    original = qengine.build_info()["cpu_isa"]
    try:
        results = {}
        for isa in qengine.build_info()["supported_cpu_isas"]:
            qengine.set_cpu_isa(isa)
            results[isa] = qengine.matmul(x, q).to(torch.float64)
    finally:
        qengine.set_cpu_isa(original)
    ref = results["scalar"]
    for isa, y in results.items():
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4), isa


@pytest.mark.parametrize("m", [1, 5, 16])
def test_bfloat16_activations_every_isa(m):
    """bfloat16 x on every ISA (AVX512-BF16 CPUs use a vdpbf16ps kernel) within the bound."""
    q = qengine.quantize(torch.randn(72, 384), "nf4", 64, double_quant=True)
    w64 = q.dequantize().to(torch.float64)
    x = torch.randn(m, 384).to(torch.bfloat16)
    x64 = x.to(torch.float64)
    ref = x64 @ w64.t()
    original = qengine.build_info()["cpu_isa"]
    try:
        for isa in qengine.build_info()["supported_cpu_isas"]:
            qengine.set_cpu_isa(isa)
            y = qengine.matmul(x, q).to(torch.float64)
            assert ((y - ref).abs() <= matmul_bound(x64, w64, torch.bfloat16)).all(), isa
    finally:
        qengine.set_cpu_isa(original)


@pytest.mark.skipif("avx512_bf16" not in qengine.build_info()["supported_cpu_isas"],
                    reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("m,blocksize", [(1, 64), (2, 128), (7, 32), (3, 64), (7, 64), (16, 64), (8, 256)])
def test_bfloat16_kernel_precision_model(m, blocksize):
    """The vdpbf16ps kernels round each weight to bfloat16 once and accumulate in float32: for
    one or two rows of x (or blocksize 32) they multiply bfloat16(table value) by x and scale
    per block in float32; from three rows on (in each group of up to 8 rows), with blocksize
    >= 64, they multiply bfloat16(dequantized weight), the weight dense bfloat16 F.linear uses. Against that
    model the only error left is accumulation and the output rounding."""
    q = qengine.quantize(torch.randn(64, 512), "nf4", blocksize)
    table = torch.tensor(q.format.values, dtype=torch.float64)
    codes = torch.stack([q.packed >> 4, q.packed & 15], -1).reshape(64, 512).long()
    w64 = q.dequantize().to(torch.float64)
    if m >= 3 and blocksize >= 64:
        w_model = q.dequantize(torch.float32).to(torch.bfloat16).to(torch.float64)
    else:
        value = table[codes]
        w_model = torch.where(value == 0, 0.0, w64 / value * table.to(torch.bfloat16).to(torch.float64)[codes])
    x = torch.randn(m, 512).to(torch.bfloat16)
    original = qengine.build_info()["cpu_isa"]
    try:
        qengine.set_cpu_isa("avx512_bf16")
        y = qengine.matmul(x, q).to(torch.float64)
    finally:
        qengine.set_cpu_isa(original)
    x64 = x.to(torch.float64)
    ref = x64 @ w_model.t()
    mag = x64.abs() @ w_model.abs().t()
    assert ((y - ref).abs() <= 8 * math.sqrt(512) * 2.0**-24 * mag + 2.0**-8 * ref.abs()).all()


# K not a multiple of the fused kernels' 128-code chunk: the last K % 128 codes of each row run
# through the same kernels from a zero-padded copy (RowProduct::run_tail), in batches of 64 rows.
@pytest.mark.parametrize("fmt,bs,dq,k", [("nf4", 32, True, 2880), ("nf4", 64, False, 2880), ("nf4", 32, False, 96),
                                         ("mxfp4", 32, True, 2880), ("nvfp4", 16, True, 336), ("nvfp4", 16, True, 16)])
@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_not_whole_chunks_every_isa(fmt, bs, dq, k, m, dtype):
    n = 130  # two full batches of the tail's 64 rows and a short one
    q = qengine.quantize(torch.randn(n, k), fmt, bs, double_quant=dq)
    w64 = q.dequantize(torch.float32).to(torch.float64)  # (dequantize: tested against the reference)
    check_matmul_every_isa(q, w64, torch.randn(m, k).to(dtype))


# 4-bit minmax weights (uint4; GGUF Q4_1 / Q4_K import to the same rule) on the fused GEMV: each
# weight decoded in registers as fma(table[q], scale, offset), exactly what dequantize gives.
@pytest.mark.parametrize("k,bs", [(256, 32), (512, 128), (2880, 64), (96, 32)])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minmax_4bit_every_isa(k, bs, dq, m, dtype):
    q, w64 = random_quantized(130, k, "uint4", bs, dq)
    check_matmul_every_isa(q, w64, torch.randn(m, k).to(dtype))


# 8-bit codes (int8, uint8, dynamic8; GGUF Q8_0 / Q6_K / Q5_K load to 8-bit tables too, see
# test_gguf.py) on the fused GEMV where the CPU has AVX-512 VBMI: each code looked up in its
# 256-entry table with byte permutes, in registers; elsewhere (the scalar and avx2 rows) decoded
# a row at a time. K = 2880 and 96 leave a last chunk of K % 128 codes.
@pytest.mark.parametrize("fmt,bs,k", [("int8", 64, 2880), ("int8", 32, 96), ("uint8", 32, 2880),
                                      ("uint8", 64, 256), ("int8", 256, 512), ("dynamic8", 128, 384)])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_every_isa(fmt, bs, k, dq, m, dtype):
    q, w64 = random_quantized(130, k, fmt, bs, dq)
    check_matmul_every_isa(q, w64, torch.randn(m, k).to(dtype))


@pytest.mark.parametrize("m", [1, 5])
def test_fp8_every_isa(m):
    # fp8_e4m3's table has at most 4 significant bits a value: the 8-bit GEMV looks up only the
    # upper two byte planes of such tables (GGUF's 8-bit ones are alike: test_gguf.py).
    q = qengine.quantize(torch.randn(130, 2880), "fp8_e4m3", 64)
    w64 = q.dequantize(torch.float32).to(torch.float64)  # (dequantize: tested against torch's float8 cast)
    check_matmul_every_isa(q, w64, torch.randn(m, 2880).to(torch.bfloat16))


def test_inputs_not_modified_and_weight_frozen():
    q = qengine.quantize(torch.randn(16, 128), "nf4", 64)
    packed = q.packed.clone()
    x = torch.randn(2, 128, requires_grad=True)
    x_before = x.detach().clone()
    qengine.matmul(x, q).sum().backward()
    assert torch.equal(x.detach(), x_before)
    assert torch.equal(q.packed, packed)
    assert not q.packed.requires_grad


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
def test_opcheck():
    q = qengine.quantize(torch.randn(32, 256), "nf4", 64, double_quant=True)
    table = q.format.kernel_tables()[0]
    scales, nested = q._kernel_scales()
    for m in (1, 20):
        x = torch.randn(m, 256, requires_grad=True)
        torch.library.opcheck(torch.ops.qengine.matmul.default,
                              (x, q.packed, table, scales, nested, None, 4, 64, 32, None, None, 0.0))
        a = torch.randn(4, 256, requires_grad=True)
        b = torch.randn(32, 4, requires_grad=True)
        torch.library.opcheck(torch.ops.qengine.matmul.default,
                              (x, q.packed, table, scales, nested, None, 4, 64, 32, a, b, 0.5))
        g = torch.randn(m, 32)
        torch.library.opcheck(torch.ops.qengine.matmul_t.default,
                              (g, q.packed, table, scales, nested, None, 4, 64, 256))


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
def test_compile_fullgraph_forward_backward():
    q = qengine.quantize(torch.randn(48, 256), "nf4", 64, double_quant=True)
    a = (torch.randn(8, 256) * 0.1).requires_grad_()
    b = (torch.randn(48, 8) * 0.1).requires_grad_()

    def f(x):
        return qengine.matmul(x, q, None, (a, b, 0.5)).square().sum()

    x = torch.randn(4, 256, requires_grad=True)
    eager = f(x)
    eager.backward()
    gx, ga = x.grad.clone(), a.grad.clone()
    x.grad = None
    a.grad = None
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5)
    assert torch.allclose(x.grad, gx, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a.grad, ga, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["in_features", "weight_3d", "int_x", "bias_shape", "lora_shape", "lora_tuple"])
def test_bad_input(case):
    q = qengine.quantize(torch.randn(16, 128), "nf4", 64)
    x = torch.randn(2, 128)
    with pytest.raises((TypeError, ValueError)):
        if case == "in_features":
            qengine.matmul(torch.randn(2, 127), q)
        elif case == "weight_3d":
            qengine.matmul(x, qengine.quantize(torch.randn(2, 16, 128), "nf4", 64))
        elif case == "int_x":
            qengine.matmul(x.to(torch.int32), q)
        elif case == "bias_shape":
            qengine.matmul(x, q, torch.randn(15))
        elif case == "lora_shape":
            qengine.matmul(x, q, lora=(torch.randn(4, 127), torch.randn(16, 4), 1.0))
        else:
            qengine.matmul(x, q, lora=(torch.randn(4, 128), torch.randn(16, 4)))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    q = qengine.quantize(torch.randn(64, 256), "nf4", 64, double_quant=True)
    x = torch.randn(3, 256)
    y_cpu = qengine.matmul(x, q)
    y_cuda = qengine.matmul(x.cuda(), q.to("cuda"))
    assert torch.allclose(y_cuda.cpu(), y_cpu, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 20])
def test_half_precision_lora_adapters(adapter_dtype, m):
    q = qengine.quantize(torch.randn(40, 256), "nf4", 64)
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    a = (torch.randn(8, 256) * 0.1).to(adapter_dtype)
    b = (torch.randn(40, 8) * 0.1).to(adapter_dtype)
    y = qengine.matmul(x, q, lora=(a, b, 1.5))
    x64, a64, b64 = x.to(torch.float64), a.to(torch.float64), b.to(torch.float64)
    w64 = q.dequantize().to(torch.float64)
    ref = x64 @ w64.t() + 1.5 * (x64 @ a64.t()) @ b64.t()
    extra = 1.5 * (x64 @ a64.t()).abs() @ b64.abs().t()
    assert ((y.to(torch.float64) - ref).abs() <= matmul_bound(x64, w64, torch.bfloat16, extra)).all()


class SeenOps(TorchDispatchMode):
    """A dispatch mode that records the name of every op it sees."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_direct_call_matches_the_op_and_keeps_dispatch_visible():
    """qengine.matmul under no_grad gives the op's result bit for bit, and always runs through
    the dispatcher, where a dispatch mode sees it (there: the op's twin without autograd)."""
    q = qengine.quantize(torch.randn(40, 256), "nf4", 64, double_quant=True)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    table = q.format.kernel_tables(q.device)[0]
    scales, nested = q._kernel_scales()
    with torch.no_grad():
        direct = qengine.matmul(x, q)
        via_op = torch.ops.qengine.matmul(x, q.packed, table, scales, nested, None, 4, 64, 40, None, None, 0.0)
    assert torch.equal(direct, via_op)

    with torch.no_grad(), SeenOps() as seen:
        qengine.matmul(x, q)
    assert any("qengine.matmul" in op for op in seen.ops)


def test_inference_mode_then_training_with_double_quant():
    """Tensors the fast path shares between calls (the nested blocksize) are made outside
    inference mode, so a layer used under inference_mode still trains afterwards."""
    layer = qengine.nn.QuantLinear.from_linear(torch.nn.Linear(128, 24), "nf4", 64, double_quant=True)
    with torch.inference_mode():
        layer(torch.randn(2, 128))
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not qengine._C.vbmi_scales(), reason="the CPU has no AVX-512 VBMI (or QENGINE_NO_VBMI is set)")
def test_vbmi_scale_decode_equals_the_gather_path():
    """Double-quantized scales decoded in bulk with VBMI byte permutes give the kernels the same
    float32 scales as the per-row gathers: outputs equal bit for bit to a process run with
    QENGINE_NO_VBMI=1, over shapes whose nested groups straddle rows and output chunks, NVFP4
    rows longer than one K tile, and the 2:4 layout (its rows decoded 128 at a time at K 4096)."""
    import os
    import subprocess
    import sys

    script = r'''
import sys, torch, qengine
torch.manual_seed(0)
out = []
# nf4 + double quant, and nvfp4 (block 16, E4M3 scale codes; 8448 = 66 chunks: three K tiles)
for fmt, n, k, bs in [("nf4", 67, 384, 64), ("nf4", 130, 256, 128), ("nf4", 9, 640, 64), ("nf4", 200, 128, 32),
                      ("nf4", 300, 4096, 64), ("nvfp4", 24, 8448, None), ("nvfp4", 40, 512, None),
                      ("nvfp4", 64, 1024, "wide"), ("2:4", 300, 4096, 64), ("2:4", 67, 768, 32)]:
    # "wide": rows spanning 10**-7..10 under one tensor scale, so E4M3 block scales reach the
    # subnormal codes 1..7 and 0 (up to 16 rows of x NVFP4 computes its scales in the GEMV
    # instead, test_microscaling; 40 rows take the GEMM's bulk decode)
    w = torch.randn(n, k) * torch.logspace(-7 if bs == "wide" else -3, 1, n).unsqueeze(1)
    if fmt == "2:4":
        q = qengine.quantize(w, "nf4", bs, double_quant=True, sparsity="2:4")
    else:
        q = qengine.quantize(w, fmt, bs, double_quant=True) if isinstance(bs, int) else qengine.quantize(w, fmt)
    for m in (1, 3, 8, 16, 40):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dtype)
            with torch.no_grad():
                out.append(qengine.matmul(x, q).float())
torch.save(out, sys.argv[1])
'''
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paths = [os.path.join(d, "vbmi.pt"), os.path.join(d, "gather.pt")]
        for path, env in zip(paths, [{}, {"QENGINE_NO_VBMI": "1"}]):
            subprocess.run([sys.executable, "-c", script, path], check=True, env={**os.environ, **env}, timeout=300)
        a, b = (torch.load(p) for p in paths)
    assert len(a) == len(b) == 100
    for ya, yb in zip(a, b):
        assert torch.equal(ya, yb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bfloat16 x may take the native GEMM (test_gemm)
def test_large_batch_tiles_match_the_whole_layer_product(monkeypatch, dtype):
    """More than 16 rows: W is dequantized a tile of rows at a time (tiles of 7 rows here, the
    last one short), each tile's columns one GEMM over all of K: within the GEMM's own rounding
    of the whole-layer product x @ dequantize(W)^T, and within the float64 bound."""
    from qengine.ops import cpu as _ops

    q = qengine.quantize(torch.randn(45, 200), "nf4", 64, double_quant=True)
    x = torch.randn(2, 17, 200).to(dtype)
    whole = x @ q.dequantize(dtype).t()
    monkeypatch.setattr(_ops, "DENSE_TILE_BYTES", 7 * 200 * x.element_size())
    y = qengine.matmul(x, q)
    tol = 1e-5 if dtype == torch.float32 else 2.0**-10
    assert torch.allclose(y.float(), whole.float(), rtol=tol, atol=tol * 10)
    x64, w64 = x.to(torch.float64), q.dequantize().to(torch.float64)
    assert ((y.to(torch.float64) - x64 @ w64.t()).abs() <= matmul_bound(x64, w64, dtype)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bfloat16 g may take the native GEMM (test_gemm)
@pytest.mark.parametrize("k", [200, 256])
def test_backward_tiles_match_the_whole_layer_product(monkeypatch, dtype, k):
    """The backward's dense fallback, more than 16 rows of g: W is dequantized a tile of columns
    at a time (64 columns here, the last one short for K = 200, whose blocks run on into the next
    row), every column of gx one GEMM over all of N: within the GEMM's own rounding of g @
    dequantize(W), and within the float64 bound; the whole-width path gives the same."""
    from qengine.ops import cpu as _ops

    q = qengine.quantize(torch.randn(45, k), "nf4", 64, double_quant=True)
    kw = q.kernel_weight()
    g = torch.randn(2, 17, 45).to(dtype)

    def backward():
        return torch.ops.qengine.matmul_t(g, kw.packed, kw.table, kw.scales, kw.nested, kw.offsets, kw.bits,
                                          kw.blocksize, k)

    whole = backward()
    monkeypatch.setattr(_ops, "DENSE_TILE_BYTES", 45 * 64 * g.element_size())
    monkeypatch.setattr(_ops, "MIN_TILE_COLUMNS", 64)
    gx = backward()
    tol = 1e-5 if dtype == torch.float32 else 2.0**-10
    reference = g @ q.dequantize(dtype)
    for out in (gx, whole):
        assert out.shape == (2, 17, k) and out.dtype == dtype
        assert torch.allclose(out.float(), reference.float(), rtol=tol, atol=tol * 10)
    g64, w64 = g.to(torch.float64), q.dequantize().to(torch.float64)
    assert ((gx.to(torch.float64) - g64 @ w64).abs() <= matmul_bound(g64, w64.t(), dtype)).all()


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("layout", ["dense", "2:4"])
def test_nograd_twin_is_the_same_product(layout):
    """With grad mode off the products run as their twins without autograd
    (qengine::matmul_nograd, qengine::sparse24_matmul_nograd): bit for bit the op's result, seen
    by a dispatch mode under its own name, and opcheck's schema / fake / AOT checks pass; with
    grad mode on, the op with autograd runs."""
    sparsity = "2:4" if layout == "2:4" else None
    q = qengine.quantize(torch.randn(40, 256), "nf4", 64, double_quant=True, sparsity=sparsity)
    kw = q.kernel_weight()
    name = "sparse24_matmul" if layout == "2:4" else "matmul"
    a, b = torch.randn(4, 256) * 0.1, torch.randn(40, 4) * 0.1
    for rows, dtype, lora in ((1, torch.float32, False), (3, torch.bfloat16, True), (20, torch.bfloat16, False)):
        x = torch.randn(rows, 256, dtype=dtype)
        la, lb = (a, b) if lora else (None, None)
        with torch.enable_grad(), SeenOps() as with_grad:
            expected = kw.matmul(x, la, lb, 0.5)
        with torch.no_grad(), SeenOps() as without:
            got = kw.matmul(x, la, lb, 0.5)
        assert torch.equal(got, expected)
        assert f"qengine.{name}.default" in with_grad.ops and f"qengine.{name}_nograd.default" in without.ops
        assert f"qengine.{name}.default" not in without.ops
        twin = getattr(torch.ops.qengine, f"{name}_nograd").default
        args = (x, kw.packed, *((kw.positions,) if layout == "2:4" else ()), kw.table, kw.scales, kw.nested,
                kw.offsets, kw.bits, kw.blocksize, 40, la, lb, 0.5)
        torch.library.opcheck(twin, args)
