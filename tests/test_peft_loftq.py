"""LoftQ initialisation (add_lora(init="loftq")): quantized base + adapter starts closer to the
float weight than the quantized weight alone (float64 reference), the model's logits closer to
the float model's than with the standard init (B = 0), and bad requests are refused."""

from __future__ import annotations

import copy

import pytest
import torch

import qengine
from qengine.loftq import loftq
from qengine.nn import LoRALinear, QuantLinear


def _err(w, approx):
    return float((approx.double() - w.double()).norm() / w.double().norm())


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_loftq_weight_closer_than_quantized_alone(fmt):
    w = torch.randn(96, 160) + 0.3 * torch.randn(96, 4) @ torch.randn(4, 160)  # a few strong directions
    scaling = 2.0
    alone = _err(w, qengine.quantize(w, fmt, 64, True).dequantize(torch.float32))
    errors = []
    for iters in (1, 3):
        q, a, b = loftq(w, 8, scaling, fmt, 64, True, iters)
        assert a.shape == (8, 160) and b.shape == (96, 8)
        assert torch.linalg.matrix_rank(b.double() @ a.double()) == 8
        errors.append(_err(w, q.dequantize(torch.float32).double() + scaling * (b.double() @ a.double())))
    assert max(errors) < 0.95 * alone, (alone, errors)


def test_loftq_input_not_modified():
    w = torch.randn(64, 64)
    copy_w = w.clone()
    loftq(w, 4, 1.0)
    assert torch.equal(w, copy_w)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)
        self.lm_head = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


def test_add_lora_loftq_model_logits_closer_than_standard_init():
    model = _MLP()
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = model(x).double()
    std = qengine.add_lora(qengine.quantize_model(copy.deepcopy(model), progress=False), r=8)
    lq = qengine.add_lora(copy.deepcopy(model), r=8, init="loftq", iters=2)
    assert isinstance(lq.up, LoRALinear) and isinstance(lq.up.base_layer, QuantLinear)
    assert isinstance(lq.lm_head, torch.nn.Linear)  # lm_head stays float, as quantize_model does
    with torch.no_grad():
        e_std, e_lq = _err(ref, std(x)), _err(ref, lq(x))
    assert e_lq < 0.95 * e_std, (e_std, e_lq)
    trainable = {n for n, p in lq.named_parameters() if p.requires_grad}
    assert trainable == {"up.lora_A", "up.lora_B", "down.lora_A", "down.lora_B"}
    # The layer bias is kept.
    assert torch.equal(lq.up.base_layer.bias, model.up.bias)


def test_loftq_refuses_quantized_targets_and_bad_arguments():
    with pytest.raises(ValueError, match="needs the float weight"):
        qengine.add_lora(qengine.quantize_model(_MLP(), progress=False), r=4, init="loftq")
    with pytest.raises(ValueError, match="init"):
        qengine.add_lora(_MLP(), r=4, init="pissa")
    with pytest.raises(ValueError, match="iters"):
        qengine.add_lora(_MLP(), r=4, init="loftq", iters=0)
    with pytest.raises(ValueError, match="rank"):
        qengine.add_lora(_MLP(), r=100, init="loftq", target_modules=["down"])


transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra of torch-qengine)")


def test_loftq_on_llama_logits():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits.double()
        std = qengine.add_lora(qengine.quantize_model(copy.deepcopy(model), progress=False), r=8)
        lq = qengine.add_lora(copy.deepcopy(model), r=8, init="loftq", iters=1)
        assert _err(ref, lq(ids).logits) < 0.9 * _err(ref, std(ids).logits)
