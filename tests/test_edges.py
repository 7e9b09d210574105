"""Sizes that end mid-vector (8 / 16 / 32 floats), mid-byte, mid-block and mid-GEMV-chunk, on
every CPU ISA: quantize, dequantize (allocating and out=), matmul on the fused and fallback
paths with LoRA, its transposed product and the k-means step, against tests/reference.py.

These are the cases .ci/sanitize.sh runs under AddressSanitizer once per ISA. Normally the
`isa` parameter switches through the supported ISAs with set_cpu_isa; when QENGINE_CPU_ISA is
set, only the ISA the module chose at load is used, so the environment override is what is
exercised."""

from __future__ import annotations

import math
import os

import pytest
import torch

import qengine
import reference as R
from cases import DTYPES, fmt_of

SUPPORTED = qengine.build_info()["supported_cpu_isas"]
_ENV_ISA = os.environ.get("QENGINE_CPU_ISA")
ISAS = [_ENV_ISA] if _ENV_ISA in SUPPORTED else SUPPORTED

# Around the vector widths (8 floats AVX2, 16 AVX-512, 32 bf16 / 64 nibbles a register) and
# around 32-element blocks; with blocksize 32 every size past 32 also ends mid-block.
SIZES = [1, 2, 7, 9, 15, 17, 31, 33, 47, 63, 65, 95, 127, 129, 255, 257]
# Several blocks with a partial last one, for the batched whole-block paths (blocksize % 32 == 0).
MULTI = [(64, 3 * 64 + 1), (64, 5 * 64 + 17), (128, 2 * 128 + 63), (32, 9 * 32 + 31), (256, 256 + 129)]


@pytest.fixture(params=ISAS)
def isa(request, isa_restore):
    if _ENV_ISA is None:
        qengine.set_cpu_isa(request.param)
    assert qengine.build_info()["cpu_isa"] == request.param
    return request.param


def _check_exact(x, fmt, bs, dq=False):
    q = qengine.quantize(x, fmt, bs, double_quant=dq)
    r = R.quantize(x, fmt, bs, dq)
    assert torch.equal(q.packed, r.packed)
    if not dq:
        signed = qengine.get_format(fmt).rule == "absmax"
        assert R.same_bits(q.scales, r.scales, signed_zeros=signed)
    for dtype in DTYPES:
        want = R.dequantize(r, dtype)
        assert torch.equal(q.dequantize(dtype), want)
        out = torch.full(x.shape, float("nan"), dtype=dtype)
        assert q.dequantize(out=out) is out and torch.equal(out, want)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "uint4", "cb5", "cb200"])
def test_sizes_around_vector_widths(isa, fmt):
    f = fmt_of(fmt)
    for n in SIZES:
        for dtype in DTYPES:
            x = (torch.randn(n) * 3).to(dtype)
            _check_exact(x, f, 32)
            _check_exact(x, f, None)  # one block of exactly n: every n ends mid-vector


@pytest.mark.parametrize("fmt", ["nf4", "uint4", "int8", "cb200"])
def test_partial_last_block(isa, fmt):
    f = fmt_of(fmt)
    for bs, n in MULTI:
        for dtype in DTYPES:
            x = (torch.randn(n) * torch.rand(n)).to(dtype)
            _check_exact(x, f, bs, dq=(n % 2 == 1))


def _bound(x64, w64, dtype, extra=0.0):
    # as tests/test_matmul.py: float32 accumulation over K plus the output rounding
    mag = x64.abs() @ w64.abs().t() + extra
    eps_out = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    return 8 * math.sqrt(x64.shape[-1]) * 2.0**-24 * mag + eps_out * mag


