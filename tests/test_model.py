"""Whole-model helpers: quantize_model (one layer at a time, skips, tied weights), add_lora,
trainable parameters, memory_report, adapter files, and a small QLoRA loop."""

from __future__ import annotations

import gc
import logging
import sys
import weakref

import pytest
import torch
from torch import nn

import qengine
from qengine.nn import LoRALinear, QuantLinear
from support import Tiny, train_lora


def test_quantize_model_replaces_linears_and_matches_reference():
    model = Tiny()
    ids = torch.randint(0, 64, (2, 7))
    # Reference: the float model with each weight replaced by its dequantized value.
    ref_model = Tiny()
    ref_model.load_state_dict(model.state_dict())
    for name, mod in list(ref_model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            with torch.no_grad():
                mod.weight.copy_(qengine.quantize(mod.weight.detach(), "nf4", 64, True).dequantize())
    out = qengine.quantize_model(model, progress=False)
    assert out is model
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["layers.0.up_proj"] is QuantLinear and kinds["layers.1.down_proj"] is QuantLinear
    assert kinds["lm_head"] is nn.Linear  # skipped by default
    with torch.no_grad():
        assert torch.allclose(model(ids), ref_model(ids), rtol=1e-4, atol=1e-4)


def test_skip_patterns_and_options():
    model = qengine.quantize_model(Tiny(), "fp4", 128, False, skip=["layers.1", "up_proj"], progress=False)
    assert isinstance(model.layers[0].down_proj, QuantLinear)
    assert isinstance(model.layers[0].up_proj, nn.Linear) and isinstance(model.layers[1].down_proj, nn.Linear)
    assert isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.format.name == "fp4" and model.lm_head.blocksize == 128 and not model.lm_head.double_quant
    bf = qengine.quantize_model(Tiny(), dtype=torch.bfloat16, progress=False)
    assert bf.embed.weight.dtype == torch.bfloat16 and bf.layers[0].up_proj.bias.dtype == torch.bfloat16
    assert bf.layers[0].up_proj.weight_scales_absmax.dtype == torch.float32
    assert bf(torch.randint(0, 64, (1, 3))).dtype == torch.bfloat16


def test_tied_weights_and_attention_kept_in_float(caplog):
    model = Tiny(tied=True)
    model.attn = nn.MultiheadAttention(128, 4)
    with caplog.at_level(logging.INFO, logger="qengine"):
        qengine.quantize_model(model, skip=[], progress=False)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed.weight
    assert isinstance(model.attn.out_proj, nn.Linear)
    assert "tied" in caplog.text and "MultiheadAttention" in caplog.text


def test_three_d_parameters_are_reported(caplog):
    model = Tiny()
    model.experts = nn.Parameter(torch.randn(4, 8, 8))
    with caplog.at_level(logging.WARNING, logger="qengine"):
        qengine.quantize_model(model, progress=False)
    assert "experts" in caplog.text and "outside a transformers experts module" in caplog.text


def test_one_layer_at_a_time_frees_float_weights(monkeypatch):
    model = Tiny(d=128, h=512)
    refs = [weakref.ref(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    alive_at_each_step = []
    original = QuantLinear.from_linear.__func__

    def counting(cls, linear, *a, **k):
        # Reference counting alone must free them: no gc.collect() here.
        alive_at_each_step.append(sum(r() is not None for r in refs))
        return original(cls, linear, *a, **k)

    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(counting))
    qengine.quantize_model(model, progress=False)
    gc.collect()
    # Before converting layer i, the i layers already converted have freed their weights.
    assert alive_at_each_step == [4, 3, 2, 1]
    assert all(r() is None for r in refs)


def test_progress_bar_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = qengine.quantize_model(Tiny(), progress=True)
    assert isinstance(model.layers[0].up_proj, QuantLinear)


def test_memory_report():
    model = qengine.quantize_model(Tiny(vocab=64, d=1024, h=1024), progress=False)
    rep = qengine.memory_report(model)
    q = rep["quantized"]
    assert q["modules"] == 4 and q["params"] == 4 * 1024 * 1024
    # NF4, block 64, double quant: 4 + 8/64 + 32/(64*256) = 4.127 bits, plus per-layer constants.
    assert q["bits_per_param"] == pytest.approx(4.127, abs=0.003)
    assert rep["embedding"]["bytes"] == 64 * 1024 * 4
    assert rep["linear"]["params"] == 64 * 1024  # the float lm_head
    assert rep["total"]["bytes"] == sum(rep[k]["bytes"] for k in rep if k != "total")
    qengine.add_lora(model, r=4)
    rep2 = qengine.memory_report(model)
    assert rep2["lora"]["params"] == 4 * 4 * (1024 + 1024)
    assert rep2["quantized"] == rep["quantized"]


def test_add_lora_targets_and_trainable_parameters():
    model = qengine.quantize_model(Tiny(), progress=False)
    qengine.add_lora(model, r=4, alpha=8, target_modules=["up_proj", "lm_head"])
    assert isinstance(model.layers[0].up_proj, LoRALinear) and isinstance(model.lm_head, LoRALinear)
    assert isinstance(model.layers[0].down_proj, QuantLinear)
    params = qengine.lora_parameters(model)
    assert len(params) == 6
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    with pytest.raises(ValueError, match="no layer"):
        qengine.add_lora(model, target_modules=["nothing_here"])
    qengine.add_lora(model, r=2)  # the remaining QuantLinear layers; existing adapters untouched
    assert isinstance(model.layers[1].down_proj, LoRALinear)
    assert not isinstance(model.layers[0].up_proj.base_layer, LoRALinear)


def test_adapter_files(tmp_path):
    model = qengine.add_lora(qengine.quantize_model(Tiny(), progress=False), r=4, alpha=8)
    for p in qengine.lora_parameters(model):
        with torch.no_grad():
            p.normal_()
    path = tmp_path / "adapter.safetensors"
    qengine.save_adapter(model, path)
    adapter_bytes = qengine.memory_report(model)["lora"]["bytes"]
    assert adapter_bytes < path.stat().st_size < adapter_bytes + 8192  # the adapters and a small header
    other = qengine.add_lora(qengine.quantize_model(Tiny(), progress=False), r=4, alpha=1)
    qengine.load_adapter(other, path)
    for a, b in zip(qengine.lora_parameters(model), qengine.lora_parameters(other)):
        assert torch.equal(a, b)
    assert other.layers[0].up_proj.alpha == 8  # alpha comes with the adapter
    wrong_targets = qengine.add_lora(qengine.quantize_model(Tiny(), progress=False), r=4, target_modules=["up_proj"])
    with pytest.raises(ValueError, match="does not match"):
        qengine.load_adapter(wrong_targets, path)
    wrong_rank = qengine.add_lora(qengine.quantize_model(Tiny(), progress=False), r=2)
    with pytest.raises(ValueError, match="rank"):
        qengine.load_adapter(wrong_rank, path)
    wrong_shape = qengine.add_lora(qengine.quantize_model(Tiny(d=64), progress=False), r=4)
    with pytest.raises(ValueError):
        qengine.load_adapter(wrong_shape, path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read"):
        qengine.load_adapter(other, corrupt)
    with pytest.raises(ValueError, match="no LoRALinear"):
        qengine.save_adapter(Tiny(), tmp_path / "none.safetensors")


def test_qlora_loop_reduces_loss():
    torch.manual_seed(0)
    model = qengine.add_lora(qengine.quantize_model(Tiny(), progress=False), r=8, alpha=16)
    ids = torch.randint(0, 64, (4, 17))
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    losses = train_lora(model, ids, 8)
    assert losses[-1] < 0.9 * losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())  # only the adapters moved


# ---------------------------------------------------------------------------- the unquantized-parameters warning
def _qengine_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qengine" and r.levelno >= logging.WARNING]


def test_no_unquantized_warning_on_a_tiny_llama_with_tied_embeddings(caplog):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with caplog.at_level(logging.INFO, logger="qengine"):
        qengine.quantize_model(model, progress=False)
    # The embedding is ~27% of this model's parameters; before, it was counted twice (tied
    # lm_head) and "53% stay unquantized" was logged as a warning.
    assert _qengine_warnings(caplog) == []
    assert "embeddings" in caplog.text and "row lookup" in caplog.text  # the INFO line says why they stay float


def test_no_unquantized_warning_on_a_small_model_whose_embedding_dominates(caplog):
    model = Tiny(vocab=4096, tied=True)  # embedding 4096 x 128: most of the parameters
    with caplog.at_level(logging.WARNING, logger="qengine"):
        qengine.quantize_model(model, skip=["lm_head"], progress=False)
    assert _qengine_warnings(caplog) == []


def test_unquantized_warning_names_float_linears_of_unsupported_kinds(caplog):
    model = Tiny()
    model.attn = nn.MultiheadAttention(128, 4)  # its projections stay float (it reads their weights)
    with caplog.at_level(logging.WARNING, logger="qengine"):
        qengine.quantize_model(model, progress=False)
    msgs = [m for m in _qengine_warnings(caplog) if "stay unquantized" in m]
    assert len(msgs) == 1 and "attn.in_proj_weight" in msgs[0] and "MultiheadAttention" in msgs[0]
    assert "embed" not in msgs[0].split("stay float by design")[0]  # embeddings are not listed as a problem


class Conv1D(nn.Module):
    """transformers' GPT-2 style linear: a 2-D weight [in, out] that is not an nn.Linear."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_unquantized_warning_names_linears_of_another_type(caplog):
    model = Tiny()
    model.layers[0].c_fc = Conv1D(128, 512)
    with caplog.at_level(logging.WARNING, logger="qengine"):
        qengine.quantize_model(model, progress=False)
    msgs = [m for m in _qengine_warnings(caplog) if "stay unquantized" in m]
    assert len(msgs) == 1 and "layers.0.c_fc.weight" in msgs[0] and "Conv1D" in msgs[0]


def test_unquantized_warning_names_3d_float_weights_even_when_skipped(caplog):
    model = Tiny()
    model.moe = nn.Module()
    model.moe.experts = nn.Parameter(torch.randn(8, 128, 128))
    with caplog.at_level(logging.WARNING, logger="qengine"):
        qengine.quantize_model(model, skip=["lm_head", "moe"], progress=False)
    msgs = [m for m in _qengine_warnings(caplog) if "stay unquantized" in m]
    assert len(msgs) == 1 and "moe.experts (131,072; 3-D expert weight, in skip)" in msgs[0]


def test_skipped_linears_norms_and_biases_do_not_warn(caplog):
    model = Tiny()
    with caplog.at_level(logging.WARNING, logger="qengine"):
        qengine.quantize_model(model, skip=["lm_head", "layers.1"], progress=False)  # ~half the model skipped
    assert _qengine_warnings(caplog) == []


def test_tied_weights_count_once(caplog):
    model = Tiny(tied=True)
    unique = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    report_before = qengine.memory_report(model)
    assert report_before["total"]["params"] == unique
    assert report_before["embedding"]["params"] == 64 * 128  # the tied lm_head is not counted again
    assert report_before["linear"]["params"] == 4 * 128 * 256 + 2 * 256
    with caplog.at_level(logging.INFO, logger="qengine"):
        qengine.quantize_model(model, progress=False)
    quantized = 4 * 128 * 256
    line = next(r.getMessage() for r in caplog.records if "of the parameters are quantized" in r.getMessage())
    assert line.startswith(f"qengine: {100.0 * quantized / unique:.1f}% of the parameters are quantized")
    assert f"embeddings {100.0 * 64 * 128 / unique:.1f}%" in line
    assert qengine.memory_report(model)["total"]["params"] == unique
