"""The hyperparameters of a paged AdamW param group, validated: what the optimizer checks at
construction and every step, and what loading a state dict checks of the saved groups."""

from __future__ import annotations

import math

import torch

# Keys of a torch.optim.AdamW param group that select an implementation, not the maths: only
# their default values are accepted (an accepted-and-ignored option would be a silent bug).
_IMPL_KEYS = {"foreach": (None, False), "fused": (None, False), "capturable": (False,), "differentiable": (False,)}


def _number(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_group(group: dict) -> tuple[float, float, float, float, float, bool]:
    """(lr, beta1, beta2, eps, weight_decay, maximize) of a param group, validated."""
    for key in ("lr", "betas", "eps", "weight_decay"):
        if key not in group:
            raise ValueError(f"param group lacks {key!r} (is this an AdamW param group?)")
    lr = _number("lr", group["lr"])
    if lr < 0:
        raise ValueError(f"Invalid learning rate: lr must be >= 0, got {lr}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1, b2 = _number("betas[0]", betas[0]), _number("betas[1]", betas[1])
    for i, b in enumerate((b1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: must be in [0, 1), got {b}")
    eps = _number("eps", group["eps"])
    if eps < 0:
        raise ValueError(f"Invalid epsilon value: eps must be >= 0, got {eps}")
    wd = _number("weight_decay", group["weight_decay"])
    if wd < 0:
        raise ValueError(f"Invalid weight_decay value: must be >= 0, got {wd}")
    if group.get("amsgrad", False):
        raise ValueError("amsgrad=True is not supported by qengine's paged AdamW (it needs a third state)")
    if group.get("decoupled_weight_decay", True) is False:
        raise ValueError("decoupled_weight_decay=False is Adam, not AdamW; qengine implements AdamW only")
    for key, allowed in _IMPL_KEYS.items():
        if key in group and group[key] not in allowed:
            raise ValueError(f"{key}={group[key]!r} is not supported (qengine always runs its own fused kernel)")
    maximize = group.get("maximize", False)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    return lr, b1, b2, eps, wd, maximize
