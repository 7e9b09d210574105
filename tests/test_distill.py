"""Distillation (finetune(..., teacher=...), `qengine finetune --teacher`): the LoRA side path of
a quantized student trained on the KL to its float teacher's logits lowers that KL on held-out
text; an interrupted run resumes to the same adapter; a resume with other distillation settings,
and every bad input, is refused with a message naming it."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.nn import functional as F

import qengine
from qengine.cli import main
from qengine.finetune import FinetuneConfig, distill_loss, finetune
from qengine.text_data import ByteTokenizer

transformers = pytest.importorskip("transformers", reason="distillation trains transformers causal LMs")

TRAIN = ("the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. "
         "a small bird sings in the old oak tree and the children laugh in the green field. ") * 12
HELD_OUT = "the lazy cat jumps over the warm dog and a small fox sings by the old fire in the field. " * 3


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A float tiny Llama (byte tokenizer), trained for a few steps so its predictions are peaked
    (a quantized copy then differs from it measurably)."""
    model = _llama()
    ids = torch.tensor([ByteTokenizer().encode(TRAIN)[:8 * 48]]).reshape(8, 48)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    d = tmp_path_factory.mktemp("teacher")
    model.eval().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(TRAIN)
    return str(p)


def _student(teacher_dir):
    return qengine.quantize_model(transformers.LlamaForCausalLM.from_pretrained(teacher_dir), "nf4", 64, True,
                                  progress=False)


def _kl(student, teacher, text=HELD_OUT):
    ids = torch.tensor([ByteTokenizer().encode(text)])
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    return float(F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                          reduction="none").sum(-1).mean())


def _cfg(**kw):
    base = dict(steps=12, lr=5e-3, rank=4, alpha=8.0, batch=4, seq_len=32, optim="adamw", checkpoint_every=4,
                log_every=4, gradient_checkpointing=False)
    return FinetuneConfig(**{**base, **kw})


