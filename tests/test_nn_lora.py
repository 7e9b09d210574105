"""qengine.nn.LoRALinear over QuantLinear and nn.Linear bases: initial identity, forward and
backward against float64 references (fused and dropout paths), merging, adapters, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qengine.nn import LoRALinear, QuantLinear


def _quant_base(n=48, k=256, bias=True):
    return QuantLinear.from_linear(nn.Linear(k, n, bias=bias), "nf4", 64, True)


def _randomise(lora):
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.1)  # B starts at zero; give the side path something to do


@pytest.mark.parametrize("kind", ["quant", "dense"])
def test_starts_identical_to_base(kind):
    base = _quant_base() if kind == "quant" else nn.Linear(256, 48)
    lora = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(5, 256)
    assert torch.equal(lora(x), base(x))
    assert torch.count_nonzero(lora.lora_A) == lora.lora_A.numel()  # A random, B zero
    assert torch.count_nonzero(lora.lora_B) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256, as PEFT initialises A
    assert lora.lora_A.abs().max() <= bound


def _reference(lora, x, mask=None):
    """float64: x W^T + b + s * ((x * mask) A^T) B^T with W the base's (dequantized) weight."""
    base = lora.base_layer
    w = (base.dequantize(torch.float32) if isinstance(base, QuantLinear) else base.weight.detach()).double()
    x64 = x.detach().double()
    xa = x64 if mask is None else x64 * mask
    a64, b64 = lora.lora_A.detach().double(), lora.lora_B.detach().double()
    return x64 @ w.t() + base.bias.detach().double() + lora.scaling * (xa @ a64.t()) @ b64.t()


@pytest.mark.parametrize("kind", ["quant", "dense"])
@pytest.mark.parametrize("m", [3, 40])  # fused small-batch kernel and the dense fallback
def test_forward_backward_match_reference(kind, m):
    base = _quant_base() if kind == "quant" else nn.Linear(256, 48)
    lora = LoRALinear(base, r=8, alpha=16)
    _randomise(lora)
    x = torch.randn(m, 256, requires_grad=True)
    y = lora(x)
    ref = _reference(lora, x)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    # Gradients from autograd of the float64 reference.
    x64 = x.detach().double().requires_grad_()
    a64 = lora.lora_A.detach().double().requires_grad_()
    b64 = lora.lora_B.detach().double().requires_grad_()
    w = (base.dequantize(torch.float32) if kind == "quant" else base.weight.detach()).double()
    (x64 @ w.t() + lora.scaling * (x64 @ a64.t()) @ b64.t()).backward(g.double())
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(lora.lora_A.grad.double(), a64.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(lora.lora_B.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["quant", "dense"])
def test_dropout_applies_to_adapter_input_only(kind):
    p = 0.5
    base = _quant_base() if kind == "quant" else nn.Linear(256, 48)
    lora = LoRALinear(base, r=8, alpha=16, dropout=p)
    _randomise(lora)
    x = torch.randn(6, 256)
    state = torch.get_rng_state()
    y = lora(x)
    torch.set_rng_state(state)
    mask = F.dropout(torch.ones_like(x), p).double()  # the same draw the layer made
    assert torch.allclose(y.double(), _reference(lora, x, mask), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(y.double(), _reference(lora, x), rtol=1e-3, atol=1e-3)
    lora.eval()  # no dropout: the fused path, equal to the undropped reference
    assert torch.allclose(lora(x).double(), _reference(lora, x), rtol=1e-5, atol=1e-4)


def test_merge_unmerge_dense_base():
    base = nn.Linear(64, 32)
    w0 = base.weight.detach().clone()
    lora = LoRALinear(base, r=4, alpha=8)
    _randomise(lora)
    x = torch.randn(3, 64)
    y = lora(x)
    lora.merge()
    assert lora.merged
    assert torch.allclose(lora(x), y, rtol=1e-5, atol=1e-5)
    assert torch.allclose(base.weight, w0 + lora.delta_weight(), atol=1e-6)
    with pytest.raises(ValueError, match="already merged"):
        lora.merge()
    lora.unmerge()
    assert torch.allclose(base.weight, w0, atol=1e-6)
    assert torch.allclose(lora(x), y, rtol=1e-5, atol=1e-5)


def test_quantized_base_merges_into_dense_then_requantizes_explicitly():
    lora = LoRALinear(_quant_base(), r=8, alpha=16)
    _randomise(lora)
    with pytest.raises(TypeError, match="merged_linear"):
        lora.merge()
    x = torch.randn(4, 256)
    dense = lora.merged_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.float32
    expected = lora.base_layer.dequantize(torch.float32) + lora.delta_weight()
    assert torch.equal(dense.weight.detach(), expected)
    assert torch.allclose(dense(x), lora(x), rtol=1e-5, atol=1e-4)
    requant, report = lora.merged_quantlinear()
    assert isinstance(requant, QuantLinear) and requant.format.name == "nf4" and requant.double_quant
    w = expected.double()
    err = requant.dequantize(torch.float32).double() - w
    assert report["relative_error"] == pytest.approx(float(err.norm() / w.norm()))
    assert 0 < report["relative_error"] < 0.2  # NF4's error on a Gaussian-like weight is ~0.1
    assert report["max_abs_error"] == pytest.approx(float(err.abs().max()))


def test_adapter_state_dict_is_small_and_round_trips():
    lora = LoRALinear(_quant_base(512, 1024), r=4, alpha=8)
    _randomise(lora)
    sd = lora.adapter_state_dict()
    assert set(sd) == {"lora_A", "lora_B"}
    adapter_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    assert adapter_bytes < 0.1 * lora.base_layer.weight_nbytes
    other = LoRALinear(_quant_base(512, 1024), r=4, alpha=8)
    other.load_adapter_state_dict(sd)
    assert torch.equal(other.lora_A, lora.lora_A) and torch.equal(other.lora_B, lora.lora_B)
    with pytest.raises(ValueError, match="shape"):
        LoRALinear(_quant_base(512, 1024), r=8).load_adapter_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        other.load_adapter_state_dict({"lora_A": sd["lora_A"]})
    with pytest.raises(ValueError, match="finite"):
        other.load_adapter_state_dict({"lora_A": sd["lora_A"] * float("nan"), "lora_B": sd["lora_B"]})


@pytest.mark.parametrize("r", [0, -1, 33, 2.0, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(_quant_base(32, 64), r=r)  # min(in, out) = 32


def test_bad_arguments():
    with pytest.raises(TypeError, match="QuantLinear or nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(_quant_base(), dropout=1.0)
    with pytest.raises(TypeError, match="dtype"):
        LoRALinear(_quant_base(), dtype=torch.int8)
    with pytest.raises(ValueError, match="in_features"):
        LoRALinear(_quant_base())(torch.randn(2, 255))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapters(dtype):
    base = _quant_base()
    lora = LoRALinear(base, r=8, alpha=16, dtype=dtype)
    _randomise(lora)
    x = torch.randn(4, 256, requires_grad=True)
    y = lora(x)
    y.sum().backward()
    assert lora.lora_A.grad.dtype == dtype and lora.lora_B.grad.dtype == dtype
    assert torch.allclose(y.double(), _reference(lora, x), rtol=1e-2, atol=1e-2)
