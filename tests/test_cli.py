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


# ---------------------------------------------------------------------------- bad output paths
def _never(what):
    def fail(*a, **k):
        raise AssertionError(f"{what} started before the output path was checked")
    return fail


def _unwritable_dir(tmp_path):
    """A directory this process cannot create files in: a mode-0555 one, or for root (who may
    write there anyway) sysfs; None when there is none."""
    import tempfile

    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    for d in (str(ro), "/sys"):
        try:
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError:
            return d
    return None


def _bad_out(kind, tmp_path):
    """An output path that cannot be a directory qengine writes in: (path, text of the error)."""
    f = tmp_path / "a_file"
    f.write_text("x")
    if kind == "under_file":
        return str(f / "sub"), "is a file, not a directory"
    if kind == "is_file":
        return str(f), "is a file, not a directory"
    ro = _unwritable_dir(tmp_path)
    if ro is None:
        pytest.skip("no directory here is read-only to this process")
    return os.path.join(ro, "qengine-out"), "cannot write in"


@pytest.mark.parametrize("kind", ["under_file", "is_file", "read_only"])
@pytest.mark.parametrize("cmd", ["demo", "finetune", "quantize"])
def test_bad_out_is_one_line_before_any_work(cmd, kind, tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    import qengine.hf.checkpoint as ckpt

    out, want = _bad_out(kind, tmp_path)
    monkeypatch.setattr(ckpt, "build_model", _never("building the model"))
    monkeypatch.setattr(ckpt, "load_model", _never("loading the model"))
    monkeypatch.setattr(ckpt, "quantize_checkpoint", _never("quantizing"))
    args = {"demo": ["demo", "--out", out, "--steps", "2"],
            "finetune": _finetune_args(tiny_model_dir, text_file, out, 2),
            "quantize": ["quantize", tiny_model_dir, out, "--quiet"]}[cmd]
    code, _, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qengine: error:") and want in lines[0], err


@pytest.mark.parametrize("kind", ["under_file", "a_directory", "read_only_dir"])
def test_bench_bad_json_fails_before_benchmarking(kind, tmp_path, capsys, monkeypatch):
    import qengine.benchmark.suite as suite

    monkeypatch.setattr(suite, "copy_bandwidth", _never("the benchmark"))
    f = tmp_path / "a_file"
    f.write_text("x")
    if kind == "read_only_dir":
        ro = _unwritable_dir(tmp_path)
        if ro is None:
            pytest.skip("no directory here is read-only to this process")
        path, want = os.path.join(ro, "b.json"), "cannot write in"
    else:
        path, want = {"under_file": (str(f / "b.json"), "is a file, not a directory"),
                      "a_directory": (str(tmp_path), "is a directory, not a file")}[kind]
    code, out, err = run(["bench", "--quick", "--json", path], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qengine: error: --json") and want in lines[0], err
    assert "copy bandwidth" not in out


# ---------------------------------------------------------------------------- damaged model directories
@pytest.mark.parametrize("damage", ["no_config", "bad_config", "no_weights", "truncated_weights", "garbage_weights"])
@pytest.mark.parametrize("cmd", ["finetune", "generate"])
def test_damaged_model_dir_is_one_line(cmd, damage, tiny_model_dir, text_file, tmp_path, capsys):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    weights = d / "model.safetensors"
    want = {"no_config": "no config.json", "bad_config": "not a valid model config", "no_weights": "no weights file",
            "truncated_weights": "truncated or corrupt", "garbage_weights": "truncated or corrupt"}[damage]
    if damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "bad_config":
        (d / "config.json").write_text('{"model_type": "llama", ')
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) // 2])
    else:
        weights.write_bytes(b"\x00\x01" * 64)
    args = (_finetune_args(str(d), text_file, str(tmp_path / "o"), 2) if cmd == "finetune" else
            ["generate", "--model", str(d), "--prompt", "the", "--max-new-tokens", "2"])
    code, _, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qengine: error:") and want in lines[0], err
    assert not (tmp_path / "o").exists()


def test_os_error_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import qengine.hf.checkpoint as ckpt

    def denied(tensors, out_dir, metadata):
        raise PermissionError(13, "Permission denied", os.path.join(out_dir, "model.safetensors"))

    monkeypatch.setattr(ckpt, "_save_tensors", denied)
    code, _, err = run(["quantize", tiny_model_dir, str(tmp_path / "q"), "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("qengine: error: Permission denied") and "model.safetensors" in lines[0]


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "only_one_dir"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("qengine: error: quantize:"), lines


# ---------------------------------------------------------------------------- quantize --skip
def _quantized_modules(out):
    return set(read_json(out, "config.json")["quantization_config"]["modules"])


def test_skip_adds_to_the_default_lm_head(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "q")
    code, text, err = run(["quantize", tiny_model_dir, out, "--quiet", "--skip", "down_proj"], capsys)
    mods = _quantized_modules(out)
    assert code == 0 and "quantized 12 linear layers" in text and not err, err
    assert not any(m.endswith(("down_proj", "lm_head")) for m in mods) and len(mods) == 12


def test_no_default_skip_quantizes_lm_head(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "q")
    assert run(["quantize", tiny_model_dir, out, "--quiet", "--no-default-skip"], capsys)[0] == 0
    assert "lm_head" in _quantized_modules(out) and len(_quantized_modules(out)) == 15
    out2 = str(tmp_path / "q2")
    assert run(["quantize", tiny_model_dir, out2, "--quiet", "--no-default-skip", "--skip", "model.layers.1"],
               capsys)[0] == 0
    mods = _quantized_modules(out2)
    assert "lm_head" in mods and not any(m.startswith("model.layers.1.") for m in mods) and len(mods) == 8


def test_skip_that_matches_nothing_warns(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "q")
    code, _, err = run(["quantize", tiny_model_dir, out, "--quiet", "--skip", "down_prj", "--skip", "up_proj"], capsys)
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith("qengine: warning: --skip 'down_prj'"), err
    assert not any(m.endswith(("up_proj", "lm_head")) for m in _quantized_modules(out))


# ---------------------------------------------------------------------------- the loss plot
PNG_MIN_BYTES = 8000  # a chart with axes, tick labels and a title; a bare line is ~2 KB


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_loss_figure_has_axes_title_margin_and_extremes():
    pytest.importorskip("matplotlib", reason="the loss plot needs matplotlib")
    from qengine.plot import line_figure

    losses = [5.5, 4.0, 3.1, 2.2, 1.9, 1.75]
    ax = line_figure(losses).axes[0]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss" and ax.get_title()
    lo, hi = ax.get_ylim()
    assert lo < min(losses) - 0.05 * (max(losses) - min(losses)) and hi > max(losses)  # the minimum is off the edge
    labels = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "min 1.75 (step 6)" in labels and "max 5.5 (step 1)" in labels
    assert ax.get_xticklabels() and ax.get_yticklabels()


def test_finetune_plot_is_a_real_png(tiny_model_dir, text_file, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the loss plot needs matplotlib")
    out = str(tmp_path / "ft")
    code, text, _ = run(_finetune_args(tiny_model_dir, text_file, out, 2), capsys)
    png = os.path.join(out, "loss.png")
    assert code == 0 and png in text.strip().splitlines()[-1]
    width, height = _png_size(png)
    assert width >= 320 and height >= 200 and os.path.getsize(png) > PNG_MIN_BYTES


def test_finetune_without_matplotlib_writes_losses_json(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "loss.png").write_bytes(b"an earlier run's plot")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, text, _ = run(_finetune_args(tiny_model_dir, text_file, str(out), 2), capsys)
    assert code == 0 and "matplotlib is not installed: wrote losses.json, no loss.png" in text
    assert len(read_json(out, "losses.json")) == 2 and not (out / "loss.png").exists()
    assert "loss.png" not in text.strip().splitlines()[-1]


def _last_line_files(text):
    last = text.strip().splitlines()[-1]
    assert last.startswith("wrote "), last
    return last[len("wrote "):].rsplit(" (total", 1)[0].split(", ")


@pytest.mark.parametrize("matplotlib", [True, False], ids=["matplotlib", "no_matplotlib"])
def test_demo_last_line_names_every_file_written(matplotlib, tmp_path, capsys, monkeypatch):
    if matplotlib:
        pytest.importorskip("matplotlib", reason="the loss plot needs matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = str(tmp_path / "demo")
    code, text, _ = run(["demo", "--out", out, "--steps", "2"], capsys)
    assert code == 0
    named = _last_line_files(text)
    written = {os.path.join(root, f) for root, _, files in os.walk(out) for f in files}
    assert set(named) == written and all(os.path.isfile(p) for p in named), (named, written)
    names = {os.path.basename(p) for p in named}
    assert {"adapter.safetensors", "losses.json"} <= names and ("loss.png" in names) == matplotlib
    if not matplotlib:
        assert "matplotlib is not installed: wrote losses.json, no loss.png" in text
