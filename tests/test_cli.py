"""The `qengine` command driven through its CLI on tiny inputs: info, formats, quantize (both
layouts), finetune (with resume after an interruption), generate, bench and each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qengine
from qengine.cli import main

transformers = pytest.importorskip("transformers", reason="the model commands need transformers")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama (vocab 259: the byte tokenizer's) saved by transformers, float32."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return str(p)


def read_json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_and_formats(capsys):
    code, out, _ = run(["info"], capsys)
    assert code == 0 and qengine.__version__ in out and "nf4" in out and "4.127" in out
    code, out, _ = run(["formats", "--shape", "64", "256"], capsys)
    assert code == 0 and "nf4" in out and "kmeans4" in out


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "qengine", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("info", "quantize", "finetune", "generate", "bench", "demo"):
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", ["quantize", "finetune", "generate", "bench", "demo", "formats"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_quantize_then_load_same_outputs(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "q")
    code, text, _ = run(["quantize", tiny_model_dir, out, "--quiet"], capsys)
    assert code == 0 and "quantized 14 linear layers" in text
    cfg = read_json(out, "config.json")
    assert cfg["quantization_config"]["quant_method"] == "qengine"
    from qengine.hf import load_model

    loaded = load_model(out)
    direct = qengine.quantize_model(load_model(tiny_model_dir), "nf4", 64, True, progress=False)
    ids = torch.randint(3, 259, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, direct(ids).logits)
    n_quant = sum(isinstance(m, qengine.nn.QuantLinear) for m in loaded.modules())
    assert n_quant == 14


def test_quantize_bnb_layout_loads_in_transformers(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    out = str(tmp_path / "bnb")
    assert run(["quantize", tiny_model_dir, out, "--bnb", "--quiet"], capsys)[0] == 0
    from qengine.hf import load_model

    import bitsandbytes as bnb

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = qengine.quantize_model(load_model(tiny_model_dir), "nf4", 64, True, progress=False)
    layers = dict(ours.named_modules())
    n = 0
    for name, mod in theirs.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):  # the very same weights, bit for bit
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            assert torch.equal(w, layers[name].dequantize(torch.float32)), name
            n += 1
    assert n == 14
    ids = torch.randint(3, 259, (1, 12))
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    # bitsandbytes' CPU forward rounds through bfloat16 (about 2e-3 off x @ W^T on one layer here).
    assert torch.allclose(a, b, rtol=2e-2, atol=2e-2), (a - b).abs().max()


def _finetune_args(model, data, out, steps, *extra):
    return ["finetune", "--model", model, "--data", data, "--out", out, "--steps", str(steps), "--batch", "2",
            "--seq-len", "16", "--rank", "4", "--log-every", "1", "--checkpoint-every", "2", "--optim", "adamw",
            "--lr", "1e-3", *extra]


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter.safetensors"))


def test_finetune_writes_adapter_plot_and_resumes_exactly(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    straight = str(tmp_path / "straight")
    code, out, _ = run(_finetune_args(tiny_model_dir, text_file, straight, 4), capsys)
    assert code == 0 and "tokens/s" in out
    for f in ("adapter.safetensors", "loss.png", "losses.json"):
        assert os.path.isfile(os.path.join(straight, f))
    with open(os.path.join(straight, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    base_bytes = sum(os.path.getsize(os.path.join(tiny_model_dir, f)) for f in os.listdir(tiny_model_dir))
    assert os.path.getsize(os.path.join(straight, "adapter.safetensors")) < base_bytes

    # Interrupted after the step-2 checkpoint, during step 3; then started again.
    import qengine.finetune as ft

    real = ft.batch_for_step

    def dies_at_step_3(stream, step, *a, **k):
        if step == 2:
            raise KeyboardInterrupt
        return real(stream, step, *a, **k)

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(ft, "batch_for_step", dies_at_step_3)
    assert run(_finetune_args(tiny_model_dir, text_file, resumed, 4), capsys)[0] == 130
    assert not os.path.exists(os.path.join(resumed, "adapter.safetensors"))
    monkeypatch.setattr(ft, "batch_for_step", real)
    code, out, _ = run(_finetune_args(tiny_model_dir, text_file, resumed, 4), capsys)
    assert code == 0 and "resuming from step 2" in out
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(straight, "losses.json") == read_json(resumed, "losses.json")


def test_generate_with_adapter(tiny_model_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "ft")
    assert run(_finetune_args(tiny_model_dir, text_file, out, 2), capsys)[0] == 0
    code, text, _ = run(["generate", "--model", tiny_model_dir, "--adapter", os.path.join(out, "adapter.safetensors"),
                         "--prompt", "the quick", "--max-new-tokens", "5"], capsys)
    assert code == 0 and text.startswith("the quick")


def test_bench_quick_json(tmp_path, capsys, monkeypatch):
    import qengine.benchmark.suite as suite

    import qengine.benchmark.harness as harness

    monkeypatch.setattr(suite, "_matmul_rows", lambda n, k, batches, budget: [])  # the kernels' own tests cover it
    monkeypatch.setattr(harness, "retry_budget_s", 0.0)  # no waiting for a quiet machine in a test
    path = str(tmp_path / "b.json")
    code, out, _ = run(["bench", "--quick", "--json", path], capsys)
    assert code == 0 and "copy bandwidth" in out and read_json(path)["results"]


@pytest.mark.parametrize("case", ["no_dir", "no_config", "bad_config", "no_weights", "bad_data", "bad_jsonl",
                                  "bad_steps", "bad_format", "same_dir"])
def test_bad_input_is_one_clear_line(case, tiny_model_dir, text_file, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    if case == "no_dir":
        args = ["quantize", str(tmp_path / "missing"), str(tmp_path / "o")]
        want = "does not exist"
    elif case == "no_config":
        args = ["quantize", str(d), str(tmp_path / "o")]
        want = "no config.json"
    elif case == "bad_config":
        (d / "config.json").write_text("{not json")
        args = ["quantize", str(d), str(tmp_path / "o")]
        want = "not a valid model config"
    elif case == "no_weights":
        (d / "config.json").write_text(json.dumps(read_json(tiny_model_dir, "config.json")))
        args = ["quantize", str(d), str(tmp_path / "o")]
        want = "no model.safetensors"
    elif case == "bad_data":
        args = _finetune_args(tiny_model_dir, str(tmp_path / "x.csv"), str(tmp_path / "o"), 2)
        want = "does not exist"
    elif case == "bad_jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text('{"text": "ok"}\n{"prompt": 3}\n')
        args = _finetune_args(tiny_model_dir, str(p), str(tmp_path / "o"), 2)
        want = "d.jsonl:2"
    elif case == "bad_steps":
        args = _finetune_args(tiny_model_dir, text_file, str(tmp_path / "o"), 0)
        want = "--steps must be a positive integer"
    elif case == "bad_format":
        args = ["quantize", tiny_model_dir, str(tmp_path / "o"), "--format", "nf5"]
        want = "nf5"
    else:
        args = ["quantize", tiny_model_dir, tiny_model_dir]
        want = "must differ"
    code, out, err = run(args, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("qengine: error:") and want in last, err


@pytest.mark.slow
def test_demo_runs_and_the_loss_falls(tmp_path, capsys):
    """The README's main command, end to end (optimizer as in the default run)."""
    out = str(tmp_path / "demo")
    code, text, _ = run(["demo", "--out", out], capsys)
    assert code == 0
    first, last = (float(v) for v in text.split("\nloss ", 1)[1].split(" (")[0].split(" -> "))
    assert last <= 0.7 * first, text
    assert os.path.isfile(os.path.join(out, "adapter.safetensors")) and os.path.isfile(os.path.join(out, "loss.png"))
    assert "generated: The weights" in text and "NF4 + double quant" in text


@pytest.mark.slow
def test_finetune_killed_by_sigkill_resumes_to_the_same_adapter(tiny_model_dir, text_file, tmp_path, capsys):
    """A real kill: SIGKILL as soon as the first checkpoint is on disk, then the same command
    again; the adapter equals an uninterrupted run's bit for bit."""
    import signal
    import time

    args = _finetune_args(tiny_model_dir, text_file, str(tmp_path / "killed"), 30)
    proc = subprocess.Popen([sys.executable, "-m", "qengine", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()
    code, out, _ = run(args, capsys)
    assert code == 0 and "resuming from step" in out
    straight = str(tmp_path / "straight")
    assert run(_finetune_args(tiny_model_dir, text_file, straight, 30), capsys)[0] == 0
    a, b = _adapter(straight), _adapter(str(tmp_path / "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
