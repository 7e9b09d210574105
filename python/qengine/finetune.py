"""QLoRA fine-tuning of a transformers causal LM: LoRA on a qengine-quantized base, a paged
optimizer, gradient checkpointing, periodic logging, resumable checkpoints, the adapter and
a loss-curve PNG at the end. What `qengine finetune` and `qengine demo` run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Optional

import torch
from torch import nn

from ._io import atomic_path, check_writable_dir
from .model import add_lora, load_adapter_state_dict, lora_parameters, save_adapter, adapter_state_dict
from .plot import MATPLOTLIB_MISSING, save_line_plot
from .text_data import ByteTokenizer, batch_for_step, read_texts, tokenize_corpus

__all__ = ["FinetuneConfig", "finetune", "make_optimizer", "load_tokenizer", "OPTIMIZERS", "DEFAULT_TARGETS"]

OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw", "adamw")
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


def _enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing (non-reentrant: only LoRA parameters need grads),
    under its current name or the older one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _run_signature(cfg: FinetuneConfig, model_dir: str, data: str) -> dict:
    sig = dataclasses.asdict(cfg)
    sig["targets"] = list(cfg.targets)
    for k in ("steps", "checkpoint_every", "log_every", "compile"):  # may change between resumes
        sig.pop(k)
    sig.update(model=os.path.abspath(model_dir) if model_dir else None, data=os.path.abspath(data))
    return sig


def _save_checkpoint(path: str, model: nn.Module, opt, step: int, losses: list, sig: dict) -> None:
    os.makedirs(path, exist_ok=True)
    state = {"step": step, "losses": losses, "signature": sig, "optimizer": opt.state_dict(),
             "adapter": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()},
             "rng": torch.get_rng_state()}
    with atomic_path(os.path.join(path, "state.pt")) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: str, model: nn.Module, opt, sig: dict) -> tuple[int, list]:
    file = os.path.join(path, "state.pt")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: say which, never half-resume
        raise ValueError(f"cannot resume from {file}: {e}") from None
    if state.get("signature") != sig:
        raise ValueError(f"{file} belongs to a run with other settings; use another --out or delete it")
    load_adapter_state_dict(model, state["adapter"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), list(state["losses"])


def finetune(model: nn.Module, tokenizer, data_path: str, out_dir: str, cfg: FinetuneConfig,
             model_dir: Optional[str] = None, log: Callable[[str], None] = print,
             stop_when: Optional[Callable[[list], bool]] = None) -> dict:
    """Trains LoRA adapters on `model` (quantized or not) over the text in `data_path`.

    Resumes from out_dir/checkpoint when it holds a run with the same settings; writes
    out_dir/checkpoint every cfg.checkpoint_every steps, and out_dir/adapter.safetensors,
    losses.json and (with matplotlib) loss.png at the end. Returns {"losses", "steps",
    "tokens_per_s", "adapter", "plot" (None without matplotlib), "files" (every file written)}."""
    cfg.validate()
    check_writable_dir(out_dir, "out_dir")
    texts = read_texts(data_path)
    stream = tokenize_corpus(texts, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    add_lora(model, r=cfg.rank, alpha=cfg.alpha, target_modules=list(cfg.targets))
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if hasattr(model, "config"):
        model.config.use_cache = False
    model.train()
    opt = make_optimizer(cfg.optim, lora_parameters(model), cfg.lr)
    sig = _run_signature(cfg, model_dir, data_path)
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
        loss = forward(input_ids=ids, labels=ids).loss
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
