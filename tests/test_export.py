"""torch.export of QuantLinear, LoRALinear and models built of them, in strict and non-strict
(torch's default) mode: the exported program calls qengine::matmul with the quantized state as
graph inputs, and gives eager's output bit for bit."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import qengine
from qengine.nn import LoRALinear, QuantLinear
from support import Tiny

MODES = [pytest.param(False, id="nonstrict"), pytest.param(True, id="strict")]


def _lora(base: nn.Module, r: int = 4, **kw) -> LoRALinear:
    layer = LoRALinear(base, r=r, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)  # a non-zero adapter, so the side path shows in the output
    return layer


class Net(nn.Module):
    """QuantLinear -> ReLU -> LoRALinear(QuantLinear)."""

    def __init__(self):
        super().__init__()
        self.a = QuantLinear.from_linear(nn.Linear(64, 48))
        self.b = _lora(QuantLinear.from_linear(nn.Linear(48, 32), "fp4", 32, double_quant=False))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


# Each builds a module whose forward reaches qengine::matmul; the QuantLinear variants cover
# every optional part of the quantized state being present or absent (nested scales, offsets,
# nested offsets, 2:4 positions, a pruning mask, a wider quant_storage, per-row blocks).
LAYERS = {
    "nf4_dq": lambda: QuantLinear.from_linear(nn.Linear(64, 32)),
    "nf4_nodq": lambda: QuantLinear.from_linear(nn.Linear(64, 32), double_quant=False),
    "uint4_dq_offsets": lambda: QuantLinear.from_linear(nn.Linear(64, 32), "uint4", 64, True),
    "int8_per_row": lambda: QuantLinear.from_linear(nn.Linear(64, 32), "int8", None, False),
    "int32_storage_bf16_compute": lambda: QuantLinear.from_linear(nn.Linear(64, 32), quant_storage=torch.int32,
                                                                  compute_dtype=torch.bfloat16),
    "sparse24": lambda: QuantLinear.from_linear(nn.Linear(64, 32), sparsity="2:4"),
    "masked": lambda: QuantLinear.from_linear(nn.Linear(64, 32), mask=torch.rand(32, 64) > 0.5),
    "sequential": lambda: nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 48)), nn.ReLU(),
                                        QuantLinear.from_linear(nn.Linear(48, 32))),
    "lora_over_quantlinear": lambda: _lora(QuantLinear.from_linear(nn.Linear(64, 32))),
    "lora_over_linear": lambda: _lora(nn.Linear(64, 32)),
    "net": Net,
}


@pytest.mark.parametrize("strict", MODES)
@pytest.mark.parametrize("rows", [3, 40])  # fused small-batch kernel and dense fallback
@pytest.mark.parametrize("name", list(LAYERS))
def test_export_matches_eager(name, rows, strict):
    model = LAYERS[name]()
    x = torch.randn(rows, 64)
    with torch.no_grad():
        expected = model(x)
    ep = torch.export.export(model, (x,), strict=strict)
    with torch.no_grad():
        assert torch.equal(ep.module()(x), expected)
        x2 = torch.randn(rows, 64)  # the same program on other values of the same shape
        assert torch.equal(ep.module()(x2), model(x2))


@pytest.mark.parametrize("strict", MODES)
def test_export_keeps_the_quantized_state_as_inputs(strict):
    """The program holds the packed codes and scales as its own parameter / buffers (no float
    weight anywhere) and one qengine::matmul call per quantized layer."""
    model = Net()
    ep = torch.export.export(model, (torch.randn(3, 64),), strict=strict)
    targets = {s.target for s in ep.graph_signature.input_specs if s.target is not None}
    assert {"a.weight_packed", "a.weight_scales", "a.weight_scales_absmax", "b.base_layer.weight_packed",
            "b.lora_A", "b.lora_B"} <= targets
    assert not any(t.shape in ((48, 64), (32, 48)) for t in ep.state_dict.values())  # no dense weight
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.qengine.matmul.default]
    assert len(calls) == 2


@pytest.mark.parametrize("strict", MODES)
def test_export_dynamic_batch(strict):
    model = Net()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.randn(4, 64),), dynamic_shapes=({0: batch},), strict=strict)
    with torch.no_grad():
        for rows in (1, 5, 16, 17, 100):  # both sides of the small-batch threshold, one program
            x = torch.randn(rows, 64)
            assert torch.equal(ep.module()(x), model(x))


# torch's own run_decompositions reads a pytree API it deprecates (a warning inside torch).
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
@pytest.mark.parametrize("strict", MODES)
def test_exported_program_saves_loads_and_decomposes(strict):
    model = Net()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    ep = torch.export.export(model, (x,), strict=strict)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    decomposed = ep.run_decompositions()  # qengine::matmul stays one opaque op
    assert any(n.target is torch.ops.qengine.matmul.default for n in decomposed.graph.nodes)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), expected)
        assert torch.equal(decomposed.module()(x), expected)


def test_absent_parts_are_not_buffer_slots():
    """The root cause of the non-strict failure: a buffer slot holding None (torch 2.13 counts it
    when it numbers the root's buffers, while the graph has no input for it). Absent parts are
    plain None attributes; load_state_dict switches parts between present and absent."""
    layer = QuantLinear(64, 32, double_quant=True)  # skeleton with nested scales, no offsets
    assert all(t is not None for t in layer._buffers.values())
    assert layer.weight_offsets is None and layer.weight_mask is None and layer.weight_positions is None
    layer.load_state_dict(QuantLinear.from_linear(nn.Linear(64, 32), "uint4", 64, False).state_dict())
    assert all(t is not None for t in layer._buffers.values())
    assert layer.weight_scales_absmax is None and layer.weight_offsets is not None
    x = torch.randn(3, 64)
    ep = torch.export.export(layer, (x,), strict=False)
    with torch.no_grad():
        assert torch.equal(ep.module()(x), layer(x))


@pytest.mark.parametrize("strict", MODES)
def test_export_qlora_model(strict):
    """A whole quantize_model + add_lora model (embedding, norms, fused LoRA layers)."""
    model = qengine.add_lora(qengine.quantize_model(Tiny(), progress=False), r=8, alpha=16)
    with torch.no_grad():
        for p in qengine.lora_parameters(model):
            p.normal_(0, 0.1)
    ids = torch.randint(0, 64, (2, 9))
    ep = torch.export.export(model, (ids,), strict=strict)
    with torch.no_grad():
        assert torch.equal(ep.module()(ids), model(ids))
