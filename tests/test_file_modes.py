"""Every file qengine writes gets the mode open() would give it: 0o666 less the umask for a new
file (safetensors' writer alone used to leave 0o600), an existing file's own mode when replaced."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import qengine
from qengine._io import save_tensors, torch_save


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def want_mode(request):
    """Sets the umask for the test (restored after) and gives the mode a new file should get."""
    old = os.umask(request.param)
    try:
        yield 0o666 & ~request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o7777


def _tiny_llama():
    transformers = pytest.importorskip("transformers", reason="the checkpoint writer needs transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def test_adapter_safetensors(want_mode, tmp_path):
    model = qengine.add_lora(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64)), r=4,
                             target_modules=["0", "2"])
    path = tmp_path / "adapter.safetensors"
    qengine.save_adapter(model, path)
    assert mode(path) == want_mode


def test_save_tensors_safetensors_and_pt(want_mode, tmp_path):
    tensors = {"w": torch.randn(8, 8)}
    save_tensors(tensors, tmp_path / "t.safetensors")
    save_tensors(tensors, tmp_path / "t.pt")
    torch_save({"step": 3}, tmp_path / "state.pt")
    for name in ("t.safetensors", "t.pt", "state.pt"):
        assert mode(tmp_path / name) == want_mode, name


def test_save_quantized_checkpoint_and_json(want_mode, tmp_path):
    from qengine.hf import save_quantized

    model = qengine.quantize_model(_tiny_llama(), "nf4", 64, progress=False)
    save_quantized(model, tmp_path / "q")
    for name in ("model.safetensors", "config.json"):
        assert mode(tmp_path / "q" / name) == want_mode, name


def test_quantize_command_checkpoint(want_mode, tmp_path, capsys):
    from qengine.cli import main

    src = tmp_path / "float"
    _tiny_llama().save_pretrained(src)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--quiet"]) == 0
    for name in ("model.safetensors", "config.json"):
        assert mode(tmp_path / "q" / name) == want_mode, name


def test_loss_plot_png(want_mode, tmp_path):
    pytest.importorskip("matplotlib", reason="the loss plot needs matplotlib")
    from qengine.plot import save_line_plot

    save_line_plot(tmp_path / "loss.png", [3.0, 2.5, 2.0])
    assert mode(tmp_path / "loss.png") == want_mode


def test_finetune_outputs(want_mode, tmp_path, capsys):
    """adapter.safetensors, losses.json, loss.png and checkpoint/state.pt of one real run."""
    from qengine.finetune import FinetuneConfig, finetune
    from qengine.text_data import ByteTokenizer

    transformers = pytest.importorskip("transformers", reason="finetune needs transformers")
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    data = tmp_path / "train.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "ft"
    result = finetune(transformers.LlamaForCausalLM(cfg), ByteTokenizer(), str(data), str(out),
                      FinetuneConfig(steps=1, batch=1, seq_len=8, rank=2, optim="adamw", gradient_checkpointing=False))
    assert len(result["files"]) >= 3
    for path in result["files"]:
        assert mode(path) == want_mode, path


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors({"w": torch.ones(2)}, path)
    os.chmod(path, 0o640)
    save_tensors({"w": torch.zeros(2)}, path)
    assert mode(path) == 0o640
