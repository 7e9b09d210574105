"""Fine-tuning methods over a qengine-quantized Llama (built from a config, no download): each
trains a few steps, its loss falls, and exactly its own parameters change (everything else in
the state dict, quantized weights included, stays bitwise equal). PEFT methods skip when peft
or transformers is absent; qengine.peft's helpers need transformers only for the model."""

from __future__ import annotations

import pytest
import torch

import qengine
import qengine.peft as qpeft
from qengine.nn import QuantLinear
from support import train_causal_lm

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra of torch-qengine)")

VOCAB = 96


def _model(bias: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=bias, mlp_bias=bias,
                                   tie_word_embeddings=False)
    return qengine.quantize_model(transformers.LlamaForCausalLM(cfg), progress=False)


def _train(model, steps: int = 6, lr: float = 1e-2):
    """Trains the requires_grad parameters on one fixed batch; returns (losses, changed names)."""
    ids = torch.randint(0, VOCAB, (4, 16))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "method left nothing trainable"
    losses = train_causal_lm(model, ids, params, steps, torch.optim.Adam, lr)
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert set(after) == set(before)
    return losses, changed


def _trainable(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _check(model, losses, changed, own):
    """Loss falls; every changed tensor is a trainable parameter the method owns (own(name))."""
    assert losses[-1] < losses[0], losses
    trainable = _trainable(model)
    assert trainable and all(own(n) for n in trainable), sorted(trainable)[:5]
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]


def test_native_add_lora():
    model = qengine.add_lora(_model(), r=4, alpha=8)
    losses, changed = _train(model)
    _check(model, losses, changed, lambda n: n.endswith(("lora_A", "lora_B")))


def test_bitfit_trains_quantized_layers_biases():
    model = _model(bias=True)
    n = qpeft.bitfit(model)
    assert n == sum(m.bias.numel() for m in model.modules() if isinstance(m, QuantLinear))
    losses, changed = _train(model)
    _check(model, losses, changed, lambda n: n.endswith(".bias"))
    quant_biases = {f"{name}.bias" for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert changed == quant_biases


def test_bitfit_without_biases_is_a_clear_error():
    with pytest.raises(ValueError, match="no bias"):
        qpeft.bitfit(_model())


def test_freeze_trains_only_last_blocks():
    model = _model()
    qpeft.freeze(model, train_last=1)
    losses, changed = _train(model)
    _check(model, losses, changed, lambda n: n.startswith("model.layers.1."))
    with pytest.raises(ValueError, match="exceeds"):
        qpeft.freeze(model, train_last=3)


def test_freeze_with_lora_trains_last_block_adapters():
    model = qengine.add_lora(_model(), r=4)
    qpeft.freeze(model, train_last=1)
    losses, changed = _train(model)
    _check(model, losses, changed, lambda n: n.startswith("model.layers.1."))
    assert any("lora_" in n for n in changed)


def test_bottleneck_adapters():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        base = model(ids).logits
    wrapped = qpeft.add_adapters(model, bottleneck=16)
    assert len(wrapped) == 4  # self_attn and mlp of 2 blocks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # up-projections start at zero
    losses, changed = _train(model)
    _check(model, losses, changed, lambda n: ".adapter." in n)
    with pytest.raises(ValueError, match="bottleneck"):
        qpeft.add_adapters(_model(), bottleneck=0)


# ---------------------------------------------------------------------------- peft's methods
peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra of torch-qengine)")
from qengine.compat.peft import register  # noqa: E402

# peft reads transformers' deprecated is_gradient_checkpointing alias (a warning between those
# two packages, not about qengine); only that warning is silenced.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_lora_and_dora_custom_module(dora):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora)
    register(config)
    model = peft.get_peft_model(_model(), config)
    losses, changed = _train(model)
    _check(model, losses, changed, lambda n: "lora_" in n)
    if dora:
        assert any("lora_magnitude_vector" in n for n in changed)


def test_dora_magnitude_starts_at_dequantized_weight_norm():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    register(config)
    model = peft.get_peft_model(_model(), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.dequantize(torch.float32).double()
    mag = layer.lora_magnitude_vector["default"].weight.double()
    assert torch.allclose(mag, w.norm(dim=1), rtol=1e-5)  # DoRA's per-row norm of the quantized base


def test_peft_ia3_over_quantlinear_is_refused_clearly():
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(_model(), config)


def test_peft_ia3_on_float_layers_of_quantized_model():
    # IA3's vectors over the layers kept in float (here lm_head) train on a quantized model.
    config = peft.IA3Config(target_modules=["lm_head"], feedforward_modules=["lm_head"])
    model = peft.get_peft_model(_model(), config)
    losses, changed = _train(model, lr=5e-2)
    _check(model, losses, changed, lambda n: "ia3_l" in n)


# peft's prefix tuning hands its virtual keys/values to the model as `past_key_values`, which
# transformers >= 5.24 deprecates in favour of `cache`; the call still works (the warning is theirs).
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_prompt_and_prefix_tuning(kind):
    cls = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    model = peft.get_peft_model(_model(), cls(task_type="CAUSAL_LM", num_virtual_tokens=4))
    losses, changed = _train(model, lr=5e-2)
    _check(model, losses, changed, lambda n: "prompt_encoder" in n)


# peft's LN tuning warns that it has not been validated on RMSNorm (Llama's norm); it trains it.
@pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")
def test_peft_layernorm_tuning():
    config = peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"])
    model = peft.get_peft_model(_model(), config)
    losses, changed = _train(model)
    _check(model, losses, changed, lambda n: "ln_tuning_layers" in n)
