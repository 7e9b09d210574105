"""The gemm family's amx row (csrc/cpu/gemm/gemm_amx.cpp) beyond what test_gemm.py runs on every
gemm ISA: rows 1-600 (one 16-row tile, two, the streaming path's limit of 32, the blocked path
past it, and the fallback past 256 rows), inputs past the last whole 128-input chunk (which keep input order), every block
size (16 and nvfp4's decode in input order and are reordered; 32 blends two tables; 64 and up fold
the scales into one), the 2:4 layout's chunks, the crossover to the small-batch GEMV, and agreement with the
avx512_bf16 row: both multiply the same bfloat16 weights (each rounded once from its float32
dequantized value), so they differ only by float32 summation order."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine import _C
from qengine.nn import QuantExperts
from support import assert_model_bound, large_product, large_product_t, matmul_bound

HAS_AMX = "amx" in qengine.build_info()["supported_cpu_isas"]
pytestmark = pytest.mark.skipif(not HAS_AMX, reason="this CPU (or its OS) gives no AMX tiles")


def weight(n, k, blocksize, dq=True, sparse=False, fmt="nf4", seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if fmt in ("mxfp4", "nvfp4"):
        return qengine.quantize(w, fmt)
    return qengine.quantize(w, fmt, blocksize, double_quant=dq, sparsity="2:4" if sparse else None)


@pytest.mark.parametrize("m", [1, 2, 5, 15, 16, 17, 31, 32, 33, 48, 63, 100, 255, 256, 257, 600])
def test_rows_1_to_600(m, isa_restore):
    """Up to the row's max_rows (256) the kernel takes the product; past it, it declines and writes
    nothing, and qengine.matmul's fallback (dense bfloat16 tiles) gives it within the same bound."""
    qengine.set_cpu_isa("amx")
    q = weight(200, 640, 64)
    x = torch.randn(m, 640).to(torch.bfloat16)
    done, y = large_product(x, q)
    assert done == (m <= 256)
    if done:
        assert_model_bound(y, x, q)
    else:
        assert y.isnan().all()
    g = torch.randn(m, 200).to(torch.bfloat16)
    done_t, gx = large_product_t(g, q)
    assert done_t == (m <= 256)
    if done_t:
        assert_model_bound(gx, g, q, transposed=True)
    x64, w64 = x.to(torch.float64), q.dequantize().to(torch.float64)
    y = qengine.matmul(x, q).to(torch.float64)
    assert ((y - x64 @ w64.t()).abs() <= matmul_bound(x64, w64, torch.bfloat16)).all()


@pytest.mark.parametrize("k", [32, 96, 160, 544, 1056])  # K % 128: 32, 96, 32, 32, 32
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("fmt,blocksize", [("nvfp4", 16), ("nf4", 32), ("nf4", 64), ("nf4", 128), ("nf4", 256)])
def test_inputs_past_the_last_whole_chunk(k, m, fmt, blocksize, isa_restore):
    if k % blocksize:
        pytest.skip("the block size does not divide K")
    qengine.set_cpu_isa("amx")
    q = weight(70, k, blocksize, dq=blocksize != 128, fmt=fmt)
    x = torch.randn(m, k).to(torch.bfloat16)
    done, y = large_product(x, q)
    assert done
    assert_model_bound(y, x, q)


@pytest.mark.skipif(not _C.vbmi_scales(), reason="8-bit codes need VBMI's byte permutes (or QENGINE_NO_VBMI is set)")
@pytest.mark.parametrize("k", [160, 544, 1024])  # K % 128: 32, 32, 0
@pytest.mark.parametrize("m", [8, 17, 40])  # one row tile, two (the streaming path), the blocked path
@pytest.mark.parametrize("fmt,blocksize,dq", [("int8", 32, False), ("int8", 64, True), ("int8", 1024, False),
                                              ("dynamic8", 32, True), ("fp8_e4m3", 32, False)])
