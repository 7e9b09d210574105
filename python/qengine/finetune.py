"""QLoRA fine-tuning of a transformers causal LM: LoRA on a qengine-quantized base, a paged
optimizer, gradient checkpointing, periodic logging, resumable checkpoints, the adapter and
a loss-curve PNG at the end. What `qengine finetune` and `qengine demo` run.

With a teacher (`finetune(..., teacher=...)`, `qengine finetune --teacher DIR`) the same loop
distills: the LoRA side path of the quantized student is trained on
kd_alpha * T^2 * KL(teacher_T || student_T) + (1 - kd_alpha) * LM loss, the teacher's logits
(float model, in bfloat16 or float32, under no_grad) at temperature T = kd_temperature."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ._io import atomic_path, check_writable_dir
from .model import add_lora, load_adapter_state_dict, lora_parameters, save_adapter, adapter_state_dict
from .nn import LoRALinear
from .plot import MATPLOTLIB_MISSING, save_line_plot
from .text_data import ByteTokenizer, batch_for_step, read_texts, tokenize_corpus

__all__ = ["FinetuneConfig", "finetune", "make_optimizer", "load_tokenizer", "load_teacher", "distill_loss",
           "OPTIMIZERS", "DEFAULT_TARGETS", "TEACHER_DTYPES"]

OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw", "adamw")
TEACHER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of one run; every field is also a `qengine finetune` option."""
    steps: int = 100
    lr: float = 2e-4
    rank: int = 16
    alpha: float = 32.0
    targets: tuple = DEFAULT_TARGETS
    batch: int = 4
    seq_len: int = 128
    optim: str = "paged_adamw_8bit"
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0
    # distillation (used only with a teacher): KL temperature, weight of the KL term against the
    # LM loss (1: KL only), the dtype the teacher runs in
    kd_temperature: float = 2.0
    kd_alpha: float = 1.0
    teacher_dtype: str = "bfloat16"

    def validate(self) -> None:
        for name in ("steps", "rank", "batch", "seq_len", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if not self.targets:
            raise ValueError("--targets must name at least one module")
        t, a = self.kd_temperature, self.kd_alpha
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"--kd-temperature must be a finite number > 0, got {t!r}")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"--kd-alpha must be a number in [0, 1], got {a!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"--teacher-dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_dtype!r}")

    def distills(self) -> bool:
        """Whether the distillation fields differ from their defaults (they need a teacher)."""
        d = FinetuneConfig()
        return (self.kd_temperature, self.kd_alpha, self.teacher_dtype) != (d.kd_temperature, d.kd_alpha,
                                                                            d.teacher_dtype)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer called `name` (OPTIMIZERS) over params, AdamW semantics, weight decay 0."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    from . import optim

    cls = optim.PagedAdamW8bit if name == "paged_adamw_8bit" else optim.PagedAdamW
    return cls(params, lr=lr, weight_decay=0.0)


def load_tokenizer(model_dir: Optional[str], vocab_size: int):
    """The model directory's tokenizer when it has one, else the byte tokenizer (which needs a
    vocabulary of at least 259)."""
    if model_dir is not None and any(os.path.isfile(os.path.join(model_dir, f))
                                     for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"the model has no tokenizer files and a vocabulary of {vocab_size} < 259, too small for "
                         "the byte tokenizer")
    return ByteTokenizer()


def _same_tokenizer(a, b) -> bool:
    if isinstance(a, ByteTokenizer) or isinstance(b, ByteTokenizer):
        return isinstance(a, ByteTokenizer) and isinstance(b, ByteTokenizer)
    return a.get_vocab() == b.get_vocab()


