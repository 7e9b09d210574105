"""qengine::lora_backward, the LoRA side path's share of the backward (native on a CPU with the
gemm family's kernels for bfloat16 x and gradients with float32 adapters, else the torch
composite): every output against float64 on shapes with every kind of tail (ranks below, at
and above one group of 16; columns that do not fill a 16- or 64-wide group; one row; none),
each output on its own and together, both ISAs, through QuantLinear's autograd, and the inputs
left as they were. And the side path's share of the forward where the product leaves it out
(the large-batch fallback: _C.lora_add_cpu, on the same kernels)."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine.nn import LoRALinear, QuantLinear
from qengine.ops.matmul import lora_backward

from cases import TORCH_JIT_DEPRECATION

HAS_KERNEL = "avx512_bf16" in qengine.build_info()["supported_cpu_isas"]
ISAS = ["avx512_bf16", "avx512"] if HAS_KERNEL else [qengine.build_info()["cpu_isa"]]

SHAPES = [(1, 16, 16, 1), (37, 200, 90, 5), (3, 33, 17, 20), (70, 1000, 130, 33), (130, 768, 256, 16)]


def inputs(m, k, n, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, m, k, generator=gen).to(torch.bfloat16)
    g = torch.randn(1, m, n, generator=gen).to(torch.bfloat16)
    gx = torch.randn(1, m, k, generator=gen).to(torch.bfloat16)
    a = torch.randn(r, k, generator=gen) * 0.3
    b = torch.randn(n, r, generator=gen) * 0.3
    return g, x, a, b, gx


def reference(g, x, a, b, s, gx):
    """(gx + s (g B) A, s (g B)^T x, s g^T (x A^T)) in float64, and the magnitudes their float32
    sums' errors scale with."""
    g64, x64, a64, b64 = (t.reshape(-1, t.shape[-1]).to(torch.float64) for t in (g, x, a, b))
    u, v = s * g64 @ b64, s * x64 @ a64.t()
    gx64 = gx.reshape(-1, gx.shape[-1]).to(torch.float64)
    want = (gx64 + u @ a64, u.t() @ x64, g64.t() @ v)
    ua = (s * g64.abs() @ b64.abs()) @ a64.abs()
    mags = (gx64.abs() + ua, (s * g64.abs() @ b64.abs()).t() @ x64.abs(), g64.abs().t() @ (s * x64.abs() @ a64.abs().t()))
    return want, mags


def float32_bound(mag, terms):
    return 8 * max(terms, 1) ** 0.5 * 2.0**-24 * mag + 1e-30


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_against_float64(m, k, n, r, isa, isa_restore):
    qengine.set_cpu_isa(isa)
    g, x, a, b, gx = inputs(m, k, n, r)
    s = 0.37
    kept = [t.clone() for t in (g, x, a, b, gx)]
    got_gx, got_ga, got_gb = lora_backward(g, x, a, b, s, gx, True, True)
    for before, t in zip(kept, (g, x, a, b, gx)):
        assert torch.equal(before, t)  # nothing the caller passed is modified
    (want_gx, want_ga, want_gb), (mag_gx, mag_ga, mag_gb) = reference(g, x, a, b, s, gx)
    assert got_gx.dtype == torch.bfloat16 and got_gx.shape == gx.shape
    assert got_ga.dtype == torch.float32 and got_ga.shape == a.shape
    assert got_gb.dtype == torch.float32 and got_gb.shape == b.shape
    # the input gradient: float32 sums over n then r, rounded to bfloat16 (at most twice: the
    # composite rounds the side path's share before adding it)
    bound_gx = float32_bound(mag_gx, n + r) + 2.0**-8 * mag_gx + 2.0**-8 * (mag_gx - gx.reshape(m, k).double().abs())
    assert ((got_gx.reshape(m, k).double() - want_gx).abs() <= bound_gx).all()
    assert ((got_ga.double() - want_ga).abs() <= float32_bound(mag_ga, m + n)).all()
    assert ((got_gb.double() - want_gb).abs() <= float32_bound(mag_gb, m + k)).all()


