"""LoftQ: quantize a float weight while fitting a rank-r adapter to what quantization loses,
so the quantized base plus the adapter starts closer to the float weight (add_lora(init="loftq"))."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ._targets import matches, parent_of
from .formats import Format
from .functional import quantize
from .nn import LoRALinear, QuantLinear

__all__ = ["loftq"]


class LoftQHolder(nn.Module):
    """Transient holder while add_lora(init="loftq") runs: the quantized base and its A, B."""

    def __init__(self, base: QuantLinear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base, self.lora_A, self.lora_B = base, a, b


def loftq(weight: torch.Tensor, r: int, scaling: float, format: str | Format = "nf4", blocksize: Optional[int] = 64,
          double_quant: bool = True, iters: int = 5):
    """LoftQ for one weight W (float [out, in]): returns (q, A [r, in], B [out, r]) with
    dequantize(q) + scaling * B @ A close to W, by alternating q = quantize(W - s*B@A) and
    s*B@A = the rank-r truncated SVD of W - dequantize(q) (computed in float32), `iters` times."""
    w = weight.detach().to(torch.float32)
    lowrank = torch.zeros_like(w)
    for _ in range(iters):
        q = quantize((w - lowrank).contiguous(), format, blocksize, double_quant)
        u, s, vh = torch.linalg.svd(w - q.dequantize(torch.float32), full_matrices=False)
        root = s[:r].sqrt() / math.sqrt(scaling)
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        lowrank = scaling * (b @ a)
    return q, a, b


def replace_with_loftq(model: nn.Module, candidates: Sequence[str], target_modules, r: int, alpha: float,
                       format, blocksize, double_quant, iters) -> None:
    """Replaces each float nn.Linear target among `candidates` (module names outside any
    adapter, as add_lora lists them) by a LoftQHolder, which add_lora then wraps."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = []
    for name in candidates:
        mod = model.get_submodule(name)
        hit = matches(name, target_modules) if target_modules is not None else not matches(name, ["lm_head"])
        if not hit:
            continue
        if isinstance(mod, (QuantLinear, LoRALinear)):
            raise ValueError(f"LoftQ needs the float weight, but {name} is already a {type(mod).__name__}: call "
                             "add_lora(init='loftq') on the unquantized model (it quantizes the targets itself)")
        if isinstance(mod, nn.Linear):
            names.append(name)
    if not names:
        raise ValueError(f"no float nn.Linear layer matches target_modules={target_modules!r} for LoftQ")
    for name in names:
        owner, attr = parent_of(model, name)
        lin = getattr(owner, attr)
        if r > min(lin.in_features, lin.out_features):
            raise ValueError(f"LoRA rank r={r} exceeds min(in_features, out_features) of {name}")
        q, a, b = loftq(lin.weight, r, alpha / r, format, blocksize, double_quant, iters)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        base = QuantLinear.from_quantized(q, bias)
        setattr(owner, attr, LoftQHolder(base, a, b))