# (N, K, blocksize): the fused GEMV (K % 128 == 0, power-of-two block), a block straddling the
# end of a 128-chunk, fallbacks with K ending mid-vector, per-row blocks.
LAYERS = [(13, 128, 32), (9, 384, 128), (17, 256, 256), (5, 200, 64), (11, 33, None), (3, 17, 32), (7, 129, None)]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l[0]}x{l[1]}-{l[2] or 'row'}")
def test_matmul_edges(isa, layer):
    n, k, bs = layer
    q = qengine.quantize(torch.randn(n, k), "nf4", bs, double_quant=(k % 2 == 0))
    w64 = q.dequantize().to(torch.float64)
    for m in (1, 7, 9, 16):
        for dtype in DTYPES:
            x = torch.randn(m, k).to(dtype).requires_grad_()
            a = (torch.randn(3, k) * 0.1).to(dtype)
            b = (torch.randn(n, 3) * 0.1).to(dtype)
            y = qengine.matmul(x, q, lora=(a, b, 0.5))
            x64, a64, b64 = (t.detach().to(torch.float64) for t in (x, a, b))
            side = (x64 @ a64.t()) @ b64.t()
            ref = x64 @ w64.t() + 0.5 * side
            extra = 0.5 * (x64 @ a64.t()).abs() @ b64.abs().t()
            assert ((y.detach().to(torch.float64) - ref).abs() <= _bound(x64, w64, dtype, extra)).all(), (m, dtype)
            g = torch.randn(m, n).to(dtype)
            y.backward(g)  # matmul_t: the transposed product over the same weight
            g64 = g.to(torch.float64)
            gref = g64 @ w64 + 0.5 * (g64 @ b64) @ a64
            gmag = g64.abs() @ w64.abs() + 0.5 * (g64.abs() @ b64.abs()) @ a64.abs()
            tol = 8 * math.sqrt(n) * 2.0**-24 * gmag + {torch.float32: 2.0**-22, torch.float16: 2.0**-10,
                                                         torch.bfloat16: 2.0**-7}[dtype] * gmag
            assert ((x.grad.to(torch.float64) - gref).abs() <= tol).all(), (m, dtype)


@pytest.mark.parametrize("fmt", ["uint4", "fp4"])
def test_matmul_minmax_and_unsorted_tables(isa, fmt):
    q = qengine.quantize(torch.randn(10, 160), fmt, 32)
    w64 = q.dequantize().to(torch.float64)
    x = torch.randn(3, 160)
    y = qengine.matmul(x, q).to(torch.float64)
    assert ((y - x.double() @ w64.t()).abs() <= _bound(x.double(), w64, torch.float32)).all()


@pytest.mark.parametrize("n", [33, 65, 1000])
def test_fit_codebook_edges(isa, n):
    x = torch.randn(n)
    fmt = qengine.fit_codebook(x, bits=4, blocksize=32, iters=3)
    _check_exact(x, fmt, 32)


def test_subnormal_offset_at_a_rounding_tie(isa):
    """minmax decode is one rounding of code * scale + offset: with a subnormal block minimum
    and a product exactly halfway between two float32 values the offset decides the tie (the
    kernels' fused multiply-add; the reference got this wrong before fma_to_float32)."""
    x = torch.tensor([-2.9387e-39, 0.5, 1.5, 0.6, 1.2, 1.4], dtype=torch.bfloat16)
    q = qengine.quantize(x, "uint4", 32)
    scale, offset = q.scales[0].item(), q.offsets[0].item()
    assert scale == 1.5 and 0 > offset > -1.2e-38  # a subnormal float32 offset
    values = torch.tensor(qengine.get_format("uint4").values, dtype=torch.float64)
    prod = values * scale
    assert (prod.to(torch.float32).to(torch.float64) != prod).any()  # some products are not float32 values
    out = torch.empty(16, dtype=torch.float32)
    q16 = qengine.QuantizedTensor(torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8),
                                  q.scales, q.offsets, q.format, torch.Size([16]), torch.float32, 32)
    q16.dequantize(out=out)  # every code once
    want = R.fma_to_float32(prod, torch.full_like(prod, offset))
    assert torch.equal(out, want)
    assert not torch.equal(want, (prod + offset).to(torch.float32))  # the tie the plain sum misrounds
