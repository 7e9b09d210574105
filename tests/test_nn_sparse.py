"""QuantLinear and quantize_model with the 2:4 sparse layout and with pruning masks: forward
against a float64 reference, state-dict round trip, memory report, LoRA on top."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine.nn import QuantLinear


def _model():
    return torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))


@pytest.mark.parametrize("fmt,sparsity", [("nf4", "2:4"), ("uint4", None), ("nf4", None)])
def test_pruned_model_quantizes_with_exact_zeros(fmt, sparsity):
    model = _model()
    masks = qengine.prune(model, sparsity=0.5, pattern="2:4" if sparsity else "unstructured")
    qengine.quantize_model(model, fmt, 64, double_quant=True, sparsity=sparsity, masks=masks, progress=False)
    x = torch.randn(5, 256)
    h = x.to(torch.float64)
    for layer in (model[0], model[2]):
        assert isinstance(layer, QuantLinear)
        w = layer.dequantize(torch.float32)
        assert (w[~masks[layer is model[2] and "2" or "0"]] == 0).all()  # pruned weights stay exactly zero
    with torch.no_grad():
        y = model(x).to(torch.float64)
    w0, w2 = (m.dequantize(torch.float32).to(torch.float64) for m in (model[0], model[2]))
    ref = torch.relu(h @ w0.t() + model[0].bias.to(torch.float64)) @ w2.t() + model[2].bias.to(torch.float64)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_sparse_layer_state_dict_memory_and_lora():
    lin = torch.nn.Linear(512, 256)
    layer = QuantLinear.from_linear(lin, "nf4", 64, double_quant=True, sparsity="2:4")
    assert layer.layout == "2:4"
    assert qengine.memory_report(torch.nn.Sequential(layer))["quantized"]["bits_per_param"] < 3.3
    fresh = QuantLinear(512, 256, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.layout == "2:4" and torch.equal(fresh.dequantize(), layer.dequantize())
    x = torch.randn(3, 512)
    assert torch.equal(fresh(x), layer(x))
    model = qengine.add_lora(torch.nn.Sequential(layer), r=4, target_modules=["0"])
    with torch.no_grad():
        model[0].lora_B.normal_()
    model(x).square().sum().backward()
    assert model[0].lora_A.grad is not None and model[0].lora_A.grad.abs().sum() > 0


def test_bnb_export_refuses_the_sparse_layout():
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 64), "nf4", 64, sparsity="2:4")
    with pytest.raises(ValueError, match="2:4"):
        layer.to_bnb_state_dict()