def test_8bit_codes(k, m, fmt, blocksize, dq, isa_restore):
    """8-bit absmax codes (one a byte) decoded with VBMI byte permutes on the table's byte planes
    (two planes for fp8_e4m3's table, whose values have zero low 16 bits), each weight rounded once
    to bfloat16 as for 4-bit codes; from min_rows_bytes rows on, K tails in input order. The
    avx512_bf16 row takes them from its own min_rows_bytes (17; test_gemm.py)."""
    if k % blocksize:
        pytest.skip("the block size does not divide K")
    q = weight(70, k, blocksize, dq=dq, fmt=fmt, seed=5)
    x = torch.randn(m, k).to(torch.bfloat16)
    qengine.set_cpu_isa("amx")
    done, y = large_product(x, q)
    assert done
    assert_model_bound(y, x, q)
    assert not large_product(x[:7], q)[0]  # below min_rows_bytes (8): the 8-bit GEMV's
    qengine.set_cpu_isa("avx512_bf16")
    assert large_product(x, q)[0] == (m >= 17)


@pytest.mark.parametrize("fmt,blocksize", [("nf4", 32), ("fp4", 64), ("int4", 512), ("mxfp4", None),
                                           ("nvfp4", None)])
@pytest.mark.parametrize("m", [4, 24, 70])
def test_agrees_with_the_avx512_bf16_row(fmt, blocksize, m, isa_restore):
    """The same bfloat16 weights times the same bfloat16 x: the two rows' float32 sums differ by
    summation order only (a few float32 units of the magnitude)."""
    q = weight(130, 1024, blocksize, fmt=fmt, seed=4)
    x = torch.randn(m, 1024).to(torch.bfloat16)
    qengine.set_cpu_isa("amx")
    done_a, ya = large_product(x, q)
    qengine.set_cpu_isa("avx512_bf16")
    done_b, yb = large_product(x, q)
    assert done_a and done_b
    mag = x.to(torch.float64).abs() @ q.dequantize(torch.bfloat16).to(torch.float64).abs().t()
    assert ((ya.to(torch.float64) - yb.to(torch.float64)).abs() <= 16 * 1024 ** 0.5 * 2.0**-24 * mag).all()


@pytest.mark.parametrize("m", [1, 7, 12, 20, 32, 64, 300])  # 300: past the dense layout's 256-row limit
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_sparse24(m, blocksize, isa_restore):
    """2:4 weights: whole 256-input chunks decoded from their stored values and positions (the
    streaming path to 32 rows, the blocked one past it, K = 768 leaving a 256-input block), both
    products within the float64 bound."""
    qengine.set_cpu_isa("amx")
    q = weight(96, 768, blocksize, sparse=True)
    x = torch.randn(m, 768).to(torch.bfloat16)
    done, y = large_product(x, q)
    assert done
    assert_model_bound(y, x, q)
    g = torch.randn(m, 96).to(torch.bfloat16)
    done_t, gx = large_product_t(g, q)
    assert done_t  # the 2:4 layout has no row limit
    assert_model_bound(gx, g, q, transposed=True)


@pytest.mark.parametrize("blocksize", [32, 64, 128])  # the 640 stored values of a row: whole blocks
@pytest.mark.parametrize("m", [12, 24, 70])
def test_sparse24_agrees_with_the_avx512_bf16_row(blocksize, m, isa_restore):
    """The 2:4 layout on the tiles and on the avx512_bf16 row's panels: the same bfloat16 weights
    (zeros where nothing is stored), so both products differ by float32 summation order only."""
    q = weight(160, 1280, blocksize, sparse=True, seed=7)
    x = torch.randn(m, 1280).to(torch.bfloat16)
    g = torch.randn(m, 160).to(torch.bfloat16)
    results = {}
    for isa in ("amx", "avx512_bf16"):
        qengine.set_cpu_isa(isa)
        results[isa] = large_product(x, q), large_product_t(g, q)
    (fa, ta), (fb, tb) = results["amx"], results["avx512_bf16"]
    assert fa[0] and fb[0] and ta[0] and tb[0]
    w = q.dequantize(torch.bfloat16).to(torch.float64)
    for (ya, yb, a, b) in ((fa[1], fb[1], x, w.t()), (ta[1], tb[1], g, w)):
        mag = a.to(torch.float64).abs() @ b.abs()
        assert ((ya.to(torch.float64) - yb.to(torch.float64)).abs() <= 16 * 1280 ** 0.5 * 2.0**-24 * mag).all()


