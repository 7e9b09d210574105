"""LoRA adapters on a model's quantized (or float) layers: add_lora (default or LoftQ init),
selecting and freezing their parameters, and saving / loading the adapter alone."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from torch import nn

from ._targets import matches, parent_of
from .formats import Format
from .loftq import LoftQHolder, replace_with_loftq
from .nn import LoRAExperts, LoRALinear, QuantExpertsWeight, QuantLinear

__all__ = ["add_lora", "lora_parameters", "mark_only_lora_trainable", "adapter_state_dict",
           "load_adapter_state_dict", "save_adapter", "load_adapter"]

ADAPTER_FORMAT = "qengine-lora"
ADAPTER_VERSION = "1"


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
             target_modules: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
             freeze_base: bool = True, init: str = "default", iters: int = 5, format: str | Format = "nf4",
             blocksize: Optional[int] = 64, double_quant: bool = True, experts: bool = False, calibration=None,
             reference: Optional[nn.Module] = None, damp: float = 0.01) -> nn.Module:
    """Wraps the target layers of `model` in LoRALinear, in place, and returns `model`.

    target_modules: names (full, last component such as "q_proj", or a parent's name);
    default: every QuantLinear. Targets must be QuantLinear or nn.Linear. With freeze_base,
    only LoRA parameters stay trainable afterwards (mark_only_lora_trainable).

    init: "default" (A Kaiming-uniform, B = 0: the layer starts equal to its base) or "loftq"
    (LoftQ): each target must be a float nn.Linear (default targets: every nn.Linear except
    ``lm_head``), which is quantized here (`format`, `blocksize`, `double_quant`) while
    alternating, `iters` times, Q = quantize(W - s*B@A) and s*B@A = rank-r SVD of W - Q, so the
    quantized base plus the adapter starts closer to W than the quantized weight alone.

    init="correct" (error-correcting, EoRA-style; qengine.calibrate.correct): each target is a
    QuantLinear, and A, B minimise ||X (W - Ŵ - s·B A)^T||_F with W the same-named float layer of
    `reference` (the float model the quantized one was made from) and X its inputs while
    `reference` runs `calibration` (token ids [batch, seq_len]); `damp` regularises H = X^T X.
    Frozen, the side path makes the layer's outputs match the float layer's more closely; or
    train it from there as QLoRA.

    experts: also give the quantized Mixture-of-Experts weights (QuantExpertsWeight, see
    quantize_model) a per-expert adapter (LoRAExperts): all of them when target_modules is None,
    else those whose name (e.g. "gate_up_proj", "down_proj", "experts") matches. Their side path
    runs inside the grouped kernel. Expert weights are never targeted without experts=True.

    Adapters do not stack. The default targets are the layers without one (so a second call
    adapts only the layers added since; ValueError naming a layer when every one already has
    an adapter); a layer named in target_modules that already has one raises ValueError naming
    it, before anything changes: replace the old adapter by its base or merged layer first, or
    name only layers without one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if init not in ("default", "loftq", "correct"):
        raise ValueError(f"init must be 'default', 'loftq' or 'correct', got {init!r}")
    if init != "correct" and (calibration is not None or reference is not None):
        raise ValueError("calibration= and reference= are for init='correct'")
    if init == "loftq":
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be a positive int, got {iters!r}")
        candidates = [n for n, _ in model.named_modules() if n and not _inside_lora(model, n)]
        replace_with_loftq(model, candidates, target_modules, r, alpha, format, blocksize, double_quant, iters)
        if target_modules is None:
            target_modules = [n for n, m in model.named_modules() if isinstance(m, LoftQHolder)]
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names, expert_names, adapted = [], [], []
    for name, mod in model.named_modules():
        if name and isinstance(mod, (LoRALinear, LoRAExperts)) and not _inside_lora(model, name):
            if isinstance(mod, LoRALinear) or experts:
                adapted.append(name)
            if target_modules is not None and matches(name, target_modules) and (isinstance(mod, LoRALinear)
                                                                                  or experts):
                raise ValueError(f"{name} already has a LoRA adapter ({type(mod).__name__}, r={mod.r}); add_lora "
                                 "does not stack adapters. Replace it by its base (.base_layer) or merged layer "
                                 "(LoRALinear.merged_linear()) first, or pass target_modules naming only layers "
                                 "without one")
        if not name or isinstance(mod, (LoRALinear, LoRAExperts)) or _inside_lora(model, name):
            continue
        if isinstance(mod, QuantExpertsWeight):
            # an expert matrix matches by its own name or its experts module's ("experts")
            if experts and (target_modules is None or matches(name, target_modules)
                            or matches(name.rpartition(".")[0], target_modules)):
                expert_names.append(name)
        elif target_modules is None:
            if isinstance(mod, QuantLinear):
                names.append(name)
        elif matches(name, target_modules) and isinstance(mod, (QuantLinear, nn.Linear, LoftQHolder)):
            names.append(name)
    for name in expert_names:
        owner, attr = parent_of(model, name)
        setattr(owner, attr, LoRAExperts(getattr(owner, attr), r=r, alpha=alpha, dtype=dtype))
    if not names and expert_names:
        if freeze_base:
            mark_only_lora_trainable(model)
        return model
    if not names and target_modules is None and adapted:
        raise ValueError(f"every layer add_lora targets by default already has a LoRA adapter ({adapted[0]}"
                         f"{f' and {len(adapted) - 1} more' if len(adapted) > 1 else ''}); add_lora does not stack "
                         "adapters: train the existing ones, or replace them by their base layers (.base_layer) first")
    if not names:
        raise ValueError(f"no layer of the model matches target_modules={target_modules!r} "
                         "(QuantLinear or nn.Linear layers, by full or last name)")
    factors = None
    if init == "correct":
        from .calibrate.correct import correct_layers

        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        factors = correct_layers(model, reference, calibration, names, r, alpha / r, damp)
    for name in names:
        owner, attr = parent_of(model, name)
        target = getattr(owner, attr)
        if factors is not None:
            layer = LoRALinear(target, r=r, alpha=alpha, dropout=dropout, dtype=dtype)
            with torch.no_grad():
                A, B = factors[name]
                layer.lora_A.copy_(A.to(layer.lora_A.dtype))
                layer.lora_B.copy_(B.to(layer.lora_B.dtype))
        elif isinstance(target, LoftQHolder):
            layer = LoRALinear(target.base, r=r, alpha=alpha, dropout=dropout, dtype=dtype)
            with torch.no_grad():
                layer.lora_A.copy_(target.lora_A)
                layer.lora_B.copy_(target.lora_B)
        else:
            layer = LoRALinear(target, r=r, alpha=alpha, dropout=dropout, dtype=dtype)
        setattr(owner, attr, layer)
    if freeze_base:
        mark_only_lora_trainable(model)
    return model


def _inside_lora(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), (LoRALinear, LoRAExperts, LoftQHolder))
               for i in range(1, len(parts)))


