"""Which modules of a model the whole-model helpers act on: name matching against user
patterns, and the nn.Linear / experts modules quantize_model converts. Shared by
qengine.model, qengine.adapters, qengine.loftq, the CLI and the transformers integration."""

from __future__ import annotations

import logging
from typing import Iterable

from torch import nn

from .moe import is_experts_module

log = logging.getLogger("qengine")


def matches(name: str, patterns: Iterable[str]) -> bool:
    """A module name matches a pattern equal to it, to its last component, or to a prefix of
    whole components ("model.layers.0" matches everything under that block)."""
    last = name.rsplit(".", 1)[-1]
    return any(name == p or last == p or name.startswith(p + ".") for p in patterns)


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def linear_targets(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the nn.Linear layers quantize_model converts (names only: holding the modules
    here would keep their float weights alive during the conversion)."""
    owners: dict[int, set[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mname)
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            if not name:
                return []
            skip.append(name)
            log.info("qengine: %s is nn.MultiheadAttention (reads its projections' weights directly): kept in "
                     "float", name)
        if not isinstance(mod, nn.Linear) or matches(name, skip):
            continue
        if not name:
            raise TypeError("model is itself an nn.Linear: use QuantLinear.from_linear")
        sharers = owners[id(mod.weight)] - {name}
        if sharers:
            log.warning("qengine: %s.weight is shared with %s (tied weights): kept in float", name,
                        ", ".join(sorted(sharers)))
            continue
        names.append(name)
    experts = {n for n, m in model.named_modules() if n and is_experts_module(m)}
    for pname, p in model.named_parameters():
        if p.dim() >= 3 and pname.rsplit(".", 1)[0] not in experts:
            log.warning("qengine: %s is a %d-D parameter outside a transformers experts module: kept in float",
                        pname, p.dim())
    return names


def experts_targets(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the transformers experts modules (3-D expert weights) quantize_model converts."""
    return [name for name, mod in model.named_modules()
            if name and is_experts_module(mod) and not matches(name, skip)
            and getattr(mod, "_qengine_moe", None) is None]
