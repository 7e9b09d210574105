"""Mixture-of-Experts models through transformers: quantize while loading
(from_pretrained(quantization_config=QEngineConfig())), save_pretrained / from_pretrained of the
quantized folder, qengine.hf.save_quantized / load_model, and mark_quantized after quantize_model."""

import pytest
import torch

import qengine

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

from qengine.hf import QEngineConfig, load_model, save_quantized  # noqa: E402
from qengine.hf.quantizer import mark_quantized  # noqa: E402
from qengine.nn import QuantExpertsWeight  # noqa: E402


def _config():
    return Qwen3MoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          num_experts=8, num_experts_per_tok=2, eos_token_id=1, bos_token_id=0, pad_token_id=0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("moe") / "float"
    Qwen3MoeForCausalLM(_config()).eval().save_pretrained(d)
    return d


def _expert_weights(model):
    return [m for m in model.modules() if isinstance(m, QuantExpertsWeight)]


def test_quantize_on_load_then_save_and_reload(float_dir, tmp_path):
    ids = torch.randint(0, 256, (1, 9))
    ref_model = AutoModelForCausalLM.from_pretrained(float_dir).eval()
    q = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=QEngineConfig()).eval()
    assert len(_expert_weights(q)) == 4  # gate_up_proj and down_proj of both layers
    assert q.config._experts_implementation == "qengine"
    # The experts are the quantized weights: equal to the same model with dequantized experts
    # run by transformers' own eager loop.
    ref = _logits(ref_model, ids)
    from qengine.nn import QuantLinear

    with torch.no_grad():
        for name, qm in q.named_modules():
            if isinstance(qm, QuantExpertsWeight):
                ref_model.get_parameter(name).copy_(qm.dequantize(torch.float32))
            elif isinstance(qm, QuantLinear):
                ref_model.get_submodule(name).weight.copy_(qm.dequantize(torch.float32))
    ref_model.config._experts_implementation = "eager"
    got = _logits(q, ids)
    deq = _logits(ref_model, ids)
    assert torch.allclose(got, deq, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, ref)  # it is quantized
    q.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert len(_expert_weights(again)) == 4
    assert torch.equal(_logits(again, ids), got)
    out = again.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_save_quantized_and_load_model(float_dir, tmp_path):
    ids = torch.randint(0, 256, (2, 7))
    q = load_model(float_dir, format="nf4")
    assert len(_expert_weights(q)) == 4
    save_quantized(q, tmp_path / "s")
    again = load_model(tmp_path / "s")
    assert torch.equal(_logits(again, ids), _logits(q, ids))


def test_mark_quantized_after_quantize_model(tmp_path):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 6))
    m = Qwen3MoeForCausalLM(_config()).eval()
    qengine.quantize_model(m, progress=False)
    mark_quantized(m)
    m.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(_logits(again, ids), _logits(m, ids))


def test_unsupported_layout_fails_before_loading(tmp_path):
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                                    num_experts_per_tok=2, layer_types=["full_attention"],
                                    swiglu_limit=5.0)  # gpt-oss's own gate (limit 7.0) runs: tests/test_gpt_oss.py
    gpt_oss.GptOssForCausalLM(cfg).save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="_apply_gate"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "g", quantization_config=QEngineConfig())
