"""Mixture-of-Experts models: finds the experts modules of a transformers model (3-D expert
parameters, marked by transformers' experts-implementation decorator), quantizes their weights
in place (QuantExpertsWeight), and registers "qengine" in transformers' ExpertsInterface, so the
unchanged model code dispatches its experts to qengine::moe_experts (forward and generate)."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .ops import ACTIVATIONS, GATE_CONCATENATED, GATE_INTERLEAVED, NO_GATE
from .ops.moe import SWIGLU_ALPHA, SWIGLU_LIMIT, SWIGLU_OAI
from .formats import Format
from .nn.experts import LoRAExperts, QuantExpertsWeight, experts_forward

__all__ = ["IMPLEMENTATION", "expert_weight_names", "is_float_expert_weight", "is_experts_module", "experts_layout", "quantize_experts", "register_experts_implementation"]

log = logging.getLogger("qengine")
IMPLEMENTATION = "qengine"  # the name under which transformers dispatches to qengine::moe_experts
# Flags transformers' use_experts_implementation records on every experts module.
_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def expert_weight_names(mod: nn.Module) -> tuple[str, str]:
    """The attributes holding a transformers experts module's two expert matrices."""
    return ("gate_up_proj" if mod.has_gate else "up_proj"), "down_proj"


def is_float_expert_weight(mod: nn.Module, attr: str) -> bool:
    """True when `attr` of `mod` is one of its expert matrices, still a float 3-D tensor (a
    checkpoint loader swaps these one at a time, so the other may already be replaced)."""
    return (all(hasattr(mod, f) for f in _FLAGS) and attr in expert_weight_names(mod)
            and isinstance(getattr(mod, attr, None), torch.Tensor) and getattr(mod, attr).dim() == 3)


def is_experts_module(mod: nn.Module) -> bool:
    """True for a transformers experts module: the decorator's layout flags plus 3-D weights
    (still float, or already quantized by qengine)."""
    if not all(hasattr(mod, f) for f in _FLAGS):
        return False
    return all(is_float_expert_weight(mod, a) or isinstance(getattr(mod, a, None), (QuantExpertsWeight, LoRAExperts))
               for a in expert_weight_names(mod))


def _activation(mod: nn.Module) -> str:
    name = getattr(getattr(mod, "config", None), "hidden_act", None)
    if isinstance(name, str) and name in ACTIVATIONS:
        return name
    act = getattr(mod, "act_fn", None)
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    raise ValueError(f"experts activation {name or type(act).__name__!r} is not supported by the grouped kernel "
                     f"(supported: {sorted(ACTIVATIONS)})")


def _gpt_oss_gate():
    """transformers' GptOssExperts._apply_gate (the clamped swiglu the grouped kernel runs as
    activation swiglu_oai), or None when this transformers has no gpt-oss."""
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:
        return None
    return GptOssExperts._apply_gate


def experts_layout(mod: nn.Module) -> tuple[int, int]:
    """(gate layout code, activation code) of a transformers experts module, or ValueError
    naming the first layout flag the grouped kernel does not support."""
    if getattr(mod, "has_post_expert_norm", False):
        raise ValueError(f"{type(mod).__name__} normalises each expert's output (has_post_expert_norm=True), which "
                         "the grouped kernel does not support")
    from transformers.integrations.moe import _default_apply_gate  # present whenever such a module exists

    gate_fn = getattr(type(mod), "_apply_gate", _default_apply_gate)
    if mod.has_gate and gate_fn is not _default_apply_gate and gate_fn is _gpt_oss_gate():
        if mod.is_concatenated:
            raise ValueError(f"{type(mod).__name__}: gpt-oss's gate takes interleaved gate/up columns")
        if (float(mod.alpha), float(mod.limit)) != (SWIGLU_ALPHA, SWIGLU_LIMIT):
            raise ValueError(f"{type(mod).__name__} has its own gate function (_apply_gate) with swiglu alpha="
                             f"{mod.alpha}, limit={mod.limit}; the grouped kernel runs gpt-oss's gate with alpha="
                             f"{SWIGLU_ALPHA}, limit={SWIGLU_LIMIT} only")
        return GATE_INTERLEAVED, SWIGLU_OAI
    if mod.has_gate and gate_fn is not _default_apply_gate:
        raise ValueError(f"{type(mod).__name__} has its own gate function (_apply_gate), which the grouped kernel "
                         "does not support (it computes act(gate) * up)")
    act = ACTIVATIONS[_activation(mod)]
    if not mod.has_gate:
        return NO_GATE, act
    return (GATE_CONCATENATED if mod.is_concatenated else GATE_INTERLEAVED), act


def quantize_experts(mod: nn.Module, format: str | Format = "nf4", blocksize: Optional[int] = 64,
                     double_quant: bool = True) -> nn.Module:
    """Quantizes the expert weights of a transformers experts module in place: its 3-D
    parameters become QuantExpertsWeight submodules of the same names (stored [E, out, in];
    transposed layouts are transposed once here), biases stay float parameters, and the
    module's experts implementation is set to "qengine". Returns the module."""
    if not is_experts_module(mod):
        raise TypeError(f"{type(mod).__name__} is not a transformers experts module (3-D gate_up_proj/up_proj and "
                        "down_proj parameters with the experts-implementation layout flags)")
    layout = experts_layout(mod)
    register_experts_implementation()
    for attr in expert_weight_names(mod):
        w = getattr(mod, attr)
        if isinstance(w, (QuantExpertsWeight, LoRAExperts)):
            continue
        q = QuantExpertsWeight.from_weight(w, format, blocksize, double_quant, transposed=bool(mod.is_transposed))
        delattr(mod, attr)
        setattr(mod, attr, q)  # the float parameter has no reference left here and is freed
    mod._qengine_moe = layout
    if hasattr(mod, "config"):
        mod.config._experts_implementation = IMPLEMENTATION
    return mod


def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """transformers' experts call for the "qengine" implementation: the grouped kernel for
    quantized experts; experts left in float (skipped) run the model's own eager loop."""
    if getattr(self, "_qengine_moe", None) is not None:
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Registers "qengine" in transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, _forward)
