"""Mixture-of-Experts transformers models (Mixtral, Qwen3-MoE, OLMoE built from configs, random
init, no download) quantized with quantize_model: experts become QuantExpertsWeight and run
through qengine::moe_experts via transformers' ExpertsInterface; logits against the eager experts
loop on the dequantized weights and against the float model, generate, routers unchanged, QLoRA
on experts (eager and compiled), state dict and adapter round trips, memory_report, the
unquantized-parameters warning, unsupported layouts. Skipped when transformers is absent."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import qengine
from cases import TORCH_JIT_DEPRECATION
from qengine.nn import LoRAExperts, QuantExpertsWeight
from support import train_causal_lm

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra of torch-qengine)")
pytest.importorskip("transformers.integrations.moe", reason="this transformers has no experts interface")

VOCAB = 128
CONFIGS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)),
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
}
MODELS = list(CONFIGS)
# Relative Frobenius error of the logits, NF4 / block 64 / double quant against the float32
# model (everything but lm_head quantized): measured 0.097-0.140 over seeds 0-2 for the three
# models (NF4 itself has ~0.1 relative weight error; cf. 0.112 for the small Llama).
FLOAT_REL_ERROR_BOUND = 0.25


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if qengine.moe.is_experts_module(m)]


def _dequantized_eager_copy(qmodel):
    """The quantized model with each expert weight replaced by its dequantized values (a float
    parameter in the module's own layout) running transformers' eager experts loop."""
    ref = copy.deepcopy(qmodel)
    for _, mod in _experts(ref):
        for attr in ("gate_up_proj" if mod.has_gate else "up_proj", "down_proj"):
            w = getattr(mod, attr).dequantize(torch.float32)
            if mod.is_transposed:
                w = w.transpose(1, 2).contiguous()
            delattr(mod, attr)
            setattr(mod, attr, torch.nn.Parameter(w, requires_grad=False))
        del mod._qengine_moe
        mod.config._experts_implementation = "eager"
    ref.config._experts_implementation = "eager"
    return ref


def _ids(batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length))


@pytest.mark.parametrize("name", MODELS)
def test_quantized_logits(name):
    model = CONFIGS[name]().eval()
    float_model = copy.deepcopy(model)
    qengine.quantize_model(model, progress=False)
    experts = _experts(model)
    assert len(experts) == 2 and model.config._experts_implementation == "qengine"
    for _, mod in experts:
        assert isinstance(mod.down_proj, QuantExpertsWeight)
        assert isinstance(mod.gate_up_proj if mod.has_gate else mod.up_proj, QuantExpertsWeight)
    ref = _dequantized_eager_copy(model)
    ids = _ids()
    with torch.no_grad():
        lq, lref, lf = model(ids).logits, ref(ids).logits, float_model(ids).logits
    # Same weights, two paths (grouped kernel vs eager loop), float32: accumulation order only
    # (measured max abs difference <= 1.8e-7 on logits of magnitude ~1).
    torch.testing.assert_close(lq, lref, rtol=1e-5, atol=1e-5)
    rel = float((lq - lf).norm() / lf.norm())
    assert 0 < rel < FLOAT_REL_ERROR_BOUND, rel
    out = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], ids[:1, :4])
    assert torch.equal(out, ref.generate(ids[:1, :4], max_new_tokens=5, do_sample=False))


def _routers(model):
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate") or n.endswith("block_sparse_moe.gate")]


@pytest.mark.parametrize("name", MODELS)
def test_router_unchanged(name):
    model = CONFIGS[name]().eval()
    float_routers = copy.deepcopy(_routers(model))
    assert float_routers
    qengine.quantize_model(model, progress=False)
    seen = []
    hooks = [r.register_forward_hook(lambda mod, args, out: seen.append((args[0].clone(), out[0].clone())))
             for r in _routers(model)]
    with torch.no_grad():
        model(_ids())
        for h in hooks:
            h.remove()
        assert len(seen) == len(float_routers)
        for fr, (hidden, logits) in zip(float_routers, seen):
            assert torch.equal(fr(hidden)[0], logits)  # the float router, on the same hidden states


def _train(model, ids, steps, compiled=False):
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    return train_causal_lm(fwd, ids, qengine.lora_parameters(model), steps)


@pytest.mark.parametrize("name", MODELS)
def test_qlora_on_experts(name, tmp_path):
    model = CONFIGS[name]()
    qengine.quantize_model(model, progress=False)
    qengine.add_lora(model, r=4, experts=True)
    adapters = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert len(adapters) == 4
    ids = _ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for a in adapters:
        assert float(a.lora_A.grad.abs().max()) == 0 and float(a.lora_B.grad.abs().max()) > 0  # B starts at 0
    model.zero_grad()
    losses = _train(model, ids, 6)
    assert losses[-1] < 0.9 * losses[0], losses
    for a in adapters:
        assert float(a.lora_B.detach().abs().max()) > 0
    # the adapter alone round-trips into a fresh quantized model with adapters
    path = tmp_path / "adapter.safetensors"
    qengine.save_adapter(model, path)
    model.eval()
    other = CONFIGS[name]()
    qengine.quantize_model(other, progress=False)
    qengine.add_lora(other, r=4, experts=True)
    base_sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    missing, unexpected = other.load_state_dict(base_sd, strict=False)  # the base weights alone
    assert not unexpected and all("lora_" in k for k in missing)
    qengine.load_adapter(other, path)
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
def test_qlora_compiled_fullgraph():
    cfg = CONFIGS["qwen3_moe"]().config
    cfg.num_hidden_layers = 1  # one layer: inductor's compile time dominates this test
    model = transformers.Qwen3MoeForCausalLM(cfg)
    qengine.quantize_model(model, progress=False)
    qengine.add_lora(model, r=4, experts=True)  # attention projections and experts
    assert any(isinstance(m, qengine.nn.LoRALinear) for m in model.modules())
    model.train()
    torch._dynamo.reset()
    losses = _train(model, _ids(), 5, compiled=True)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    model = CONFIGS[name]().eval()
    qengine.quantize_model(model, progress=False)
    fresh = CONFIGS[name]().eval()
    qengine.quantize_model(fresh, progress=False)
    ids = _ids()
    with torch.no_grad():
        assert not torch.equal(fresh(ids).logits, model(ids).logits)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_memory_report_counts_experts():
    model = CONFIGS["qwen3_moe"]()
    expert_params = sum(p.numel() for _, m in _experts(model) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())  # + rotary
    float_bytes = 4 * total
    qengine.quantize_model(model, progress=False)
    rep = qengine.memory_report(model)
    assert rep["total"]["params"] == total
    assert rep["quantized"]["params"] >= expert_params
    assert rep["quantized"]["modules"] == 2 * 2 + 2 * 4  # 2 layers: gate_up + down, q/k/v/o
    # measured 0.241 of the float32 bytes (NF4 + double quant; embeddings and lm_head, 12% of this
    # tiny model's parameters, stay float32)
    assert rep["total"]["bytes"] < 0.3 * float_bytes


def test_lora_targets_experts_by_the_experts_module_name():
    """target_modules=["experts"] (the experts module's name, as add_lora documents) gives every
    quantized expert matrix an adapter, as its own names ("gate_up_proj", "down_proj") do."""
    from qengine.nn import LoRAExperts

    for targets in (["experts"], ["gate_up_proj", "down_proj"]):
        model = CONFIGS["qwen3_moe"]()
        qengine.quantize_model(model, progress=False)
        qengine.add_lora(model, r=4, target_modules=["q_proj", *targets], experts=True)
        adapted = [n for n, m in model.named_modules() if isinstance(m, LoRAExperts)]
        assert len(adapted) == 2 * 2, (targets, adapted)  # 2 layers: gate_up_proj and down_proj


def test_warning_when_experts_are_skipped(caplog):
    model = CONFIGS["olmoe"]()
    with caplog.at_level(logging.WARNING, logger="qengine"):
        qengine.quantize_model(model, progress=False, skip=["lm_head", "experts"])
    msgs = [r.getMessage() for r in caplog.records if "stay unquantized" in r.getMessage()]
    assert len(msgs) == 1 and "mlp.experts" in msgs[0]
    assert not any(isinstance(m, QuantExpertsWeight) for m in model.modules())
    caplog.clear()
    model = CONFIGS["olmoe"]()
    with caplog.at_level(logging.WARNING, logger="qengine"):
        qengine.quantize_model(model, progress=False, skip=["lm_head", "embed_tokens"])
    assert not any("stay unquantized" in r.getMessage() and "experts" in r.getMessage() for r in caplog.records)


def test_gpt_oss_experts_rejected():
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, layer_types=["full_attention"],
                                    swiglu_limit=5.0)  # gpt-oss's own gate (limit 7.0) runs: tests/test_gpt_oss.py
    model = transformers.GptOssForCausalLM(cfg)
    with pytest.raises(ValueError, match="GptOssExperts.*_apply_gate"):
        qengine.quantize_model(model, progress=False)


def test_post_expert_norm_rejected():
    model = CONFIGS["qwen3_moe"]()
    mod = _experts(model)[0][1]
    mod.has_post_expert_norm = True
    with pytest.raises(ValueError, match="has_post_expert_norm"):
        qengine.moe.quantize_experts(mod)
    assert isinstance(mod.down_proj, torch.nn.Parameter)  # left as it was