def _lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every adapter: LoRALinear layers and LoRAExperts (per-expert adapters)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B parameters of every LoRALinear in `model` (what an optimizer should train)."""
    return [p for _, m in _lora_modules(model) for p in (m.lora_A, m.lora_B)]


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Sets requires_grad on LoRA parameters only; returns the number of trainable elements."""
    keep = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]} for every LoRALinear."""
    sd = {}
    for name, mod in _lora_modules(model):
        sd.update(mod.adapter_state_dict(name + "."))
    if not sd:
        raise ValueError("model has no LoRALinear layers (call qengine.add_lora first)")
    return sd


def _adapter_config(model: nn.Module) -> dict:
    return {name: {"r": m.r, "alpha": m.alpha, "in_features": m.in_features, "out_features": m.out_features}
            for name, m in _lora_modules(model)}


def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], config: Optional[dict] = None) -> None:
    """Loads A and B of every LoRALinear from `sd`; the adapter must cover exactly this model's
    LoRA layers with the same shapes (else ValueError naming the first difference). `config`
    (as save_adapter stores it) restores each layer's alpha."""
    mods = dict(_lora_modules(model))
    if not mods:
        raise ValueError("model has no LoRALinear layers (call qengine.add_lora with the adapter's settings first)")
    names = {k.rsplit(".", 1)[0] for k in sd}
    extra = sorted(n for n in names if n not in mods)
    missing = sorted(n for n in mods if n not in names)
    if extra or missing:
        raise ValueError(f"adapter does not match this model: layers only in the adapter {extra[:5]}, layers only "
                         f"in the model {missing[:5]} (an adapter for a different model or target_modules?)")
    for name, mod in mods.items():
        if config is not None and name in config and int(config[name].get("r", mod.r)) != mod.r:
            raise ValueError(f"adapter layer {name} has rank {config[name]['r']}, the model's has {mod.r}")
        mod.load_adapter_state_dict(sd, name + ".")
        if config is not None and name in config:
            mod.alpha = float(config[name]["alpha"])


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the adapter alone (A, B of every LoRALinear, plus ranks and alphas) as safetensors."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "config": json.dumps(_adapter_config(model))}
    from ._io import atomic_path

    with atomic_path(path) as tmp:  # a save killed midway leaves the previous adapter intact
        save_file(sd, tmp, metadata=meta)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Loads an adapter written by save_adapter into the model's LoRALinear layers."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read adapter file {os.fspath(path)!r}: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a qengine LoRA adapter (metadata format "
                         f"{meta.get('format')!r})")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"adapter metadata is corrupt: {e}") from None
    device = next(iter(lora_parameters(model)), torch.empty(0)).device
    load_adapter_state_dict(model, {k: v.to(device) for k, v in sd.items()}, config)
