"""A Qwen3-MoE-shaped model of about 100M parameters (16 experts, random init from a config),
quantized to NF4 with double quantization by quantize_model: at least 95% of its parameters
are stored quantized, and it costs at most 30% of the float32 model's bytes."""

import pytest
import torch

import qengine

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def test_qwen3_moe_100m_nf4_double_quant_bytes():
    cfg = transformers.Qwen3MoeConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024,
                                      moe_intermediate_size=768, num_hidden_layers=5, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
                                      tie_word_embeddings=False, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert 90e6 < params < 110e6
    ids = torch.randint(0, 2048, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    qengine.quantize_model(model, "nf4", 64, double_quant=True, progress=False)
    report = qengine.memory_report(model)
    quantized_share = report["quantized"]["params"] / report["total"]["params"]
    bytes_share = report["total"]["bytes"] / fp32_bytes
    assert 0 <= report["total"]["params"] - params < 1000  # every parameter once, plus the rotary buffers
    assert quantized_share >= 0.95, quantized_share  # measured: 0.979
    assert bytes_share <= 0.30, bytes_share  # measured: 0.147
    with torch.no_grad():
        got = model(ids).logits
    assert torch.isfinite(got).all()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.5, rel  # NF4 of random N(0, 0.02) weights through 5 layers; measured ~0.1-0.2
