"""TRL's SFTTrainer, DPOTrainer and GRPOTrainer (with a programmatic reward) over a Llama
quantized by from_pretrained(quantization_config=QEngineConfig()), with a LoRA peft_config, and
transformers' Trainer with qengine's paged 8-bit AdamW. Tiny model from a config, data built
here, a word-level tokenizer trained on the fly (no download). Skipped when transformers,
peft, trl or datasets is not installed."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine.nn import QuantLinear

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra of torch-qengine)")
peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra of torch-qengine)")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (the hf extra of torch-qengine)")
trl = pytest.importorskip("trl", reason="trl is not installed (the hf extra of torch-qengine)")
import qengine.hf  # noqa: E402
from qengine.compat.peft import register  # noqa: E402

# Deprecation notices the trainers' own defaults trigger between trl, transformers and peft
# (e.g. trl's configs still set `gradient_checkpointing`); not about qengine, so silenced here.
pytestmark = [pytest.mark.filterwarnings(f"ignore::{cat}:{mod}.*") for cat in ("FutureWarning", "DeprecationWarning")
              for mod in ("transformers", "trl", "peft")]

WORDS = ("the cat dog sat ran on a mat log red blue big small quick slow fox jumps over lazy "
         "good bad yes no one two three").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")


def _sentence(g: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


@pytest.fixture
def setup(tmp_path):
    """(quantized model, tokenizer, LoRA config, output dir)."""
    tok = _tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   bos_token_id=tok.eos_token_id, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "float")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float",
                                                              quantization_config=qengine.hf.QEngineConfig())
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    register(lora)
    return model, tok, lora, tmp_path / "out"


def _args(cls, out, **kw):
    return cls(output_dir=str(out), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
               report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, **kw)


def _check_trained(trainer, steps=5):
    assert trainer.state.global_step == steps
    model = trainer.model
    from qengine.compat.peft import LoraQuantLinear
    assert any(isinstance(m, LoraQuantLinear) and isinstance(m.base_layer, QuantLinear) for m in model.modules())
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)  # B moved off zero
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    return losses


def test_sft_trainer(setup):
    model, tok, lora, out = setup
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"text": ["the cat sat on the mat " + _sentence(g, 4) for _ in range(32)]})
    trainer = trl.SFTTrainer(model=model, args=_args(trl.SFTConfig, out, max_length=32), train_dataset=data,
                             processing_class=tok, peft_config=lora)
    trainer.train()
    losses = _check_trained(trainer)
    assert losses[-1] < losses[0]


def test_sft_trainer_plain_lora_config(setup):
    # As with bitsandbytes: a plain LoraConfig as peft_config, no qengine call (no register()).
    model, tok, _, out = setup
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    data = datasets.Dataset.from_dict({"text": ["the cat sat on the mat " + _sentence(g, 4) for _ in range(16)]})
    trainer = trl.SFTTrainer(model=model, args=_args(trl.SFTConfig, out, max_length=32),
                             train_dataset=data, processing_class=tok, peft_config=lora)
    trainer.train()
    losses = _check_trained(trainer)
    assert losses[-1] < losses[0]
    after = {k.replace(".base_layer.", "."): v for k, v in trainer.model.get_base_model().state_dict().items()
             if "lora_" not in k}
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the quantized base, bitwise unchanged


def test_dpo_trainer(setup):
    model, tok, lora, out = setup
    g = torch.Generator().manual_seed(1)
    data = datasets.Dataset.from_dict({
        "prompt": [_sentence(g, 3) for _ in range(16)],
        "chosen": [" yes good " + _sentence(g, 2) for _ in range(16)],
        "rejected": [" no bad " + _sentence(g, 2) for _ in range(16)],
    })
    trainer = trl.DPOTrainer(model=model, args=_args(trl.DPOConfig, out, max_length=32), train_dataset=data,
                             processing_class=tok, peft_config=lora)
    trainer.train()
    _check_trained(trainer)


def _reward_cat(completions, **kwargs):
    """Programmatic reward: how often the completion says "cat"."""
    return [float(str(c).split().count("cat")) for c in completions]


def test_grpo_trainer(setup):
    model, tok, lora, out = setup
    g = torch.Generator().manual_seed(2)
    data = datasets.Dataset.from_dict({"prompt": [_sentence(g, 3) for _ in range(16)]})
    args = _args(trl.GRPOConfig, out, num_generations=4, max_completion_length=6, generation_batch_size=4)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward_cat, args=args, train_dataset=data,
                              processing_class=tok, peft_config=lora)
    trainer.train()
    _check_trained(trainer)


def test_trainer_with_paged_adamw8bit(setup):
    import importlib.util

    if importlib.util.find_spec("qengine.optim") is None:  # skip only where the package is absent
        pytest.skip("qengine.optim (PagedAdamW8bit) is not in this build")
    from qengine import optim
    model, tok, lora, out = setup
    model = peft.get_peft_model(model, lora)
    g = torch.Generator().manual_seed(3)
    text = "the cat sat on the mat " + _sentence(g, 6)  # every batch the same: the loss must fall
    enc = tok([text] * 16, padding="max_length", max_length=12, truncation=True)
    data = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "labels": enc["input_ids"]})
    opt = optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.999),
                               eps=1e-8, weight_decay=0.0)
    trainer = transformers.Trainer(model=model, args=_args(transformers.TrainingArguments, out), train_dataset=data,
                                   optimizers=(opt, None))
    trainer.train()
    losses = _check_trained(trainer)
    assert losses[-1] < losses[0]
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt  # ours, not a default AdamW
