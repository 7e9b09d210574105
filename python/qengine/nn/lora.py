"""LoRALinear: a low-rank adapter over a frozen linear base (QuantLinear or nn.Linear), with the
side path fused into qengine's matmul for quantized bases, merge/unmerge for dense bases, and
adapter-only state dicts."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import FLOAT_DTYPES
from ..formats import Format
from .quant_linear import QuantLinear

__all__ = ["LoRALinear"]


class AdapterState:
    """The adapter-only state of a module holding ``lora_A`` and ``lora_B`` parameters
    (LoRALinear, LoRAExperts)."""

    def adapter_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Only the adapter: {prefix + "lora_A": A, prefix + "lora_B": B} (detached)."""
        return {prefix + "lora_A": self.lora_A.detach(), prefix + "lora_B": self.lora_B.detach()}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Copies A and B from `sd` (shapes must match this layer exactly)."""
        for name, p in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            key = prefix + name
            if key not in sd:
                raise ValueError(f"adapter state dict is missing {key!r}")
            t = sd[key]
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                raise ValueError(f"{key} has shape {tuple(getattr(t, 'shape', ()))}, this layer's {name} is "
                                 f"{tuple(p.shape)} (an adapter for a different model or rank?)")
            if not t.dtype.is_floating_point or not torch.isfinite(t).all():
                raise ValueError(f"{key} must be a finite float tensor")
            with torch.no_grad():
                p.copy_(t)


class LoRALinear(AdapterState, nn.Module):
    """``y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T``.

    Args:
        base: a QuantLinear or nn.Linear of shape [out_features, in_features]; frozen by
            add_lora / mark_only_lora_trainable, not here.
        r: rank, 1 <= r <= min(in_features, out_features).
        alpha: scale numerator (scale = alpha / r).
        dropout: probability applied to the adapter's input only (as in PEFT).
        dtype: of A [r, in] and B [out, r] (default: float32 for a quantized base, the base
            weight's dtype for nn.Linear).

    A starts Kaiming-uniform (as PEFT and the LoRA paper's code) and B at zero, so the wrapped
    layer starts identical to its base. With a QuantLinear base and no active dropout the side
    path runs inside the same qengine::matmul call (forward and backward); with active dropout
    the adapter sees a different x than the base, so it runs as two small matmuls beside it.
    """

    def __init__(self, base: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, (QuantLinear, nn.Linear)):
            raise TypeError(f"LoRALinear wraps a QuantLinear or nn.Linear, got {type(base).__name__}")
        in_f, out_f = base.in_features, base.out_features
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if r > min(in_f, out_f):
            raise ValueError(f"LoRA rank r={r} exceeds min(in_features, out_features) = {min(in_f, out_f)} of this "
                             f"[{out_f}, {in_f}] layer: the adapter would not be low-rank")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(base, QuantLinear):
            device = base.weight_packed.device
            default_dtype = torch.float32
        else:
            device = base.weight.device
            default_dtype = base.weight.dtype
        dtype = default_dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [..., in_features] -> [..., out_features] in x's dtype."""
        base = self.base_layer
        if self.merged:
            return base(x)
        if isinstance(base, QuantLinear) and not (self.training and self.dropout > 0):
            return base(x, lora=(self.lora_A, self.lora_B, self.scaling))
        y = base(x)
        return y + self._side(self.lora_dropout(x)).to(y.dtype)

    def _side(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update scale * B @ A, [out_features, in_features] in `dtype`."""
        return (self.lora_B.detach().to(torch.float32) @ self.lora_A.detach().to(torch.float32) * self.scaling).to(
            dtype)

    # ------------------------------------------------------------------ merging
    def merge(self) -> None:
        """Adds the update into a dense nn.Linear base (forward then skips the side path)."""
        self._check_dense_base("merge")
        if self.merged:
            raise ValueError("adapter is already merged")
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.to(torch.float32) + self.delta_weight()).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtracts the update again (exact up to the base dtype's rounding)."""
        self._check_dense_base("unmerge")
        if not self.merged:
            raise ValueError("adapter is not merged")
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.to(torch.float32) - self.delta_weight()).to(w.dtype))
        self.merged = False

    def _check_dense_base(self, what: str) -> None:
        if isinstance(self.base_layer, QuantLinear):
            raise TypeError(f"cannot {what} into a quantized base in place (re-quantizing would silently lose "
                            "quality): use merged_linear() for a dense layer, then merged_quantlinear() to "
                            "re-quantize explicitly")

    def merged_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A new dense nn.Linear with weight = dequantize(base) (or base.weight) + scale * B @ A,
        computed in float32 and returned in `dtype`; the bias is copied. This layer is unchanged."""
        base = self.base_layer
        if isinstance(base, QuantLinear):
            w = base.dequantize(torch.float32)
        else:
            w = base.weight.detach().to(torch.float32)
            if self.merged:
                w = w - self.delta_weight()
        w = w + self.delta_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, dtype=dtype,
                        device=w.device)
        with torch.no_grad():
            out.weight.copy_(w)
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def merged_quantlinear(self, format: Optional[str | Format] = None, blocksize: Optional[int] = -1,
                           double_quant: Optional[bool] = None) -> tuple[QuantLinear, dict]:
        """Re-quantizes the merged dense weight (an explicit, lossy step). Defaults: the base's
        format, block size and double quant (or nf4/64/True for a dense base). Returns the new
        QuantLinear and a report of its error against the merged dense weight:
        {"relative_error": ||Wq - W|| / ||W||, "max_abs_error": max |Wq - W|}."""
        base = self.base_layer
        quant = isinstance(base, QuantLinear)
        fmt = format if format is not None else (base.format if quant else "nf4")
        bs = blocksize if blocksize != -1 else ((None if base.per_row else base.blocksize) if quant else 64)
        dq = double_quant if double_quant is not None else (base.double_quant if quant else True)
        dense = self.merged_linear(torch.float32)
        layer = QuantLinear.from_linear(dense, fmt, bs, dq, compute_dtype=base.compute_dtype if quant else None)
        w = dense.weight.detach().to(torch.float64)
        err = layer.dequantize(torch.float32).to(torch.float64) - w
        report = {"relative_error": float(err.norm() / w.norm().clamp(min=1e-300)),
                  "max_abs_error": float(err.abs().max())}
        return layer, report

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, merged={self.merged}"
