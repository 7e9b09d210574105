"""gpt-oss checkpoints with MXFP4 experts (transformers' ``quantization_config.quant_method ==
"mxfp4"``): each expert matrix is stored as ``<name>_blocks`` (uint8 [E, N, K/32, 16], two E2M1
codes a byte, the first element in the low nibble) and ``<name>_scales`` (uint8 [E, N, K/32],
E8M0 exponents, 2**(s - 127)), N the output and K the input dimension. They load into
qengine's ``mxfp4`` experts as they are: the codes have their nibbles swapped (qengine keeps the
first element in the high nibble), the scale bytes are qengine's E8M0 scale codes unchanged, so
the decode is transformers' ``convert_moe_packed_tensors`` bit for bit (in float32), with no
float copy of any expert weight. Scale byte 255 (NaN in OCP MX) has no value and is refused."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..formats import get_format
from ..microscaling import tensor_scale_blocksize
from ..moe import IMPLEMENTATION, experts_layout, register_experts_implementation
from ..nn.experts import QuantExpertsWeight
from ..tensor import NestedScales, QuantizedTensor

__all__ = ["MXFP4_METHOD", "is_mxfp4_config", "mxfp4_experts_weight", "load_mxfp4_experts"]

MXFP4_METHOD = "mxfp4"  # transformers' quant_method of gpt-oss's checkpoints
_BLOCK = 32


def is_mxfp4_config(qc) -> bool:
    """True for transformers' MXFP4 quantization config (a dict or a config object)."""
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == MXFP4_METHOD


def mxfp4_experts_weight(blocks: torch.Tensor, scales: torch.Tensor, name: str = "experts") -> QuantExpertsWeight:
    """QuantExpertsWeight (mxfp4) of transformers' packed experts: blocks uint8 [E, N, G, 16],
    scales uint8 [E, N, G] (K = 32 G). Integer operations only; the codes are one new uint8
    tensor of the blocks' size, the scale codes the scales' bytes."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != _BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"{name}: MXFP4 blocks must be [E, N, K/32, 16] and scales [E, N, K/32], got "
                         f"{tuple(blocks.shape)} and {tuple(scales.shape)}")
    E, N, G, _ = blocks.shape
    if E == 0 or N == 0 or G == 0:
        raise ValueError(f"{name}: empty MXFP4 experts {tuple(blocks.shape)}")
    codes = scales.reshape(-1).contiguous()
    if bool((codes == 255).any()):
        raise ValueError(f"{name}: E8M0 scale byte 255 (NaN in OCP MX) has no value; the checkpoint is corrupt")
    b = blocks.reshape(-1)
    packed = ((b >> 4) | (b << 4)).contiguous()  # uint8: the low nibble (first element) goes high
    fmt = get_format("mxfp4")
    nblocks = codes.numel()
    absmax = torch.ones(1, dtype=torch.float32, device=blocks.device)
    inner = QuantizedTensor(codes, absmax, None, get_format(fmt.scale_format), torch.Size([nblocks]), torch.float32,
                            tensor_scale_blocksize(nblocks))
    nested = NestedScales(inner, torch.zeros((), dtype=torch.float32, device=blocks.device))
    q = QuantizedTensor(packed, nested, None, fmt, torch.Size([E * N, G * _BLOCK]), torch.float32, _BLOCK)
    w = QuantExpertsWeight.from_quantized(q)
    w.num_experts, w.expert_out_features = E, N
    return w


def load_mxfp4_experts(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> nn.Module:
    """Fills `model` (built from the config, parameters possibly on the meta device) from a
    gpt-oss MXFP4 checkpoint's tensors: every ``*_blocks`` / ``*_scales`` pair becomes the
    mxfp4 QuantExpertsWeight of its experts module (run by the grouped kernel with gpt-oss's
    gate), the other tensors load as they are. Returns the model in eval mode."""
    state, packed = {}, {}
    for key, t in tensors:
        for suffix in ("_blocks", "_scales"):
            if key.endswith(suffix):
                packed.setdefault(key[:-len(suffix)], {})[suffix] = t
                break
        else:
            state[key] = t
    experts = set()
    for key, parts in packed.items():
        if len(parts) != 2:
            raise ValueError(f"{key}: MXFP4 needs both {key}_blocks and {key}_scales")
        mod_name, attr = key.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        if attr not in ("gate_up_proj", "down_proj") or not hasattr(mod, "is_transposed"):
            raise ValueError(f"{key}: MXFP4 tensors are supported for experts' gate_up_proj / down_proj only")
        w = mxfp4_experts_weight(parts["_blocks"], parts["_scales"], key)
        old = getattr(mod, attr)
        E, a, b = old.shape
        want = (E, b, a) if mod.is_transposed else (E, a, b)
        if (w.num_experts, w.expert_out_features, w.in_features) != want:
            raise ValueError(f"{key}: MXFP4 experts are [{w.num_experts}, {w.expert_out_features}, {w.in_features}] "
                             f"(experts, out, in); the model expects {list(want)}")
        delattr(mod, attr)
        setattr(mod, attr, w)
        experts.add(mod)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    placed = tuple(f"{key}." for key in packed)  # the QuantExpertsWeight states just built
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight")) and not k.startswith(placed)]
    if missing or unexpected:
        raise ValueError(f"gpt-oss MXFP4 checkpoint does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    register_experts_implementation()
    for mod in experts:
        mod._qengine_moe = experts_layout(mod)
    model.config._experts_implementation = IMPLEMENTATION
    for mod in model.modules():  # rotary buffers etc. were built for real; any meta parameter left is an error
        for pname, p in mod.named_parameters(recurse=False):
            if p.device.type == "meta":
                raise ValueError(f"gpt-oss MXFP4 checkpoint has no tensor for {pname} of {type(mod).__name__}")
    return model.eval()
