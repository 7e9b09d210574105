"""Calibrated checkpoints and the command line: quantization_config records the method (and
damp, act_order, calibration tokens, sequential); save_quantized / mark_quantized +
save_pretrained reload to identical logits through load_model and from_pretrained;
from_pretrained quantizes with method="search" and refuses GPTQ with the way to do it;
`qengine quantize --method gptq --calib` and `qengine eval` (table and JSON), and their errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import qengine
from qengine.nn import QuantLinear

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

DEMO = os.path.join(os.path.dirname(qengine.__file__), "assets", "demo_text.txt")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """GPTQ's column sweep and a tiny model's forward are many small ops, slow when split over
    the threads of a loaded 2-core machine. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def model():
    return _llama(seed=3)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quantized(model, method, calib=None, **kw):
    extra = {} if calib is None else {"calibration": calib}
    return qengine.quantize_model(model, "int4", 64, True, progress=False, method=method, **extra, **kw)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_records_method_and_reloads_identically(model, tmp_path):
    from transformers import AutoModelForCausalLM

    from qengine.hf import load_model, mark_quantized, save_quantized

    calib, held = torch.randint(0, 259, (8, 32)), torch.randint(0, 259, (2, 32))
    q = _quantized(model, "gptq", calib, act_order=True, damp=0.02)
    save_quantized(q, tmp_path / "a")
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert (qc["method"], qc["damp"], qc["act_order"], qc["calibration_tokens"], qc["sequential"]) == \
        ("gptq", 0.02, True, calib.numel(), True)
    want = _logits(q, held[:2])
    assert torch.equal(_logits(load_model(tmp_path / "a"), held[:2]), want)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "a"), held[:2]), want)
    mark_quantized(q)
    q.save_pretrained(tmp_path / "b")
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert (qc["method"], qc["damp"], qc["calibration_tokens"]) == ("gptq", 0.02, calib.numel())
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), held[:2]), want)


def test_from_pretrained_search_and_gptq_refusal(model, tmp_path):
    from transformers import AutoModelForCausalLM

    from qengine.hf import QEngineConfig

    model.save_pretrained(tmp_path / "float")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=QEngineConfig(method="search"))
    w = model.model.layers[0].mlp.down_proj.weight
    got = m.model.layers[0].mlp.down_proj.dequantize(torch.float32)
    want = qengine.calibrate.search_scales(w.detach().contiguous(), "nf4", 64, True).dequantize(torch.float32)
    assert torch.equal(got, want)
    assert m.config.quantization_config.to_dict()["method"] == "search"
    with pytest.raises(ValueError, match="quantize_model"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=QEngineConfig(method="gptq"))
    with pytest.raises(ValueError, match="method must be one of"):
        QEngineConfig(method="awq")


# ---------------------------------------------------------------------------- CLI
def test_cli_quantize_gptq_and_eval(model, tmp_path, capsys):
    from qengine.cli import main
    from qengine.hf import load_model

    model.save_pretrained(tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--method", "gptq", "--calib", DEMO,
                 "--calib-tokens", "1024", "--calib-seq-len", "64", "--format", "int4", "--quiet"]) == 0
    assert "with gptq (1,024 calibration tokens (16 windows of 64" in capsys.readouterr().out
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qc["method"], qc["format"], qc["calibration_tokens"]) == ("gptq", "int4", 1024)
    assert isinstance(load_model(tmp_path / "q").model.layers[1].mlp.up_proj, QuantLinear)
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "float"), "--data", DEMO, "--methods", "rtn,gptq", "--formats", "int4",
                 "--seq-len", "64", "--calib-tokens", "1024", "--eval-tokens", "1024", "--json", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "int4/gptq" in text and "model.layers.1.mlp.down_proj" in text and "16 non-overlapping windows" in text
    doc = json.loads(out.read_text())
    assert doc["calibration"] == {"tokens": 1024, "windows": 16, "start": 0}
    assert doc["held_out"]["start"] == 1024 and doc["held_out"]["scored_tokens"] == 16 * 63
    assert [c["label"] for c in doc["configs"]] == ["int4/rtn", "int4/gptq"]
    assert all(c["bits_per_param"] > 4 for c in doc["configs"])
    errs = doc["layers"]["model.layers.0.mlp.down_proj"]
    assert errs["int4/gptq"] < errs["int4/rtn"]


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib_cli") / "float"
    _llama().save_pretrained(d)
    return d


@pytest.mark.parametrize("argv, message", [
    (["quantize", "{float}", "{out}", "--method", "gptq"], "needs calibration text: --calib"),
    (["quantize", "{float}", "{out}", "--method", "gptq", "--calib", "{missing}"], "does not exist"),
    (["quantize", "{float}", "{out}", "--calib", "{demo}"], "--calib applies to --method gptq"),
    (["quantize", "{float}", "{out}", "--method", "gptq", "--calib", "{demo}", "--bnb"], "--bnb"),
    (["eval", "{float}", "--data", "{demo}", "--methods", "rtn,awq"], "unknown method 'awq'"),
    (["eval", "{float}", "--data", "{demo}", "--seq-len", "64", "--calib-tokens", "3920"], "too few"),
    (["eval", "{float}", "--data", "{demo}", "--formats", "nf5"], "nf5"),
])
def test_cli_errors(random_dir, tmp_path, capsys, argv, message):
    from qengine.cli import main

    capsys.readouterr()
    fill = {"float": str(random_dir), "out": str(tmp_path / "out"), "demo": DEMO, "missing": str(tmp_path / "no.txt")}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qengine: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()
