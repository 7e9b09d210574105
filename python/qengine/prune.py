"""Pruning: magnitude (or Wanda-style activation-weighted) masks for weights and models.

    >>> pruned, mask = qengine.prune(w, sparsity=0.5, pattern="2:4")     # w is not modified
    >>> q = qengine.quantize(pruned, "nf4", 64, sparsity="2:4", mask=mask)
    >>> norms = qengine.collect_input_norms(model, batches)   # optional, Wanda
    >>> masks = qengine.prune(model, 0.5, "unstructured", input_norms=norms)  # in place

Scores: |w| by default; with input norms (the L2 norm of each input feature over calibration
tokens) |w[o, i]| * norm[i], the Wanda score; or any tensor of scores given directly. Higher
scores are kept. Ties are broken deterministically: the lower index is kept.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ._checks import check_float, check_tensor

__all__ = ["prune", "collect_input_norms", "PATTERNS"]

PATTERNS = ("unstructured", "2:4", "row")


def _check_sparsity(sparsity: object, pattern: str) -> float:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern == "2:4" and sparsity != 0.5:
        raise ValueError(f"pattern '2:4' keeps 2 of every 4 weights: sparsity must be 0.5, got {sparsity}")
    return float(sparsity)


def _scores(w: torch.Tensor, scores: Optional[torch.Tensor], input_norms: Optional[torch.Tensor]) -> torch.Tensor:
    if scores is not None and input_norms is not None:
        raise ValueError("give scores or input_norms, not both")
    if scores is not None:
        check_tensor("scores", scores)
        if scores.shape != w.shape:
            raise ValueError(f"scores must have the weight's shape {tuple(w.shape)}, got {tuple(scores.shape)}")
        s = scores.detach().to(torch.float64)
    else:
        s = w.detach().abs().to(torch.float64)
        if input_norms is not None:
            check_tensor("input_norms", input_norms)
            if w.dim() < 1 or input_norms.shape != (w.shape[-1],):
                raise ValueError(f"input_norms must have shape ({w.shape[-1] if w.dim() else 1},) (one per input "
                                 f"feature), got {tuple(input_norms.shape)}")
            s = s * input_norms.detach().to(device=w.device, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN or Inf (non-finite weights, norms or scores)")
    return s


def _mask_of(s: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Bool mask (True = kept) of the scores s for the pattern."""
    if pattern == "2:4":
        if s.dim() < 1 or s.shape[-1] % 4:
            raise ValueError(f"pattern '2:4' needs the last dimension (in_features) divisible by 4, got shape "
                             f"{tuple(s.shape)}")
        g = s.reshape(-1, 4)
        keep = torch.argsort(-g, dim=1, stable=True)[:, :2]
        return torch.zeros_like(g, dtype=torch.bool).scatter_(1, keep, True).reshape(s.shape)
    if pattern == "row":
        if s.dim() < 2:
            raise ValueError(f"pattern 'row' prunes rows (output features) of a 2-D or larger weight, got shape "
                             f"{tuple(s.shape)}")
        rows = s.reshape(s.shape[0], -1).pow(2).sum(1)
        drop = torch.argsort(rows, stable=True)[: int(round(sparsity * s.shape[0]))]
        keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        keep[drop] = False
        return keep.reshape(-1, *([1] * (s.dim() - 1))).expand(s.shape).contiguous()
    flat = s.reshape(-1)
    drop = torch.argsort(flat, stable=True)[: int(round(sparsity * flat.numel()))]
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[drop] = False
    return keep.reshape(s.shape)


def prune(target, sparsity: float = 0.5, pattern: str = "unstructured", scores=None, input_norms=None,
          skip: Sequence[str] = ()):
    """Prunes a weight tensor or every nn.Linear of a model.

    Args:
        target: a float tensor (a weight [out_features, in_features], or any shape), or an
            nn.Module whose nn.Linear weights are pruned.
        sparsity: fraction pruned, in [0, 1). "unstructured": the round(sparsity * numel)
            lowest-scored elements of each weight; "row": the round(sparsity * out_features)
            rows (output features) with the lowest score norm; "2:4": 2 of every 4 consecutive
            weights along the last dimension (sparsity must be 0.5).
        scores: None (|w|), or a tensor of the weight's shape (tensor target) or a dict
            {module name: tensor} (model), higher = kept.
        input_norms: Wanda-style scores |w| * norm[in_feature]: a tensor [in_features]
            (tensor target) or the dict of collect_input_norms (model).
        skip: module names (or fnmatch patterns, e.g. "lm_head" or "*.gate") left unpruned.
    Returns:
        tensor target: (pruned weight, bool mask of its shape); a new tensor, the input is
            never modified. Model target: {module name: bool mask}; each pruned weight is
            zeroed *in place* where its mask is False (masks are not re-applied later: a
            frozen base with LoRA keeps them; full fine-tuning would need them re-applied).
    """
    sparsity = _check_sparsity(sparsity, pattern)
    if isinstance(target, nn.Module):
        return _prune_model(target, sparsity, pattern, scores, input_norms, skip)
    check_float("weight", target)
    mask = _mask_of(_scores(target, scores, input_norms), sparsity, pattern)
    pruned = torch.where(mask, target.detach(), torch.zeros((), dtype=target.dtype, device=target.device))
    return pruned, mask


def is_skipped(name: str, skip: Sequence[str]) -> bool:
    """Whether module `name` is one of `skip` (a module, its children, or an fnmatch pattern)."""
    return any(name == s or name.startswith(s + ".") or fnmatch.fnmatchcase(name, s) for s in skip)


def _linear_layers(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    if isinstance(skip, str):
        raise TypeError("skip must be a list of module names or patterns, not a string")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_skipped(n, skip)]


def _prune_model(model, sparsity, pattern, scores, input_norms, skip) -> dict[str, torch.Tensor]:
    for name, arg in (("scores", scores), ("input_norms", input_norms)):
        if arg is not None and not isinstance(arg, dict):
            raise TypeError(f"{name} for a model must be a dict {{module name: tensor}}, got {type(arg).__name__}")
    layers = _linear_layers(model, skip)
    masks = {}
    for name, layer in layers:  # masks first: a bad argument leaves the model untouched
        s = _scores(layer.weight, (scores or {}).get(name), (input_norms or {}).get(name))
        masks[name] = _mask_of(s, sparsity, pattern)
    with torch.no_grad():
        for name, layer in layers:
            layer.weight.masked_fill_(~masks[name], 0.0)
    return masks


def collect_input_norms(model: nn.Module, batches: Iterable, skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The L2 norm over all calibration tokens of each input feature of every nn.Linear:
    {module name: float32 [in_features]} (Wanda's activation statistic). Runs model(batch)
    for each batch (a tensor, a tuple of positional arguments or a dict of keyword arguments)
    under torch.no_grad, with forward hooks removed afterwards."""
    layers = _linear_layers(model, skip)
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            sums[name] += x.reshape(-1, x.shape[-1]).to(torch.float64).pow(2).sum(0).to(sums[name].device)
        return fn

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt().to(torch.float32) for name, s in sums.items()}
