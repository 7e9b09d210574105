"""Quantized Mixture-of-Experts weights: QuantExpertsWeight (E stacked [N, K] expert matrices
stored as one blockwise-quantized tensor), LoRAExperts (a per-expert low-rank adapter over
one), QuantExperts (a standalone experts layer) and experts_forward, the forward of any module
holding them (QuantExperts, or a transformers experts module converted by quantize_model), a
single qengine::moe_experts call."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from ..ops import ACTIVATIONS, GATE_CONCATENATED, GATE_INTERLEAVED, NO_GATE
from ..formats import Format, get_format
from ..functional import quantize
from .lora import AdapterState
from .quant_linear import QuantLinear

__all__ = ["QuantExpertsWeight", "LoRAExperts", "QuantExperts", "experts_forward"]


class QuantExpertsWeight(QuantLinear):
    """E expert weights [N, K] (out x in) stored as one quantized [E * N, K] tensor, blockwise
    along the input dimension; expert e is rows e*N .. e*N + N, and every expert starts on a
    block (the blocksize must divide N * K). Its state dict is QuantLinear's (under
    ``<name>.weight.``), so checkpoints, memory_report and device moves treat it like one.
    It is not called itself: the experts layer that owns it runs qengine::moe_experts."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, format: str | Format = "nf4",
                 blocksize: Optional[int] = 64, double_quant: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        check_expert_blocks(out_features, in_features, blocksize)
        super().__init__(in_features, num_experts * out_features, bias=False, format=format, blocksize=blocksize,
                         double_quant=double_quant, device=device, dtype=dtype)
        self.num_experts, self.expert_out_features = num_experts, out_features

    @classmethod
    def from_weight(cls, weight: torch.Tensor, format: str | Format = "nf4", blocksize: Optional[int] = 64,
                    double_quant: bool = True, transposed: bool = False) -> "QuantExpertsWeight":
        """Quantizes weight (float [E, N, K], or [E, K, N] with transposed=True, finite); the
        argument is not modified."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or not weight.dtype.is_floating_point:
            raise ValueError(f"expert weight must be a 3-D float tensor [experts, out, in], got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        w = weight.detach()
        if transposed:
            w = w.transpose(1, 2)
        E, N, K = w.shape
        if E == 0 or N == 0 or K == 0:
            raise ValueError(f"expert weight must be non-empty, got shape {tuple(weight.shape)}")
        check_expert_blocks(N, K, blocksize)
        bits = get_format(format).bits
        if (N * K * bits) % 8:  # the grouped kernel addresses each expert from a whole byte
            raise ValueError(f"one expert's {N}x{K} weight does not fill whole bytes at {bits} bits (use an 8-bit "
                             "format, or experts with an even number of elements)")
        q = quantize(w.reshape(E * N, K).contiguous(), format, blocksize, double_quant)
        self = cls.from_quantized(q)
        self.num_experts, self.expert_out_features = E, N
        return self

    def forward(self, *args, **kwargs):
        raise TypeError("QuantExpertsWeight holds expert weights; call the experts layer that owns it")

    def kernel_state(self) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """The [packed, table, scales (+ nested parts)] list and float32 offsets the op takes."""
        return self.kernel_weight().expert_state()

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weights [E, N, K]."""
        return super().dequantize(dtype).view(self.num_experts, self.expert_out_features, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_expert_blocks(self.expert_out_features, self.in_features, None if self.per_row else self.blocksize)

    def extra_repr(self) -> str:
        bs = "row" if self.per_row else self.blocksize
        return (f"num_experts={self.num_experts}, out_features={self.expert_out_features}, "
                f"in_features={self.in_features}, format={self.format.name}, blocksize={bs}, "
                f"double_quant={self.double_quant}, bytes={self.weight_nbytes}")


def check_expert_blocks(N: int, K: int, blocksize: Optional[int]) -> None:
    for name, v in (("out_features", N), ("in_features", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"expert {name} must be a positive int, got {v!r}")
    if blocksize is not None and (N * K) % blocksize:
        raise ValueError(f"blocksize {blocksize} does not divide one expert's {N}x{K} weight: every expert must "
                         "start on a block (use a smaller blocksize or None for per-row blocks)")


class LoRAExperts(AdapterState, nn.Module):
    """A per-expert low-rank adapter over a QuantExpertsWeight: expert e's weight acts as
    ``W_e + (alpha / r) * B_e @ A_e`` with A [E, r, K] (Kaiming-uniform per expert) and B
    [E, N, r] (zeros, so the layer starts equal to its base). The side path runs inside
    qengine::moe_experts, forward and backward."""

    def __init__(self, base: QuantExpertsWeight, r: int = 16, alpha: float = 32, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, QuantExpertsWeight):
            raise TypeError(f"LoRAExperts wraps a QuantExpertsWeight, got {type(base).__name__}")
        E, N, K = base.num_experts, base.expert_out_features, base.in_features
        if isinstance(r, bool) or not isinstance(r, int) or r < 1 or r > min(N, K):
            raise ValueError(f"LoRA rank r must be an int in [1, {min(N, K)}] for [{N}, {K}] experts, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        device = base.weight_packed.device
        self.base_layer = base
        self.num_experts, self.in_features, self.out_features = E, K, N
        self.r, self.alpha = r, float(alpha)
        self.lora_A = nn.Parameter(torch.empty(E, r, K, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(E, N, r, dtype=dtype, device=device))
        for e in range(E):
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def forward(self, *args, **kwargs):
        raise TypeError("LoRAExperts holds adapted expert weights; call the experts layer that owns it")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, alpha={self.alpha:g}"


def _parts(holder):
    """(QuantExpertsWeight, lora_A, lora_B, scaling) of a weight slot (plain or adapted)."""
    if isinstance(holder, LoRAExperts):
        return holder.base_layer, holder.lora_A, holder.lora_B, holder.scaling
    return holder, None, None, None


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H] (float), top_k_index [T, k] (int), top_k_weights [T, k] -> [T, H]
    in hidden_states' dtype, for a module with quantized experts: ``gate_up_proj`` (or
    ``up_proj`` without a gate) and ``down_proj`` (QuantExpertsWeight or LoRAExperts), optional
    ``*_bias`` [E, N] parameters, and ``_qengine_moe = (gate_layout, activation code)``."""
    gate_layout, act = module._qengine_moe
    up_holder = module.up_proj if gate_layout == NO_GATE else module.gate_up_proj
    up, ua, ub, s_up = _parts(up_holder)
    down, da, db, s_down = _parts(module.down_proj)
    if ua is not None and da is not None and s_up != s_down:
        raise ValueError(f"the adapters of one experts layer must share alpha / r, got {s_up} and {s_down}")
    scale = s_up if s_up is not None else (s_down if s_down is not None else 0.0)
    if hidden_states.dim() >= 1 and hidden_states.shape[-1] != up.in_features:
        raise ValueError(f"hidden_states has {hidden_states.shape[-1]} features, this experts layer takes "
                         f"{up.in_features} (shape {tuple(hidden_states.shape)})")
    up_state, up_off = up.kernel_state()
    down_state, down_off = down.kernel_state()
    up_bias = getattr(module, "gate_up_proj_bias" if gate_layout != NO_GATE else "up_proj_bias", None) \
        if getattr(module, "has_bias", False) else None
    down_bias = getattr(module, "down_proj_bias", None) if getattr(module, "has_bias", False) else None
    meta = [up.num_experts, down.in_features, up.format.bits, up.blocksize, down.format.bits, down.blocksize,
            gate_layout, act]
    return torch.ops.qengine.moe_experts(hidden_states, top_k_index, top_k_weights, up_state, down_state, up_off,
                                         down_off, up_bias, down_bias, ua, ub, da, db, float(scale), meta)


class QuantExperts(nn.Module):
    """A standalone quantized experts layer (the transformers layout, outside transformers):
    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H].

    Build it with from_weights(gate_up [E, 2I, H] (or up [E, I, H] with gate=False),
    down [E, H, I], activation="silu", interleaved=False, ...)."""

    def __init__(self, up: QuantExpertsWeight, down: QuantExpertsWeight, activation: str = "silu",
                 gate: bool = True, interleaved: bool = False, up_bias: Optional[torch.Tensor] = None,
                 down_bias: Optional[torch.Tensor] = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported by the grouped kernel "
                             f"(supported: {sorted(ACTIVATIONS)})")
        if interleaved and not gate:
            raise ValueError("interleaved gate/up needs gate=True")
        inter = down.in_features
        if up.num_experts != down.num_experts or up.in_features != down.expert_out_features or \
                up.expert_out_features != (2 * inter if gate else inter):
            raise ValueError(f"expert shapes do not fit: up [{up.num_experts}, {up.expert_out_features}, "
                             f"{up.in_features}], down [{down.num_experts}, {down.expert_out_features}, {inter}]")
        self.num_experts, self.hidden_dim, self.intermediate_dim = up.num_experts, up.in_features, inter
        self.has_gate, self.has_bias = gate, up_bias is not None or down_bias is not None
        setattr(self, "gate_up_proj" if gate else "up_proj", up)
        self.down_proj = down
        if self.has_bias:
            E = self.num_experts
            self.register_parameter("gate_up_proj_bias" if gate else "up_proj_bias", nn.Parameter(
                up_bias.detach().clone() if up_bias is not None else torch.zeros(E, up.expert_out_features)))
            self.down_proj_bias = nn.Parameter(down_bias.detach().clone() if down_bias is not None
                                               else torch.zeros(E, self.hidden_dim))
        layout = (GATE_INTERLEAVED if interleaved else GATE_CONCATENATED) if gate else NO_GATE
        self.activation = activation
        self._qengine_moe = (layout, ACTIVATIONS[activation])

    @classmethod
    def from_weights(cls, gate_up: torch.Tensor, down: torch.Tensor, activation: str = "silu", gate: bool = True,
                     interleaved: bool = False, transposed: bool = False, up_bias: Optional[torch.Tensor] = None,
                     down_bias: Optional[torch.Tensor] = None, format: str | Format = "nf4",
                     blocksize: Optional[int] = 64, double_quant: bool = True) -> "QuantExperts":
        up = QuantExpertsWeight.from_weight(gate_up, format, blocksize, double_quant, transposed)
        dn = QuantExpertsWeight.from_weight(down, format, blocksize, double_quant, transposed)
        return cls(up, dn, activation, gate, interleaved, up_bias, down_bias)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"activation={self.activation}, gate={self.has_gate}")
