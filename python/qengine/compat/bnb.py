"""The bitsandbytes 4-bit layout of whole models: bnb_model_state_dict exports every QuantLinear
in it (the keys transformers writes for a bitsandbytes 4-bit model), load_bnb_model_state_dict
loads one into a float model, turning each nn.Linear that the state dict holds quantized into a
QuantLinear. One tensor's entries (to_bnb_state_dict / from_bnb_state_dict, re-exported here)
are qengine._bnb_layout's, which lists them.
"""

from __future__ import annotations

import torch

from .._bnb_layout import from_bnb_state_dict, to_bnb_state_dict
from ..nn import QuantLinear

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict", "bnb_model_state_dict", "load_bnb_model_state_dict"]


def bnb_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every QuantLinear's entries in the bitsandbytes layout."""
    sd = model.state_dict()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            prefix = name + "." if name else ""
            for key in [k for k in sd if k.startswith(prefix + "weight.") or k == prefix + "bias"]:
                del sd[key]
            sd.update(mod.to_bnb_state_dict(prefix))
    return sd


def load_bnb_model_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], strict: bool = True,
                              compute_dtype: torch.dtype | None = None):
    """Loads a transformers + bitsandbytes 4-bit state dict into `model` (in place): each
    nn.Linear whose weight `sd` holds in the bitsandbytes 4-bit layout becomes a QuantLinear
    built from those bytes (no re-quantization), then the remaining entries load as usual.
    Returns load_state_dict's (missing_keys, unexpected_keys)."""
    if not isinstance(sd, dict):
        raise TypeError(f"sd must be a dict of tensors, got {type(sd).__name__}")
    quantized = {k.split(".weight.quant_state.bitsandbytes__")[0] for k in sd if ".weight.quant_state.bitsandbytes__" in k}
    quantized |= {""} if any(k.startswith("weight.quant_state.bitsandbytes__") for k in sd) else set()
    for name in sorted(quantized):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"state dict holds a 4-bit weight for {name!r}, which this model lacks") from None
        if isinstance(mod, QuantLinear):
            continue
        if not isinstance(mod, torch.nn.Linear):
            raise ValueError(f"state dict holds a 4-bit weight for {name!r}, which is a {type(mod).__name__}, "
                             "not an nn.Linear")
        if not name:
            raise TypeError("model is itself an nn.Linear: use QuantLinear and load_state_dict")
        prefix = name + "."
        q = from_bnb_state_dict(sd, prefix + "weight")
        if tuple(q.shape) != (mod.out_features, mod.in_features):
            raise ValueError(f"{prefix}weight has shape {tuple(q.shape)}, the model's layer is "
                             f"({mod.out_features}, {mod.in_features})")
        layer = QuantLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, format=q.format,
                            blocksize=None if q.per_row else q.blocksize, double_quant=q.double_quant,
                            compute_dtype=compute_dtype, device=mod.weight.device,
                            dtype=mod.bias.dtype if mod.bias is not None else torch.float32)
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path) if path else model, attr, layer)
    return model.load_state_dict(sd, strict=strict)
