"""torch.compile(fullgraph=True) of models with QuantLinear and LoRALinear layers: no graph
breaks, and the same outputs, gradients and QLoRA losses as eager execution."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qengine
from cases import TORCH_JIT_DEPRECATION
from qengine.nn import LoRALinear, QuantLinear
from support import Tiny, train_lora


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = LoRALinear(QuantLinear.from_linear(nn.Linear(128, 256)), r=8, alpha=16)
        self.b = QuantLinear.from_linear(nn.Linear(256, 64), "fp4", 32, False, quant_storage=torch.int32)
        self.c = LoRALinear(nn.Linear(64, 32), r=4)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("m", [4, 40])  # fused small-batch kernel and dense fallback
def test_fullgraph_forward_backward_equal_eager(m):
    torch._dynamo.reset()
    model = Mixed()
    with torch.no_grad():
        for p in qengine.lora_parameters(model):
            p.normal_(0, 0.1)
    x = torch.randn(m, 128, requires_grad=True)

    def grads(fn):
        x.grad = None
        model.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in qengine.lora_parameters(model)]

    y_e, gx_e, gp_e = grads(model)
    y_c, gx_c, gp_c = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert torch.equal(y_c, y_e) and torch.equal(gx_c, gx_e)
    assert all(torch.equal(a, b) for a, b in zip(gp_c, gp_e))


@pytest.mark.slow  # inductor compiles C++ kernels: about a minute on 2 cores
@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)  # inductor imports torch.jit helpers
def test_qlora_loop_eager_and_inductor_match():
    torch._dynamo.reset()
    model = qengine.add_lora(qengine.quantize_model(Tiny(), progress=False), r=8, alpha=16)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 9))  # 32 rows per layer: the dense-fallback path
    eager = train_lora(model, ids, 4)
    compiled = train_lora(twin, ids, 4, torch.compile(twin, fullgraph=True))
    assert compiled[-1] < compiled[0]
    assert compiled == pytest.approx(eager, rel=1e-4)