def test_distill_loss_is_t2_scaled_kl():
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(distill_loss(s, t, 2.0), kl, atol=1e-6)
    assert float(distill_loss(t, t, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_held_out_kl_to_the_teacher(teacher_dir, data, tmp_path):
    teacher = transformers.LlamaForCausalLM.from_pretrained(teacher_dir).eval()
    student = _student(teacher_dir)
    before = _kl(student, teacher)
    assert before > 1e-4  # quantization moved the student off the teacher
    r = finetune(student, ByteTokenizer(), data, str(tmp_path / "kd"), _cfg(teacher_dtype="float32"),
                 teacher=teacher_dir, log=lambda s: None)
    after = _kl(student.eval(), teacher)
    assert after < 0.7 * before, (before, after)
    assert r["steps"] == 12 and os.path.isfile(r["adapter"])
    # the same loop with a module teacher and a mix with the LM loss
    student2 = _student(teacher_dir)
    finetune(student2, ByteTokenizer(), data, str(tmp_path / "mix"), _cfg(steps=4, kd_alpha=0.5), teacher=teacher,
             log=lambda s: None)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distillation_resumes_exactly_and_refuses_other_settings(teacher_dir, data, tmp_path, monkeypatch):
    import qengine.finetune as ft

    straight = finetune(_student(teacher_dir), ByteTokenizer(), data, str(tmp_path / "a"), _cfg(steps=8),
                        teacher=teacher_dir, log=lambda s: None)
    real = ft.batch_for_step

    def dies_at_step_6(stream, step, *a, **k):
        if step == 5:
            raise KeyboardInterrupt
        return real(stream, step, *a, **k)

    monkeypatch.setattr(ft, "batch_for_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        finetune(_student(teacher_dir), ByteTokenizer(), data, str(tmp_path / "b"), _cfg(steps=8),
                 teacher=teacher_dir, log=lambda s: None)
    monkeypatch.setattr(ft, "batch_for_step", real)
    logs = []
    resumed = finetune(_student(teacher_dir), ByteTokenizer(), data, str(tmp_path / "b"), _cfg(steps=8),
                       teacher=teacher_dir, log=logs.append)
    assert any("resuming from step 4" in s for s in logs)
    assert straight["losses"] == resumed["losses"]
    from safetensors.torch import load_file

    a, b = load_file(straight["adapter"]), load_file(resumed["adapter"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for cfg, teacher, what in ((_cfg(steps=8, kd_temperature=3.0), teacher_dir, "temperature 3.0"),
                               (_cfg(steps=8, kd_alpha=0.5), teacher_dir, "alpha 0.5"),
                               (_cfg(steps=8), None, "this run: no teacher")):
        with pytest.raises(ValueError, match="other distillation settings.*" + what):
            finetune(_student(teacher_dir), ByteTokenizer(), data, str(tmp_path / "b"), cfg, teacher=teacher,
                     log=lambda s: None)


def test_bad_input(teacher_dir, data, tmp_path):
    student = _student(teacher_dir)
    out = str(tmp_path / "o")
    for kw, msg in (({"kd_temperature": 0.0}, "kd-temperature"), ({"kd_temperature": float("nan")}, "kd-temperature"),
                    ({"kd_alpha": 1.5}, "kd-alpha"), ({"kd_alpha": -0.1}, "kd-alpha"),
                    ({"teacher_dtype": "float16"}, "teacher-dtype")):
        with pytest.raises(ValueError, match=msg):
            finetune(student, ByteTokenizer(), data, out, _cfg(**kw), teacher=teacher_dir)
    with pytest.raises(ValueError, match="give --teacher"):
        finetune(student, ByteTokenizer(), data, out, _cfg(kd_alpha=0.5))
    with pytest.raises(ValueError, match="does not exist"):
        finetune(student, ByteTokenizer(), data, out, _cfg(), teacher=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="another model than the student"):
        finetune(student, ByteTokenizer(), data, out, _cfg(), teacher=student)
    other = tmp_path / "other_vocab"
    m = _llama()
    m.resize_token_embeddings(300, mean_resizing=False)
    m.config.vocab_size = 300
    m.save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary of 300"):
        finetune(student, ByteTokenizer(), data, out, _cfg(), teacher=str(other))
    with pytest.raises(ValueError, match="vocabulary"):
        finetune(student, ByteTokenizer(), data, out, _cfg(), teacher=m)
    # same vocabulary size, another tokenizer (the teacher directory has one, the student reads bytes)
    tok_dir = tmp_path / "other_tok"
    _llama().save_pretrained(tok_dir)
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(259)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0").save_pretrained(tok_dir)
    with pytest.raises(ValueError, match="another tokenizer"):
        finetune(student, ByteTokenizer(), data, out, _cfg(), teacher=str(tok_dir))
    quantized = tmp_path / "quantized"
    from qengine.hf.checkpoint import save_quantized

    save_quantized(_student(teacher_dir), str(quantized))
    with pytest.raises(ValueError, match="quantized checkpoint"):
        finetune(student, ByteTokenizer(), data, out, _cfg(), teacher=str(quantized))
    assert not os.path.exists(os.path.join(out, "checkpoint"))


def test_cli_teacher(teacher_dir, data, tmp_path, capsys):
    base = ["finetune", "--model", teacher_dir, "--data", data, "--steps", "3", "--batch", "2", "--seq-len", "16",
            "--rank", "4", "--optim", "adamw", "--lr", "1e-3", "--log-every", "1"]
    out = str(tmp_path / "cli")
    assert main(base + ["--out", out, "--teacher", teacher_dir, "--kd-temperature", "1.5", "--kd-alpha", "0.8"]) == 0
    text = capsys.readouterr().out
    assert "over 3 steps" in text and os.path.isfile(os.path.join(out, "adapter.safetensors"))
    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)
    assert state["signature"]["distill"] == {"kd_temperature": 1.5, "kd_alpha": 0.8, "teacher_dtype": "bfloat16",
                                             "teacher": os.path.abspath(teacher_dir)}
    for bad, msg in ((["--teacher", str(tmp_path / "missing")], "teacher directory"),
                     (["--teacher", teacher_dir, "--kd-temperature", "-1"], "kd-temperature"),
                     (["--teacher", teacher_dir, "--kd-alpha", "2"], "kd-alpha"),
                     (["--kd-alpha", "0.5"], "give --teacher")):
        code = main(base + ["--out", str(tmp_path / "bad")] + bad)
        assert code != 0 and msg in capsys.readouterr().err


def test_distillation_trains_a_correction_init(teacher_dir, data, tmp_path):
    """A student that already has adapters (add_lora(init="correct")) trains those, from their fit."""
    teacher = transformers.LlamaForCausalLM.from_pretrained(teacher_dir).eval()
    calib = torch.tensor([ByteTokenizer().encode(TRAIN)[:4 * 64]]).reshape(4, 64)
    student = qengine.add_lora(_student(teacher_dir), r=4, alpha=8.0, init="correct", calibration=calib,
                               reference=teacher)
    with pytest.raises(ValueError, match="already has an adapter of rank 4"):
        finetune(student, ByteTokenizer(), data, str(tmp_path / "r8"), _cfg(rank=8), teacher=teacher)
    corrected = _kl(student, teacher)
    logs = []
    finetune(student, ByteTokenizer(), data, str(tmp_path / "c"), _cfg(lr=1e-3), teacher=teacher, log=logs.append)
    assert any("already has" in s for s in logs)
    after = _kl(student.eval(), teacher)
    assert after < corrected
