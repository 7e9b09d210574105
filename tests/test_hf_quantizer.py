"""transformers' quantizer registry: from_pretrained(quantization_config=QEngineConfig(...)) on a
small Llama saved with save_pretrained (random init, no download), save_pretrained of the
quantized model, reloads through from_pretrained and hf.checkpoint.load_model in both
directions, no re-quantization on reload, and the errors for bad configs and folders.
Skipped when transformers is not installed."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import qengine
from qengine.nn import QuantLinear
from support import train_causal_lm

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra of torch-qengine)")
import qengine.hf  # noqa: E402
from qengine.hf import QEngineConfig  # noqa: E402

AutoModel = transformers.AutoModelForCausalLM


def _llama(tie=False):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture
def saved(tmp_path):
    """(float model, its save_pretrained folder)."""
    model = _llama()
    model.save_pretrained(tmp_path / "float")
    return model, tmp_path / "float"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_from_pretrained_quantizes_like_quantize_model(saved):
    model, path = saved
    ids = torch.randint(0, 128, (2, 9))
    ref = qengine.quantize_model(copy.deepcopy(model), "nf4", 64, True, progress=False).eval()
    qm = AutoModel.from_pretrained(path, quantization_config=QEngineConfig(format="nf4", double_quant=True))
    layers = [n for n, m in qm.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and isinstance(qm.lm_head, torch.nn.Linear)  # lm_head skipped, as QLoRA
    assert torch.equal(_logits(qm, ids), _logits(ref, ids))
    assert qm.config.quantization_config.modules == sorted(layers)


def test_options_reach_the_layers(saved):
    _, path = saved
    cfg = QEngineConfig(format="int4", blocksize=128, double_quant=False, compute_dtype=torch.bfloat16,
                        skip=["lm_head", "down_proj"])
    qm = AutoModel.from_pretrained(path, quantization_config=cfg)
    q = qm.model.layers[0].self_attn.q_proj
    assert (q.format.name, q.blocksize, q.double_quant, q.compute_dtype) == ("int4", 128, False, torch.bfloat16)
    assert isinstance(qm.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_reloads_identical_both_directions(saved, tmp_path, monkeypatch):
    _, path = saved
    ids = torch.randint(0, 128, (2, 9))
    qm = AutoModel.from_pretrained(path, quantization_config=QEngineConfig())
    qm.save_pretrained(tmp_path / "hf")
    qengine.hf.quantize_checkpoint(path, tmp_path / "cli", progress=False)  # what `qengine quantize` writes
    expected = _logits(qm, ids)
    qc_hf = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    qc_cli = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "format", "blocksize", "double_quant", "modules", "qengine_version"):
        assert qc_hf[key] == qc_cli[key], key

    real = qengine._C.quantize_cpu
    calls = []

    def kernel(*args):
        calls.append(args[2])  # numel
        return real(*args)

    monkeypatch.setattr(qengine._C, "quantize_cpu", kernel)
    for folder in ("hf", "cli"):
        reloaded = AutoModel.from_pretrained(tmp_path / folder)
        assert calls == [], "from_pretrained of a quantized folder called the quantize kernel"
        assert isinstance(reloaded.model.layers[1].mlp.up_proj, QuantLinear)
        assert torch.equal(_logits(reloaded, ids), expected), folder
        assert torch.equal(_logits(qengine.hf.load_model(tmp_path / folder), ids), expected), folder
        # load_model's empty QuantLinear skeletons quantize a 64-element zero template (and its scale) for their
        # layout; no weight is ever quantized.
        assert max(calls) <= 64
        calls.clear()


def test_quantize_model_output_saves_through_save_pretrained(tmp_path, monkeypatch):
    model = qengine.quantize_model(_llama(tie=True), "nf4", 64, True, progress=False).eval()
    ids = torch.randint(0, 128, (1, 7))
    cfg = qengine.hf.mark_quantized(model)
    assert cfg.format == "nf4" and len(cfg.modules) == 14
    model.save_pretrained(tmp_path / "q")
    monkeypatch.setattr(qengine._C, "quantize_cpu", lambda *a, **k: (_ for _ in ()).throw(AssertionError("kernel")))
    reloaded = AutoModel.from_pretrained(tmp_path / "q")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # tied embeddings stay tied
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_sparse_24_model_saves_and_reloads(tmp_path):
    model = qengine.quantize_model(_llama(), "nf4", 64, True, sparsity="2:4", progress=False).eval()
    ids = torch.randint(0, 128, (1, 7))
    qengine.hf.mark_quantized(model)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModel.from_pretrained(tmp_path / "q")
    assert reloaded.model.layers[0].self_attn.q_proj.layout == "2:4"
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_quantized_model_trains_with_lora(saved):
    _, path = saved
    qm = AutoModel.from_pretrained(path, quantization_config=QEngineConfig())
    qengine.add_lora(qm, r=4)
    ids = torch.randint(0, 128, (2, 9))
    losses = train_causal_lm(qm, ids, qengine.lora_parameters(qm), 4, torch.optim.Adam)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(format="nf5"), ValueError, "unknown format"),
    (dict(blocksize=48), ValueError, "power of two"),
    (dict(double_quant=1), TypeError, "double_quant"),
    (dict(compute_dtype=torch.int8), TypeError, "compute_dtype"),
    (dict(colour="red"), ValueError, "unknown settings"),
], ids=["format", "blocksize", "double_quant", "compute_dtype", "unknown_key"])
def test_config_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        QEngineConfig(**kwargs)


@pytest.mark.parametrize("edit, match", [
    ({"qengine_version": "9.0.0"}, "written by qengine 9.0.0"),
    ({"qengine_version": "banana"}, "unreadable qengine_version"),
    ({"format": "nf9"}, "unknown format"),
    ({"modules": None}, "lacks 'modules'"),
], ids=["future_version", "bad_version", "unknown_format", "no_modules"])
def test_saved_folder_with_unknown_version_or_format(saved, tmp_path, edit, match):
    _, path = saved
    qengine.hf.quantize_checkpoint(path, tmp_path / "q", progress=False)
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"].update(edit)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        AutoModel.from_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match=match):
        qengine.hf.load_model(tmp_path / "q")


def test_without_qengine_registered_transformers_loads_garbage(saved, tmp_path, monkeypatch, caplog):
    """Documents transformers' behaviour when qengine is not imported: it logs 'Unknown
    quantization type' and builds the float model with the quantized layers randomly
    initialised (their keys unexpected). Hence: import qengine first (the README says so)."""
    from transformers.quantizers import auto

    _, path = saved
    qm = AutoModel.from_pretrained(path, quantization_config=QEngineConfig())
    qm.save_pretrained(tmp_path / "q")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "qengine")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "qengine")
    with caplog.at_level(logging.WARNING):
        plain = AutoModel.from_pretrained(tmp_path / "q")
    assert "Unknown quantization type" in caplog.text
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())


def test_import_qengine_does_not_import_transformers_but_registers_on_use():
    code = ("import sys, qengine; before = 'transformers' in sys.modules; "
            "from transformers import AutoModelForCausalLM; from transformers.quantizers import auto; "
            "AutoModelForCausalLM.from_config; import transformers.modeling_utils; "
            "print(before, 'qengine' in auto.AUTO_QUANTIZER_MAPPING)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.split() == ["False", "True"]
