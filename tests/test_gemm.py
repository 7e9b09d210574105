"""The native large-batch product (csrc/cpu/gemm: W decoded panel by panel into a blocked
GEMM's layout): against float64 on shapes with every kind of tail (rows of x beyond a 12-row
tile, output rows beyond a 32-column panel and a 128-row group, inputs beyond a 512-input
block), every block size and scale encoding it takes, the formats it leaves to the fallback,
thread counts, and the ISAs without it."""

from __future__ import annotations

import pytest
import torch

import qengine
from support import assert_model_bound, large_product, large_product_t, matmul_bound

HAS_KERNEL = "avx512_bf16" in qengine.build_info()["supported_cpu_isas"]
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="this CPU has no AVX512-BF16 (the gemm kernel's ISA)")
# The ISAs with a gemm row on this CPU: AVX512-BF16's vdpbf16ps tiles, and AMX's where present.
GEMM_ISAS = [isa for isa in ("avx512_bf16", "amx") if isa in qengine.build_info()["supported_cpu_isas"]]


@pytest.fixture(params=GEMM_ISAS)
def gemm_isa(request, isa_restore):
    """Each gemm row in turn as the active ISA (restored after the test)."""
    qengine.set_cpu_isa(request.param)
    return request.param


def quantized(n, k, fmt, blocksize, dq, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if fmt in ("mxfp4", "nvfp4"):
        return qengine.quantize(w, fmt)
    return qengine.quantize(w, fmt, blocksize, double_quant=dq)


@needs_kernel
@pytest.mark.parametrize("n,k,m", [(96, 512, 17), (33, 96, 12), (129, 544, 25), (300, 1056, 40), (32, 1024, 64)])
@pytest.mark.parametrize("fmt,blocksize,dq", [("nf4", 64, True), ("nf4", 32, False), ("fp4", 256, True),
                                              ("int4", 1024, False), ("mxfp4", None, None), ("nvfp4", None, None)])
def test_against_float64(n, k, m, fmt, blocksize, dq, gemm_isa):
    """Each weight is rounded once to bfloat16 from its float32 dequantized value (the bytes
    dequantize() writes, the weight dense bfloat16 F.linear multiplies); then float32
    accumulation: against that model only the accumulation error is left."""
    if blocksize is not None and k % blocksize:
        pytest.skip("the block size does not divide K")
    q = quantized(n, k, fmt, blocksize, dq)
    x = torch.randn(m, k).to(torch.bfloat16)
    done, y = large_product(x, q)
    assert done
    x64 = x.to(torch.float64)
    w_model = q.dequantize(torch.bfloat16).to(torch.float64)
    ref = x64 @ w_model.t()
    mag = x64.abs() @ w_model.abs().t()
    assert ((y.to(torch.float64) - ref).abs() <= 8 * k ** 0.5 * 2.0**-24 * mag).all()


@needs_kernel
@pytest.mark.parametrize("n,k,m", [(96, 512, 17), (34, 96, 12), (130, 544, 25), (1030, 160, 40), (512, 1024, 64)])
@pytest.mark.parametrize("fmt,blocksize,dq", [("nf4", 64, True), ("nf4", 32, False), ("int4", 1024, False),
                                              ("nvfp4", None, None)])
def test_transposed_against_float64(n, k, m, fmt, blocksize, dq, gemm_isa):
    """gx = g @ W (the backward's product for x), with the reduction over W's rows in blocks of
    512 (1030 rows: a short last block) and output columns in groups of 128 (tails at 96, 160,
    544): against the same bfloat16-weight model as the forward."""
    if blocksize is not None and k % blocksize:
        pytest.skip("the block size does not divide K")
    q = quantized(n, k, fmt, blocksize, dq, seed=1)
    g = torch.randn(m, n).to(torch.bfloat16)
    done, gx = large_product_t(g, q)
    assert done
    g64 = g.to(torch.float64)
    w_model = q.dequantize(torch.bfloat16).to(torch.float64)
    ref = g64 @ w_model
    mag = g64.abs() @ w_model.abs()
    assert ((gx.to(torch.float64) - ref).abs() <= 8 * n ** 0.5 * 2.0**-24 * mag).all()


@needs_kernel
def test_transposed_leaves_odd_rows_to_the_fallback(gemm_isa):
    q = quantized(33, 128, "nf4", 64, True)
    done, gx = large_product_t(torch.randn(20, 33).to(torch.bfloat16), q)
    assert not done and gx.isnan().all()


@needs_kernel
@pytest.mark.parametrize("n", [96, 33])  # 33 rows: the transposed product falls back
def test_backward_takes_it(n, isa_restore):
    """The gradient of x through qengine.matmul with more than 16 bfloat16 rows, on the native
    kernel and on an ISA without it, within the float64 bound of g @ W."""
    q = quantized(n, 256, "nf4", 64, True)
    g = torch.randn(40, n).to(torch.bfloat16)
    w64 = q.dequantize().to(torch.float64)
    g64 = g.to(torch.float64)
    ref = g64 @ w64
    bound = 8 * n ** 0.5 * 2.0**-24 * (g64.abs() @ w64.abs()) + 2.0**-8 * (g64.abs() @ w64.abs())
    for isa in (*GEMM_ISAS, "avx512"):
        qengine.set_cpu_isa(isa)
        x = torch.randn(40, 256).to(torch.bfloat16).requires_grad_()
        qengine.matmul(x, q).backward(g)
        assert x.grad.dtype == torch.bfloat16
        assert ((x.grad.to(torch.float64) - ref).abs() <= bound).all(), isa


@needs_kernel
@pytest.mark.parametrize("m", [17, 64, 129])
def test_public_matmul_takes_it_with_lora(m, isa_restore):
    """qengine.matmul with more than 16 bfloat16 rows: the same product plus the LoRA side path,
    rounded once to bfloat16, within the float64 bound; and the fallback (an ISA without the
    kernel) agrees within the same bound."""
    q = quantized(160, 640, "nf4", 64, True)
    x = torch.randn(m, 640).to(torch.bfloat16)
    a, b = torch.randn(8, 640) * 0.05, torch.randn(160, 8) * 0.05
    w64 = q.dequantize().to(torch.float64)
    x64 = x.to(torch.float64)
    side = 0.5 * (x64 @ a.to(torch.float64).t()) @ b.to(torch.float64).t()
    ref = x64 @ w64.t() + side
    bound = matmul_bound(x64, w64, torch.bfloat16, extra=side.abs())
    for isa in (*GEMM_ISAS, "avx512"):
        qengine.set_cpu_isa(isa)
        y = qengine.matmul(x, q, lora=(a, b, 0.5))
        assert y.dtype == torch.bfloat16 and y.shape == (m, 160)
        assert ((y.to(torch.float64) - ref).abs() <= bound).all(), isa


@needs_kernel
@pytest.mark.parametrize("r", [1, 5, 16, 19])
@pytest.mark.parametrize("ab_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lora_side_path_in_the_epilogue(r, ab_dtype, gemm_isa):
    """y = x @ W^T + s (x @ A^T) @ B^T with the side path summed in the kernel's float32 epilogue
    (ranks that do and do not fill its groups of 8), then one rounding: within the float64 bound
    of the whole sum, columns past a panel's end included (N = 70)."""
    q = quantized(70, 320, "nf4", 64, True)
    x = torch.randn(30, 320).to(torch.bfloat16)
    a = (torch.randn(r, 320) * 0.1).to(ab_dtype)
    b = (torch.randn(70, r) * 0.1).to(ab_dtype)
    y = qengine.matmul(x, q, lora=(a, b, 0.75))
    x64, w64 = x.to(torch.float64), q.dequantize().to(torch.float64)
    side = 0.75 * (x64 @ a.to(torch.float64).t()) @ b.to(torch.float64).t()
    ref = x64 @ w64.t() + side
    assert ((y.to(torch.float64) - ref).abs() <= matmul_bound(x64, w64, torch.bfloat16, extra=side.abs())).all()


@needs_kernel
def test_same_bits_at_any_thread_count(threads_restore, gemm_isa):
    """Each output element is summed by one task in one order, however the rows are shared."""
    q = quantized(1000, 1024, "nf4", 64, True)
    x = torch.randn(50, 1024).to(torch.bfloat16)
    outs = []
    for threads in (1, 2, 3):
        qengine.set_num_threads(threads)
        outs.append(large_product(x, q)[1])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
@pytest.mark.skipif(not qengine._C.vbmi_scales(), reason="8-bit codes need VBMI's byte permutes (or QENGINE_NO_VBMI is set)")
@pytest.mark.parametrize("k", [160, 544, 1024])  # K % 128: 32, 32, 0
@pytest.mark.parametrize("n,m", [(70, 17), (129, 40)])
@pytest.mark.parametrize("fmt,blocksize,dq", [("int8", 32, False), ("int8", 64, True),
                                              ("int8", 1024, False), ("dynamic8", 32, True), ("fp8_e4m3", 32, False)])
def test_8bit_codes(k, n, m, fmt, blocksize, dq, isa_restore):
    """8-bit absmax codes on the avx512_bf16 row (a VBMI CPU's): 128-input chunks looked up in the
    table's byte planes (two planes for fp8_e4m3's table) and paired into the panels, K tails in
    input order, each weight rounded once to bfloat16 as for 4-bit codes; the transposed product
    by 32-column segments of two rows (n even); below min_rows_bytes (17) both stay with the
    fallbacks."""
    if k % blocksize:
        pytest.skip("the block size does not divide K")
    q = quantized(n, k, fmt, blocksize, dq, seed=5)
    x = torch.randn(m, k).to(torch.bfloat16)
    qengine.set_cpu_isa("avx512_bf16")
    done, y = large_product(x, q)
    assert done
    assert_model_bound(y, x, q)
    assert not large_product(x[:16], q)[0]
    g = torch.randn(m, n).to(torch.bfloat16)
    done, gx = large_product_t(g, q)
    assert done == (n % 2 == 0)
    if done:
        assert_model_bound(gx, g, q, transposed=True)
        assert not large_product_t(g[:16], q)[0]


@needs_kernel
@pytest.mark.parametrize("n,k,m", [(96, 512, 17), (33, 96, 12), (129, 544, 25), (300, 1056, 40)])
@pytest.mark.parametrize("fmt,blocksize,dq", [("uint4", 64, True), ("uint4", 32, False), ("uint4", 1024, False),
                                              ("uint8", 64, True), ("uint8", 32, False)])
def test_minmax_codes(n, k, m, fmt, blocksize, dq, isa_restore):
    """Minmax codes on the avx512_bf16 row, each weight fma(table[q], scale, offset) rounded once
    to bfloat16 (dequantize's value): in the forward folded into the chunk tables (4-bit) or the
    byte-plane chunks (8-bit, VBMI CPUs, from 17 rows), K tails by segments; in the transposed
    product (W's rows in pairs: n even) by segments. The amx row leaves them to the fallback."""
    if k % blocksize:
        pytest.skip("the block size does not divide K")
    if fmt == "uint8" and not qengine._C.vbmi_scales():
        pytest.skip("8-bit codes need VBMI's byte permutes (or QENGINE_NO_VBMI is set)")
    q = quantized(n, k, fmt, blocksize, dq, seed=3)
    x = torch.randn(max(m, 17) if fmt == "uint8" else m, k).to(torch.bfloat16)
    qengine.set_cpu_isa("avx512_bf16")
    done, y = large_product(x, q)
    assert done
    assert_model_bound(y, x, q)
    g = torch.randn(x.shape[0], n).to(torch.bfloat16)
    done, gx = large_product_t(g, q)
    assert done == (n % 2 == 0)
    if done:
        assert_model_bound(gx, g, q, transposed=True)
    if "amx" in qengine.build_info()["supported_cpu_isas"]:
        qengine.set_cpu_isa("amx")
        assert not large_product(x, q)[0]


@pytest.mark.parametrize("case", ["float32 x", "float16 x", "K % 32", "row blocks"])
def test_leaves_what_it_does_not_take_to_the_fallback(case):
    """Where the kernel does not apply it reports so and writes nothing; qengine.matmul then
    takes the tiled path, still within the float64 bound."""
    fmt, n, k, bs, dtype = "nf4", 40, 256, 64, torch.bfloat16
    if case == "float32 x":
        dtype = torch.float32
    elif case == "float16 x":
        dtype = torch.float16
    elif case == "K % 32":
        k, bs = 200, 32  # blocks straddle rows
    elif case == "row blocks":
        k = 320  # one block per row, 320 inputs: not a power of two
    q = qengine.quantize(torch.randn(n, k), fmt, None if case == "row blocks" else bs)
    x = torch.randn(20, k).to(dtype)
    done, y = large_product(x, q)
    assert not done and y.isnan().all()
    w64 = q.dequantize().to(torch.float64)
    x64 = x.to(torch.float64)
    assert ((qengine.matmul(x, q).to(torch.float64) - x64 @ w64.t()).abs() <= matmul_bound(x64, w64, dtype)).all()


@needs_kernel
@pytest.mark.parametrize("n,k,m", [(96, 512, 17), (130, 1088, 25), (300, 576, 40)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("with_lora", [False, True])
def test_bfloat16_output_is_the_float32_sum_rounded_once(n, k, m, sparse, with_lora, gemm_isa):
    """The bfloat16 output the public path takes (no float32 copy of y) equals the float32
    output rounded by torch, bit for bit: inputs in one block (512) or several (partial sums kept
    per task, the last block rounding), column tails, 2:4, the LoRA epilogue."""
    if sparse and k % 256:
        k = 256 * (k // 256 + 1)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    q = qengine.quantize(w, "nf4", 64, double_quant=True, sparsity="2:4" if sparse else None)
    x = torch.randn(m, k).to(torch.bfloat16)
    lora = (torch.randn(5, k) * 0.1, torch.randn(n, 5) * 0.1, 0.5) if with_lora else None
    done32, y32 = large_product(x, q, lora=lora)
    done16, y16 = large_product(x, q, torch.bfloat16, lora=lora)
    assert done32 and done16
    assert torch.equal(y16.view(torch.int16), y32.to(torch.bfloat16).view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("n,k,m", [(96, 512, 17), (1030, 160, 40), (514, 288, 13)])
def test_transposed_bfloat16_output_is_the_float32_sum_rounded_once(n, k, m, gemm_isa):
    q = quantized(n, k, "nf4", 32, True, seed=2)
    g = torch.randn(m, n).to(torch.bfloat16)
    done32, gx32 = large_product_t(g, q)
    done16, gx16 = large_product_t(g, q, torch.bfloat16)
    assert done32 and done16
    assert torch.equal(gx16.view(torch.int16), gx32.to(torch.bfloat16).view(torch.int16))


@needs_kernel
def test_empty_dimensions(gemm_isa):
    q = quantized(8, 64, "nf4", 64, True)
    assert qengine.matmul(torch.zeros(0, 64, dtype=torch.bfloat16), q).shape == (0, 8)
    done, y = large_product(torch.randn(20, 64).to(torch.bfloat16), q)
    assert done and torch.isfinite(y).all()


@needs_kernel
@pytest.mark.parametrize("n,k,m", [(40, 256, 17), (33, 512, 40), (130, 768, 25)])
@pytest.mark.parametrize("blocksize,dq", [(64, True), (32, False), (128, True)])
def test_sparse24_against_its_dequantized_weight(n, k, m, blocksize, dq, gemm_isa):
    """The 2:4 layout through the same GEMM: each 32-input segment rebuilt from the chunk's
    interleaved codes and 2-bit positions (zeros where nothing is stored) equals
    sparse24_dequantize's bfloat16 weight, so the product is within the accumulation bound of
    x @ that weight; and the public op agrees, LoRA included."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    q = qengine.quantize(w, "nf4", blocksize, double_quant=dq, sparsity="2:4")
    x = torch.randn(m, k).to(torch.bfloat16)
    done, y = large_product(x, q)
    assert done
    x64 = x.to(torch.float64)
    w_model = q.dequantize(torch.bfloat16).to(torch.float64)
    assert ((w_model.reshape(n, k // 4, 4) != 0).sum(-1) <= 2).all()
    ref = x64 @ w_model.t()
    mag = x64.abs() @ w_model.abs().t()
    assert ((y.to(torch.float64) - ref).abs() <= 8 * k ** 0.5 * 2.0**-24 * mag).all()
    a, b = torch.randn(4, k) * 0.05, torch.randn(n, 4) * 0.05
    side = 0.5 * (x64 @ a.to(torch.float64).t()) @ b.to(torch.float64).t()
    yl = qengine.matmul(x, q, lora=(a, b, 0.5)).to(torch.float64)
    w64 = q.dequantize().to(torch.float64)
    assert ((yl - (x64 @ w64.t() + side)).abs() <= matmul_bound(x64, w64, torch.bfloat16, extra=side.abs())).all()


@needs_kernel
def test_sparse24_rows_not_a_multiple_of_256_fall_back(gemm_isa):
    q = qengine.quantize(torch.randn(24, 384), "nf4", 64, sparsity="2:4")
    done, y = large_product(torch.randn(20, 384).to(torch.bfloat16), q)
    assert not done and y.isnan().all()


@needs_kernel
@pytest.mark.parametrize("n,m", [(96, 40), (130, 17)])
def test_sparse24_backward_takes_it(n, m, isa_restore):
    """The gradient of x through a 2:4 weight with more than 16 bfloat16 rows (the transposed
    GEMM on 2:4 panels; 130 rows: pairs of rows to the last), on the native kernel and on an
    ISA without it, within the float64 bound of g @ W."""
    q = qengine.quantize(torch.randn(n, 512), "nf4", 64, double_quant=True, sparsity="2:4")
    g = torch.randn(m, n).to(torch.bfloat16)
    w64 = q.dequantize().to(torch.float64)
    g64 = g.to(torch.float64)
    mag = g64.abs() @ w64.abs()
    bound = 8 * n ** 0.5 * 2.0**-24 * mag + 2.0**-8 * mag
    for isa in (*GEMM_ISAS, "avx512"):
        qengine.set_cpu_isa(isa)
        x = torch.randn(m, 512).to(torch.bfloat16).requires_grad_()
        qengine.matmul(x, q).backward(g)
        assert ((x.grad.to(torch.float64) - g64 @ w64).abs() <= bound).all(), isa
