"""Hugging Face transformers: a small LlamaForCausalLM built from a config (random init, no
download) quantized with quantize_model: forward close to the float model, generate, LoRA
training with gradient checkpointing, torch.compile(fullgraph=True), state dict round trip.
Skipped when transformers is not installed."""

from __future__ import annotations

import copy

import pytest
import torch

import qengine
from qengine.nn import LoRALinear, QuantLinear

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra of torch-qengine)")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Relative Frobenius error of the logits of this random-init model, NF4 / block 64 / double
# quant against float32: measured 0.112 (seeded; NF4 itself has ~0.1 relative weight error).
LOGITS_REL_ERROR_BOUND = 0.2


def _llama(**over):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, use_cache=False, tie_word_embeddings=False)
    cfg.update(over)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def _grad_checkpointing(model):
    # Newer transformers renamed the method; the old name warns (an error under this suite).
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def test_quantized_forward_close_to_float():
    model = _llama()
    float_model = copy.deepcopy(model)
    qengine.quantize_model(model, progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 2 * len(PROJECTIONS) and isinstance(model.lm_head, torch.nn.Linear)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        lq, lf = model(ids).logits, float_model(ids).logits
    rel = float((lq - lf).norm() / lf.norm())
    assert 0 < rel < LOGITS_REL_ERROR_BOUND
    rep = qengine.memory_report(model)
    assert rep["quantized"]["modules"] == 14


def test_generate_with_and_without_cache_agree():
    model = qengine.quantize_model(_llama(use_cache=True), progress=False).eval()
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 11) and torch.equal(cached[:, :5], ids)
    assert torch.equal(cached, uncached)  # the KV-cache path runs the quantized layers on 1 row at a time


def test_lora_training_with_gradient_checkpointing():
    model = qengine.quantize_model(_llama(), progress=False)
    qengine.add_lora(model, r=4, alpha=8, target_modules=PROJECTIONS)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    params = qengine.lora_parameters(model)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.02)  # nonzero B, so gradients reach A too
    model(ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in params]
    model.zero_grad()
    _grad_checkpointing(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:  # recomputation gives the very same gradients
            assert all(torch.equal(p.grad, g) for p, g in zip(params, plain))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_compile_fullgraph_matches_eager():
    model = qengine.add_lora(qengine.quantize_model(_llama(), progress=False), r=4, alpha=8,
                             target_modules=PROJECTIONS)
    with torch.no_grad():
        for p in qengine.lora_parameters(model)[1::2]:
            p.normal_(0, 0.02)
    ids = torch.randint(0, 128, (2, 12))
    params = qengine.lora_parameters(model)

    def run(fn):
        model.zero_grad()
        loss = fn(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    torch._dynamo.reset()
    eager = run(model)
    compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert torch.equal(compiled[0], eager[0])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(compiled[1], eager[1]))


def test_quantized_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = qengine.quantize_model(_llama(), progress=False)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = qengine.quantize_model(_llama(), "fp4", 128, False, progress=False)  # skeleton: other settings
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_qlora_with_paged_adamw8bit_matches_adamw():
    """The QLoRA loop with qengine's 8-bit paged optimizer ends within 2% of the same loop
    with torch.optim.AdamW (same model, data, init and hyperparameters)."""
    torch.manual_seed(0)
    base = qengine.quantize_model(_llama(), progress=False)
    ids = torch.randint(0, 128, (16, 32))
    finals = {}
    for name in ("adamw", "paged8"):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        qengine.add_lora(model, r=8, alpha=16, target_modules=PROJECTIONS)
        params = qengine.lora_parameters(model)
        opt = (torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0) if name == "adamw"
               else qengine.optim.PagedAdamW8bit(params, lr=3e-3, weight_decay=0.0))
        for step in range(60):
            batch = ids[(step * 4) % 16:(step * 4) % 16 + 4]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            finals[name] = model(input_ids=ids, labels=ids).loss.item()
    first = base(input_ids=ids, labels=ids).loss.item()
    assert finals["adamw"] < 0.9 * first  # the loop really trains
    assert abs(finals["paged8"] - finals["adamw"]) <= 0.02 * finals["adamw"], finals
