"""PEFT interop: peft's LoRA on top of qengine's QuantLinear through PEFT's custom-module
mechanism (qengine.compat.peft). Skipped when peft or transformers is not installed."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine.nn import LoRALinear, QuantLinear

peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra of torch-qengine)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra of torch-qengine)")
from qengine.compat.peft import LoraQuantLinear, register  # noqa: E402


def _model():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return qengine.quantize_model(transformers.LlamaForCausalLM(cfg), progress=False)


# peft reads transformers' deprecated is_gradient_checkpointing alias (a warning between those
# two packages, not about qengine); only that warning is silenced.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_on_quantlinear_matches_qengine_lora():
    model = _model()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        base_logits = model(ids).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    register(config)
    pm = peft.get_peft_model(model, config)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantLinear) and isinstance(layer.base_layer, QuantLinear)
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, base_logits)  # B starts at zero
        layer.lora_B["default"].weight.normal_(0, 0.1)
    # The same adapter through qengine's fused LoRALinear gives the same layer output.
    ours = LoRALinear(layer.base_layer, r=4, alpha=8)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), ours(x), rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = pm(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(TypeError, match="re-quantize"):
        pm.merge_and_unload()
