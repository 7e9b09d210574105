"""Selective and additive fine-tuning methods over a quantized model (no peft package needed):
BitFit (biases only), layer freezing (train the last N blocks' float parameters), and
Houlsby-style bottleneck adapters after the attention and MLP blocks."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .nn import LoRALinear, QuantLinear

__all__ = ["bitfit", "freeze", "add_adapters", "Adapter", "trainable_parameters"]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def trainable_parameters(model: nn.Module) -> int:
    """Number of elements with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bitfit(model: nn.Module) -> int:
    """BitFit: only the bias parameters stay trainable (those of QuantLinear layers included;
    their quantized weights are frozen state). Returns the number of trainable elements;
    ValueError if the model has no bias (e.g. Llama, whose projections have none)."""
    _check_model(model)
    n = 0
    for name, p in model.named_parameters():
        keep = name.rsplit(".", 1)[-1] == "bias"
        p.requires_grad_(keep)
        n += p.numel() if keep else 0
    if n == 0:
        raise ValueError("model has no bias parameters to train (BitFit needs biases; Llama-style projections have "
                         "none: build the model with bias, e.g. LlamaConfig(attention_bias=True, mlp_bias=True))")
    return n


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks: the longest nn.ModuleList of the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError("model has no nn.ModuleList of blocks (layer freezing needs repeated layers)")
    return max(lists, key=len)


def freeze(model: nn.Module, train_last: int = 1, train_head: bool = False) -> int:
    """Layer freezing: freezes every parameter, then unfreezes the float parameters (norms,
    biases, unquantized linears, adapters) of the last `train_last` blocks (and with
    `train_head` the final norm and output layer). Quantized weights are never trainable.
    Returns the number of trainable elements."""
    _check_model(model)
    if isinstance(train_last, bool) or not isinstance(train_last, int) or train_last < 0:
        raise ValueError(f"train_last must be a non-negative int, got {train_last!r}")
    blocks = _blocks(model)
    if train_last > len(blocks):
        raise ValueError(f"train_last={train_last} exceeds the model's {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - train_last:]:
        for p in block.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    if train_head:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None:
            for p in out.parameters():
                p.requires_grad_(p.is_floating_point())
        for name, mod in model.named_modules():
            if name.endswith("norm") and not any(mod is m for b in blocks for m in b.modules()):
                for p in mod.parameters():
                    p.requires_grad_(True)
    n = trainable_parameters(model)
    if n == 0:
        raise ValueError("no float parameters in the selected blocks to train (all quantized?): add adapters "
                         "(qengine.add_lora / add_adapters) or raise train_last")
    return n


class Adapter(nn.Module):
    """Houlsby bottleneck adapter ``h + up(act(down(h)))`` (down: d -> bottleneck, up:
    bottleneck -> d, up starts at zero so the model starts unchanged)."""

    def __init__(self, dim: int, bottleneck: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, dim, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = nn.GELU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: float [..., dim] -> same shape and dtype."""
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class _WithAdapter(nn.Module):
    """Runs a block, then the adapter on its output (the first element when it returns a tuple)."""

    def __init__(self, block: nn.Module, adapter: Adapter):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]),) + tuple(out[1:])
        return self.adapter(out)


def _dim(module: nn.Module) -> Optional[int]:
    """The output width of an attention / MLP block: its last linear's out_features."""
    last = None
    for m in module.modules():
        if isinstance(m, (nn.Linear, QuantLinear, LoRALinear)):
            last = m
    return None if last is None else last.out_features


def add_adapters(model: nn.Module, bottleneck: int = 64, attention: str = "self_attn", mlp: str = "mlp",
                 freeze_base: bool = True) -> list[str]:
    """Adds a Houlsby bottleneck adapter after every attention and MLP block (children named
    `attention` / `mlp` of each transformer block), in place; with freeze_base only the
    adapters stay trainable. Returns the names of the wrapped blocks."""
    _check_model(model)
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
    targets = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in (attention, mlp)
               and not isinstance(m, _WithAdapter) and _dim(m) is not None]
    if not targets:
        raise ValueError(f"no submodule named {attention!r} or {mlp!r} with linear layers: pass the block names")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if ref is None else ref.dtype
    for name in targets:
        path, _, attr = name.rpartition(".")
        parent = model.get_submodule(path) if path else model
        block = getattr(parent, attr)
        dim = _dim(block)
        if bottleneck > dim:
            raise ValueError(f"bottleneck={bottleneck} exceeds the width {dim} of {name}")
        device = next((t.device for t in block.parameters()), None)
        setattr(parent, attr, _WithAdapter(block, Adapter(dim, bottleneck, dtype=dtype, device=device)))
    return targets