@pytest.mark.skipif(not HAS_KERNEL, reason="this CPU has no AVX512-BF16 (the native kernels' ISA)")
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_native_input_gradient_is_rounded_once(m, k, n, r, isa_restore):
    """The native kernel adds the side path's share in float32 and rounds once: within half a
    bfloat16 unit of the exact value, plus the float32 sums' error."""
    qengine.set_cpu_isa("avx512_bf16")
    g, x, a, b, gx = inputs(m, k, n, r, seed=1)
    got, _, _ = lora_backward(g, x, a, b, 1.5, gx, False, False)
    (want, _, _), (mag, _, _) = reference(g, x, a, b, 1.5, gx)
    _, exponent = torch.frexp(want)  # |want| in [2^(e-1), 2^e): a bfloat16 unit there is 2^(e-8)
    half_unit = torch.ldexp(torch.ones_like(want), exponent - 9)
    bound = float32_bound(mag, n + r) * 2 + half_unit
    assert ((got.reshape(m, k).double() - want).abs() <= bound).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("need", ["gx", "a", "b", "ab", "none"])
def test_each_output_alone(need, isa, isa_restore):
    qengine.set_cpu_isa(isa)
    g, x, a, b, gx = inputs(37, 200, 90, 5, seed=2)
    with_gx = "gx" in need
    got = lora_backward(g, x, a, b, 0.5, gx if with_gx else None, "a" in need, "b" in need)
    full = lora_backward(g, x, a, b, 0.5, gx, True, True)
    for i, wanted in enumerate((with_gx, "a" in need, "b" in need)):
        if wanted:
            assert torch.equal(got[i], full[i])  # the same sums whichever others are asked for
        else:
            assert got[i] is None