def _vocab_size(model: nn.Module) -> Optional[int]:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def load_teacher(teacher_dir: str, tokenizer, vocab_size: int, dtype: str = "bfloat16") -> nn.Module:
    """The float causal LM in `teacher_dir`, in `dtype` ("bfloat16" or "float32"), eval mode,
    frozen. ValueError when the directory is missing, holds a quantized model, or its
    tokenizer or vocabulary differs from the student's (`tokenizer`, `vocab_size`): the KL
    compares the two models token by token, so both must read the text alike."""
    from .hf.checkpoint import load_config, load_model, saved_quantization_config

    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
    if not os.path.isdir(teacher_dir):
        raise ValueError(f"teacher directory {teacher_dir!r} does not exist")
    config = load_config(teacher_dir)  # ValueError naming a missing or malformed config.json
    if saved_quantization_config(config) is not None:
        raise ValueError(f"teacher {teacher_dir!r} is a quantized checkpoint; distill from the float model")
    if config.vocab_size != vocab_size:
        raise ValueError(f"teacher {teacher_dir!r} has a vocabulary of {config.vocab_size}, the student {vocab_size}: "
                         "distillation needs the same tokenizer and vocabulary")
    if not _same_tokenizer(load_tokenizer(teacher_dir, config.vocab_size), tokenizer):
        raise ValueError(f"teacher {teacher_dir!r} has another tokenizer than the student: distillation compares "
                         "next-token distributions over the same tokens")
    teacher = load_model(teacher_dir)
    return teacher.to(TEACHER_DTYPES[dtype]).eval().requires_grad_(False)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the vocabulary and averaged
    over positions, in float32 (the T^2 keeps the gradient's scale independent of T)."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _fingerprint(model: nn.Module) -> list:
    """A cheap identity of a teacher passed as a module: each parameter's name, shape and sum."""
    return [[n, list(p.shape), round(float(p.detach().double().sum()), 6)] for n, p in model.named_parameters()]


def _enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing (non-reentrant: only LoRA parameters need grads),
    under its current name or the older one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _run_signature(cfg: FinetuneConfig, model_dir: str, data: str, teacher: object = None) -> dict:
    sig = dataclasses.asdict(cfg)
    sig["targets"] = list(cfg.targets)
    for k in ("steps", "checkpoint_every", "log_every", "compile"):  # may change between resumes
        sig.pop(k)
    kd = {k: sig.pop(k) for k in ("kd_temperature", "kd_alpha", "teacher_dtype")}
    if teacher is not None:  # a plain run's signature stays as before distillation existed
        sig["distill"] = {**kd, "teacher": teacher}
    sig.update(model=os.path.abspath(model_dir) if model_dir else None, data=os.path.abspath(data))
    return sig


def _save_checkpoint(path: str, model: nn.Module, opt, step: int, losses: list, sig: dict) -> None:
    os.makedirs(path, exist_ok=True)
    state = {"step": step, "losses": losses, "signature": sig, "optimizer": opt.state_dict(),
             "adapter": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()},
             "rng": torch.get_rng_state()}
    with atomic_path(os.path.join(path, "state.pt")) as tmp:
        torch.save(state, tmp)


def _describe_distill(d: Optional[dict]) -> str:
    if not d:
        return "no teacher"
    teacher = d["teacher"] if isinstance(d["teacher"], str) else "a teacher module"
    return (f"teacher {teacher}, temperature {d['kd_temperature']}, alpha {d['kd_alpha']}, "
            f"teacher dtype {d['teacher_dtype']}")