@pytest.mark.parametrize("n", [2, 34, 512, 546])  # pairs of W rows past a 32-row tile step: zero padded
@pytest.mark.parametrize("m", [1, 16, 33])
def test_transposed_rows_of_w_not_filling_a_tile(n, m, isa_restore):
    qengine.set_cpu_isa("amx")
    q = weight(n, 224, 32, seed=5)
    g = torch.randn(m, n).to(torch.bfloat16)
    done, gx = large_product_t(g, q)
    assert done
    assert_model_bound(gx, g, q, transposed=True)


def test_nonfinite_x_stays_in_its_row(isa_restore):
    """Rows of x are padded to whole tiles with zeros, never with another row's values: an inf in
    one row reaches that row's outputs only."""
    qengine.set_cpu_isa("amx")
    q = weight(64, 256, 64)
    x = torch.randn(5, 256).to(torch.bfloat16)
    x[2, 7] = float("inf")
    done, y = large_product(x, q)
    assert done
    assert not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4]]).all()


def test_public_matmul_takes_amx_from_the_crossover(isa_restore):
    """From _C.gemm_min_rows() rows on, qengine.matmul runs the amx row (bfloat16 x): its result
    is the kernel's, bit for bit; below it the small-batch GEMV (on AMX CPUs the float32 one:
    W in float32) meets the same bound with its own weight."""
    qengine.set_cpu_isa("amx")
    crossover = _C.gemm_min_rows()
    assert 1 < crossover <= _C.gemm_min_rows(sparse24=True) <= 16
    q = weight(96, 512, 64)
    for m in (crossover - 1, crossover, 16):
        x = torch.randn(m, 512).to(torch.bfloat16)
        y = qengine.matmul(x, q)
        kernel = large_product(x, q, torch.bfloat16)[1]
        if m >= crossover:
            assert torch.equal(y.view(torch.int16), kernel.view(torch.int16))
        assert_model_bound(y, x, q, rounded=True, weight_dtype=torch.bfloat16 if m >= crossover else torch.float32)
    qengine.set_cpu_isa("avx512_bf16")
    assert _C.gemm_min_rows() == 17


def test_backward_at_few_rows_takes_it(isa_restore):
    qengine.set_cpu_isa("amx")
    q = weight(96, 256, 64)
    x = torch.randn(6, 256).to(torch.bfloat16).requires_grad_()
    g = torch.randn(6, 96).to(torch.bfloat16)
    qengine.matmul(x, q).backward(g)
    assert torch.equal(x.grad.view(torch.int16), large_product_t(g, q, torch.bfloat16)[1].view(torch.int16))


@pytest.mark.parametrize("tokens", [3, 40, 200])
def test_moe_experts_with_many_rows_take_it(tokens, isa_restore):
    """QuantExperts with bfloat16 tokens: experts that receive at least the crossover's rows run on
    the amx row (the rest on the GEMV); the output agrees with the avx512_bf16 ISA's (its gemm,
    the same bfloat16 weights) to bfloat16 rounding of the intermediate and output, and with LoRA
    on both matrices too; on the GEMV, to the rounding of W to bfloat16 as well."""
    torch.manual_seed(0)
    E, H, inter = 4, 256, 128
    m = QuantExperts.from_weights(torch.randn(E, 2 * inter, H) * 0.1, torch.randn(E, H, inter) * 0.1,
                                  activation="silu", format="nf4", blocksize=64, double_quant=True)
    x = torch.randn(tokens, H).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2).to(torch.bfloat16)
    with torch.no_grad():
        qengine.set_cpu_isa("amx")
        crossover = _C.gemm_min_rows()
        ya = m(x, idx, w).to(torch.float64)
        qengine.set_cpu_isa("avx512_bf16")
        yb = m(x, idx, w).to(torch.float64)
    assert torch.isfinite(ya).all()
    # 40 and 200 tokens (every expert on the tiles) measured 0 to 6e-5: bfloat16 roundings of
    # float32 sums taken in another order. 3 tokens: every expert on the GEMV, whose amx row
    # takes W in float32 and avx512_bf16's in bfloat16 (2^-9 relative a weight): 3.3e-3.
    limit = 1e-2 if tokens < crossover else 1e-3  # an expert gets at most `tokens` rows
    assert float((ya - yb).norm() / yb.norm()) < limit