@pytest.mark.parametrize("isa", ISAS)
def test_no_rows(isa, isa_restore):
    qengine.set_cpu_isa(isa)
    g, x, a, b, gx = inputs(0, 64, 32, 4)
    got_gx, got_ga, got_gb = lora_backward(g, x, a, b, 1.0, gx, True, True)
    assert got_gx.shape == (1, 0, 64)
    assert torch.equal(got_ga, torch.zeros_like(a)) and torch.equal(got_gb, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_take_the_composite(dtype, isa_restore):
    """x and grad in another dtype, or adapters in bfloat16: the composite, same contract."""
    g, x, a, b, gx = inputs(20, 96, 40, 4, seed=3)
    g, x, gx = g.to(dtype), x.to(dtype), gx.to(dtype)
    got_gx, got_ga, got_gb = lora_backward(g, x, a, b, 0.5, gx, True, True)
    (want_gx, want_ga, want_gb), (mag_gx, mag_ga, mag_gb) = reference(g, x, a, b, 0.5, gx)
    eps = 2.0**-24 if dtype == torch.float32 else 2.0**-11
    assert got_gx.dtype == dtype
    assert ((got_gx.reshape(20, 96).double() - want_gx).abs() <= float32_bound(mag_gx, 44) + 2 * eps * mag_gx).all()
    assert ((got_ga.double() - want_ga).abs() <= float32_bound(mag_ga, 60)).all()
    got = lora_backward(g.to(torch.bfloat16), x.to(torch.bfloat16), a.to(torch.bfloat16), b.to(torch.bfloat16), 0.5,
                        None, True, True)
    assert got[0] is None and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16


def test_non_contiguous_inputs():
    g, x, a, b, gx = inputs(24, 64, 48, 8, seed=4)
    xt = x.reshape(24, 64).t().contiguous().t().reshape(1, 24, 64)  # same values, transposed storage
    at = a.t().contiguous().t()
    assert not at.is_contiguous()
    got = lora_backward(g, xt, at, b, 0.5, gx, True, True)
    want = lora_backward(g, x, a, b, 0.5, gx, True, True)
    for u, v in zip(got, want):
        assert torch.equal(u, v)


@pytest.mark.parametrize("isa", ISAS)
def test_through_quant_linear(isa, isa_restore):
    """Gradients of x, A and B through a bfloat16 QuantLinear with LoRA at 40 rows (the
    large-batch path), against float64 on the dequantized weight."""
    qengine.set_cpu_isa(isa)
    torch.manual_seed(5)
    layer = LoRALinear(QuantLinear.from_linear(torch.nn.Linear(320, 96, bias=False).to(torch.bfloat16)), r=6, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    x = torch.randn(40, 320).to(torch.bfloat16).requires_grad_()
    g = torch.randn(40, 96).to(torch.bfloat16)
    layer(x).backward(g)
    w64 = layer.base_layer.dequantize(torch.float32).to(torch.float64)
    x64 = x.detach().to(torch.float64).requires_grad_()
    a64 = layer.lora_A.detach().to(torch.float64).requires_grad_()
    b64 = layer.lora_B.detach().to(torch.float64).requires_grad_()
    (x64 @ w64.t() + 2.0 * (x64 @ a64.t()) @ b64.t()).backward(g.to(torch.float64))
    mag = g.double().abs() @ w64.abs() + 2.0 * (g.double().abs() @ b64.detach().abs()) @ a64.detach().abs()
    assert ((x.grad.double() - x64.grad).abs() <= 2.0**-7 * mag + 1e-6).all()
    for got, want in ((layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_forward_side_add_against_float64(m, k, n, r, isa, isa_restore):
    """y + s (x A^T) B^T for the large-batch fallback's output y (ops/cpu.py, _add_lora_side):
    native where the ISA has the kernels (float32 sums, one rounding), else the torch composite
    (two roundings); x, A and B left as they were."""
    from qengine.ops.cpu import _add_lora_side

    qengine.set_cpu_isa(isa)
    g, x, a, b, _ = inputs(m, k, n, r, seed=6)
    x2, y = x.reshape(m, k), g.reshape(m, n)  # g serves as a bfloat16 y [m, n]
    kept = [t.clone() for t in (x2, a, b)]
    want64 = y.double() + 0.37 * (x2.double() @ a.double().t()) @ b.double().t()
    got = _add_lora_side(y.clone(), x2, a, b, 0.37)
    for before, t in zip(kept, (x2, a, b)):
        assert torch.equal(before, t)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    side_mag = 0.37 * (x2.double().abs() @ a.double().abs().t()) @ b.double().abs().t()
    mag = y.double().abs() + side_mag
    _, exponent = torch.frexp(want64)
    half_unit = torch.ldexp(torch.ones_like(want64), exponent - 9)
    if isa == "avx512_bf16":  # native: rounded once
        bound = 2 * float32_bound(mag, k + r) + half_unit
    else:  # composite: the side path rounded to bfloat16, then the sum
        bound = float32_bound(mag, k + r) + 2.0**-8 * mag + half_unit
    assert ((got.double() - want64).abs() <= bound).all()


@pytest.mark.parametrize("isa", ISAS)
def test_large_batch_fallback_with_lora(isa, isa_restore):
    """A bfloat16 product with LoRA that no large-batch kernel takes (K = 40 is not a multiple
    of 32): dequantized tiles, torch's GEMM, then the side path added; against float64 on the
    dequantized weight, forward and gradients."""
    qengine.set_cpu_isa(isa)
    torch.manual_seed(7)
    layer = LoRALinear(QuantLinear.from_linear(torch.nn.Linear(40, 72, bias=False).to(torch.bfloat16), blocksize=32),
                       r=6, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    x = torch.randn(300, 40).to(torch.bfloat16).requires_grad_()
    g = torch.randn(300, 72).to(torch.bfloat16)
    y = layer(x)
    y.backward(g)
    w64 = layer.base_layer.dequantize(torch.float32).to(torch.float64)
    x64 = x.detach().to(torch.float64).requires_grad_()
    a64 = layer.lora_A.detach().to(torch.float64).requires_grad_()
    b64 = layer.lora_B.detach().to(torch.float64).requires_grad_()
    y64 = x64 @ w64.t() + 2.0 * (x64 @ a64.t()) @ b64.t()
    y64.backward(g.to(torch.float64))
    ymag = x64.detach().abs() @ w64.abs().t() + 2.0 * (x64.detach().abs() @ a64.detach().abs().t()) @ b64.detach().abs().t()
    assert ((y.detach().double() - y64.detach()).abs() <= 2.0**-7 * ymag + 1e-6).all()
    mag = g.double().abs() @ w64.abs() + 2.0 * (g.double().abs() @ b64.detach().abs()) @ a64.detach().abs()
    assert ((x.grad.double() - x64.grad).abs() <= 2.0**-7 * mag + 1e-6).all()
    for got, want in ((layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck(dtype):
    """Schema, fake and dispatch of qengine::lora_backward: native (bfloat16) and composite."""
    g, x, a, b, gx = inputs(20, 96, 40, 4, seed=6)
    g, x, gx = g.to(dtype), x.to(dtype), gx.to(dtype)
    for args in ((g, x, a, b, 0.5, gx, True, True), (g, x, a, b, 0.5, None, True, False),
                 (g, x, a, b, 0.5, gx, False, False)):
        torch.library.opcheck(torch.ops.qengine.lora_backward.default, args)


def test_double_backward_is_refused_clearly():
    """A second backward through the LoRA side path's gradients says what is not supported."""
    layer = LoRALinear(QuantLinear.from_linear(torch.nn.Linear(64, 32)), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    (ga,) = torch.autograd.grad(layer(x).square().sum(), layer.lora_A, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        ga.sum().backward()