def _load_checkpoint(path: str, model: nn.Module, opt, sig: dict) -> tuple[int, list]:
    file = os.path.join(path, "state.pt")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: say which, never half-resume
        raise ValueError(f"cannot resume from {file}: {e}") from None
    old = state.get("signature")
    if old != sig:
        if isinstance(old, dict) and old.get("distill") != sig.get("distill"):
            was, now = (_describe_distill(s.get("distill")) for s in (old, sig))
            raise ValueError(f"{file} belongs to a run with other distillation settings ({was}; this run: {now}); "
                             "use another --out or delete it")
        raise ValueError(f"{file} belongs to a run with other settings; use another --out or delete it")
    load_adapter_state_dict(model, state["adapter"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), list(state["losses"])


def finetune(model: nn.Module, tokenizer, data_path: str, out_dir: str, cfg: FinetuneConfig,
             model_dir: Optional[str] = None, log: Callable[[str], None] = print,
             stop_when: Optional[Callable[[list], bool]] = None,
             teacher: Union[str, nn.Module, None] = None) -> dict:
    """Trains LoRA adapters on `model` (quantized or not) over the text in `data_path`: new ones
    (cfg.rank, cfg.alpha on cfg.targets), or, when the model already has LoRA layers (e.g. from
    add_lora(init="correct")), those, from their current values (their rank and alpha must be
    cfg's).

    With `teacher` (a float model directory, loaded by load_teacher in cfg.teacher_dtype, or a
    causal LM module, used as given) the loss is cfg.kd_alpha * distill_loss(student, teacher,
    cfg.kd_temperature) + (1 - cfg.kd_alpha) * the LM loss: distillation into the side path (a
    module teacher runs in its own dtype; cfg.teacher_dtype applies to a directory).
    Resumes from out_dir/checkpoint when it holds a run with the same settings (the teacher and
    distillation settings included); writes out_dir/checkpoint every cfg.checkpoint_every
    steps, and out_dir/adapter.safetensors, losses.json and (with matplotlib) loss.png at the
    end. Returns {"losses", "steps", "tokens_per_s", "adapter", "plot" (None without
    matplotlib), "files" (every file written)}."""
    cfg.validate()
    if teacher is None and cfg.distills():
        raise ValueError("--kd-temperature, --kd-alpha and --teacher-dtype apply to distillation: give --teacher")
    check_writable_dir(out_dir, "out_dir")
    texts = read_texts(data_path)
    stream = tokenize_corpus(texts, tokenizer)
    teacher_id = None
    if teacher is not None:
        vocab = _vocab_size(model)
        if isinstance(teacher, (str, os.PathLike)):
            teacher_id = os.path.abspath(teacher)
            teacher = load_teacher(os.fspath(teacher), tokenizer, vocab, cfg.teacher_dtype)
        elif isinstance(teacher, nn.Module):
            if teacher is model:
                raise ValueError("the teacher must be another model than the student (the float original)")
            if _vocab_size(teacher) != vocab:
                raise ValueError(f"the teacher's vocabulary ({_vocab_size(teacher)}) differs from the student's "
                                 f"({vocab}): distillation needs the same tokenizer and vocabulary")
            teacher_id = {"module": type(teacher).__name__, "parameters": _fingerprint(teacher)}
            teacher = teacher.eval().requires_grad_(False)
        else:
            raise TypeError(f"teacher must be a model directory or a module, got {type(teacher).__name__}")
        if int(stream.max()) >= vocab:
            raise ValueError(f"the tokenizer produces ids up to {int(stream.max())}, outside the vocabulary of {vocab}")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    existing = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if existing:  # e.g. add_lora(init="correct") ran first: train those adapters from their init
        for n, m in existing:
            if (m.r, m.alpha) != (cfg.rank, float(cfg.alpha)):
                raise ValueError(f"{n} already has an adapter of rank {m.r}, alpha {m.alpha:g}; this run asks for "
                                 f"rank {cfg.rank}, alpha {cfg.alpha:g}")
        log(f"training the {len(existing)} adapters the model already has")
    else:
        add_lora(model, r=cfg.rank, alpha=cfg.alpha, target_modules=list(cfg.targets))
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if hasattr(model, "config"):
        model.config.use_cache = False
    model.train()
    opt = make_optimizer(cfg.optim, lora_parameters(model), cfg.lr)
    sig = _run_signature(cfg, model_dir, data_path, teacher_id)
    if existing:
        sig["adapters"] = sorted(n for n, _ in existing)
    ckpt = os.path.join(out_dir, "checkpoint")
    start, losses = 0, []
    if os.path.isfile(os.path.join(ckpt, "state.pt")):
        start, losses = _load_checkpoint(ckpt, model, opt, sig)
        log(f"resuming from step {start} ({ckpt})")
    forward = torch.compile(model) if cfg.compile else model
    params = lora_parameters(model)
    t0, tokens = time.perf_counter(), 0
    step = start
    for step in range(start, cfg.steps):
        ids = batch_for_step(stream, step, cfg.batch, cfg.seq_len, cfg.seed)
        if teacher is None:
            loss = forward(input_ids=ids, labels=ids).loss
        else:
            loss = _distill_step(forward, teacher, ids, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += ids.numel()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            log(f"step {done:5d}/{cfg.steps}  loss {losses[-1]:.4f}  {rate:,.0f} tokens/s")
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save_checkpoint(ckpt, model, opt, done, losses, sig)
        if stop_when is not None and stop_when(losses):
            log(f"stopping at step {done}: the loss fell enough")
            break
    elapsed = time.perf_counter() - t0
    adapter = os.path.join(out_dir, "adapter.safetensors")
    save_adapter(model, adapter)
    losses_json = os.path.join(out_dir, "losses.json")
    with atomic_path(losses_json) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(losses, f)
    files = [adapter, losses_json]
    plot = _save_loss_plot(os.path.join(out_dir, "loss.png"), losses, log)
    if plot:
        files.append(plot)
    _save_checkpoint(ckpt, model, opt, len(losses), losses, sig)
    files.append(os.path.join(ckpt, "state.pt"))
    return {"losses": losses, "steps": len(losses), "tokens_per_s": tokens / max(elapsed, 1e-9), "adapter": adapter,
            "plot": plot, "files": files}


def _distill_step(forward, teacher: nn.Module, ids: torch.Tensor, cfg: FinetuneConfig) -> torch.Tensor:
    """The distillation objective on one batch (the student's graph kept for backward)."""
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    lm = cfg.kd_alpha < 1.0
    out = forward(input_ids=ids, labels=ids if lm else None)
    loss = distill_loss(out.logits, t_logits, cfg.kd_temperature)
    return cfg.kd_alpha * loss + (1.0 - cfg.kd_alpha) * out.loss if lm else loss


def _save_loss_plot(path: str, losses: list, log: Callable[[str], None]) -> Optional[str]:
    """Writes the loss curve to `path` and returns it; without matplotlib (optional) says so
    and returns None, removing an earlier run's plot rather than leave it beside new losses."""
    if not losses:
        return None
    try:
        save_line_plot(path, losses)
    except ImportError:
        stale = os.path.isfile(path)
        if stale:
            os.remove(path)
        log(f"{MATPLOTLIB_MISSING}: wrote losses.json, no loss.png"
            + (" (removed the loss.png of an earlier run)" if stale else ""))
        return None
    return path
