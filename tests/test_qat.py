"""QAT: fake_quantize is exactly dequantize(quantize(w)), its straight-through gradient,
FakeQuantLinear / prepare, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qengine
import reference as ref
from cases import FORMAT_NAMES, fmt_of, make_input
from qengine import qat


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_equals_dequantize_quantize(fmt, dtype, double_quant):
    w = make_input((24, 100), dtype)
    for bs in (32, None):
        expect = qengine.quantize(w, fmt_of(fmt), bs, double_quant=double_quant).dequantize()
        got = qat.fake_quantize(w, fmt_of(fmt), bs, double_quant)
        assert got.dtype == dtype and torch.equal(got, expect)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_rule_formats_fake_quantize_as_stored(fmt, dtype):
    # These formats fix their scale codes (E8M0, E4M3) or code rule (FP8 bits): the fake
    # weights are the stored format's, with the identity gradient.
    w = make_input((24, 128), dtype).requires_grad_()
    bs = {"mxfp4": 32, "nvfp4": 16, "fp8_e4m3": None}[fmt]
    got = qat.fake_quantize(w, fmt, bs)
    assert got.dtype == dtype and torch.equal(got, qengine.quantize(w.detach(), fmt, bs).dequantize())
    g = torch.randn(24, 128, dtype=dtype)
    got.backward(g)
    assert torch.equal(w.grad, g)
    with pytest.raises(ValueError, match="clip"):
        qat.fake_quantize(w, fmt, bs, clip=0.9)


@pytest.mark.parametrize("fmt,bs", [("mxfp4", 32), ("nvfp4", 16), ("fp8_e4m3", None)])
def test_own_rule_formats_prepare_and_convert(fmt, bs):
    torch.manual_seed(0)
    model = qat.prepare(nn.Sequential(nn.Linear(128, 40)), format=fmt, blocksize=bs)
    x = torch.randn(3, 128)
    y = model(x)
    converted = qat.convert(model)
    assert converted[0].format.name == fmt
    torch.testing.assert_close(converted[0](x), y, rtol=1e-5, atol=1e-5)  # the same weights, another sum order


def test_forward_matches_float64_reference():
    w = make_input((7, 64), torch.float32)
    got = qat.fake_quantize(w, "int4", 32)
    assert torch.equal(got, ref.dequantize(ref.quantize(w, "int4", 32)))


def test_ste_gradient_is_identity_without_clipping():
    w = make_input((8, 64), torch.float32).requires_grad_()
    g = torch.randn(8, 64)
    qat.fake_quantize(w, "nf4", 32).backward(g)
    assert torch.equal(w.grad, g)


def test_clipped_forward_and_gradient():
    w = make_input((6, 96), torch.float32)
    blocks = w.reshape(-1, 32)
    bound = blocks.abs().amax(1, keepdim=True) * 0.7  # clip * block max |w|, one float32 rounding
    inside = (blocks.abs() <= bound).reshape(w.shape)
    clamped = torch.maximum(torch.minimum(blocks, bound), -bound).reshape(w.shape)
    wg = w.clone().requires_grad_()
    out = qat.fake_quantize(wg, "int8", 32, clip=0.7)
    assert torch.equal(out, qengine.quantize(clamped, "int8", 32).dequantize())
    g = torch.randn_like(w)
    out.backward(g)
    assert torch.equal(wg.grad, torch.where(inside, g, 0.0))
    assert 0 < int((~inside).sum()) < w.numel()  # the test clips some, not all


def test_prepare_swaps_linears_and_shares_parameters():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 4)))
    w0 = model[0].weight
    qat.prepare(model, format="int4", blocksize=None, skip=["2.1"])
    assert isinstance(model[0], qat.FakeQuantLinear) and isinstance(model[2][0], qat.FakeQuantLinear)
    assert type(model[2][1]) is nn.Linear
    assert model[0].weight is w0
    x = torch.randn(5, 16)
    h = F.relu(F.linear(x, qengine.quantize(w0.detach(), "int4", None).dequantize(), model[0].bias))
    assert torch.equal(model[0](x), F.linear(x, qengine.quantize(w0.detach(), "int4", None).dequantize(),
                                             model[0].bias))
    assert model(x).shape == (5, 4) and h.shape == (5, 32)


def test_training_step_updates_weights_through_ste():
    model = qat.prepare(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)), format="nf4", blocksize=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    before = model[0].weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    # STE reference: the gradient of the loss w.r.t. the fake-quantized weight, passed through.
    wq = model[0].fake_weight().detach().requires_grad_()
    h = torch.tanh(F.linear(x, wq, model[0].bias.detach()))
    F.cross_entropy(F.linear(h, model[2].fake_weight().detach(), model[2].bias.detach()), y).backward()
    assert torch.allclose(model[0].weight.grad, wq.grad, rtol=1e-6, atol=1e-7)
    opt.step()
    assert not torch.equal(model[0].weight.detach(), before)


def test_compile_fullgraph():
    model = qat.prepare(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), format="uint4", blocksize=32,
                        double_quant=True)
    x = torch.randn(3, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert torch.equal(y, model(x))
    y.sum().backward()
    assert model[0].weight.grad is not None


def test_opcheck():
    w = make_input((4, 64), torch.float32).requires_grad_()
    fmt = qengine.get_format("nf4")
    table, mids, order, grid = fmt.kernel_tables()
    for clip in (1.0, 0.8):
        torch.library.opcheck(torch.ops.qengine.fake_quantize.default,
                              (w, table, mids, order, grid, 4, 32, 0, True, True, clip))


def test_bad_input():
    w = torch.randn(4, 64)
    for clip in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="clip"):
            qat.fake_quantize(w, "int4", 32, clip=clip)
    with pytest.raises(ValueError, match="absmax"):
        qat.fake_quantize(w, "uint4", 32, clip=0.9)
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qat.fake_quantize(bad, "int4", 32)
    with pytest.raises(ValueError, match="blocksize"):
        qat.fake_quantize(w, "int4", 48)
    with pytest.raises(TypeError, match="float"):
        qat.fake_quantize(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="skip"):
        qat.prepare(nn.Sequential(nn.Linear(4, 4)), skip="0")


@pytest.mark.parametrize("fmt,bs,dq,clip", [("int4", None, False, 1.0), ("nf4", 64, True, 1.0),
                                            ("uint4", 64, False, 1.0), ("int4", 64, False, 0.9)])
def test_convert_keeps_the_fake_quant_bytes(fmt, bs, dq, clip):
    """convert() gives QuantLinear layers whose dequantized weights equal the fake-quant
    weights exactly, so eval outputs are equal."""
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    qengine.qat.prepare(model, format=fmt, blocksize=bs, double_quant=dq, clip=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 96)
    model(x).square().mean().backward()  # one step, so convert sees trained weights
    opt.step()
    fakes = [m.fake_weight().detach() for m in model if isinstance(m, qengine.qat.FakeQuantLinear)]
    with torch.no_grad():
        want = model.eval()(x)
    qengine.qat.convert(model)
    layers = [m for m in model if isinstance(m, qengine.nn.QuantLinear)]
    assert len(layers) == 2
    for layer, fake in zip(layers, fakes):
        assert torch.equal(layer.dequantize(torch.float32), fake)
    with torch.no_grad():
        assert torch.allclose(model(x), want, rtol=1e-5, atol=1e-5)


def test_convert_needs_fake_quant_layers():
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        qengine.qat.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_double_quant_overflow_is_named():
    """Finite weights near the float32 limit: the block scales' float32 mean overflows, and
    fake_quantize says so as quantize does (found by the property tests: it reported a NaN or
    Inf input instead)."""
    w = torch.randn(64)
    w[0] = w[32] = torch.finfo(torch.float32).max
    for fn in (lambda: qengine.quantize(w, "nf4", 32, double_quant=True),
               lambda: qat.fake_quantize(w, "nf4", 32, True)):
        with pytest.raises(ValueError, match="double quantization: the mean of the block scales"):
            fn()
    assert torch.equal(qat.fake_quantize(w, "nf4", 32, False), qengine.quantize(w, "nf4", 32).dequantize())
