"""Writes a transformers Llama model (float, qengine-quantized, with or without LoRA adapters)
as a GGUF file through the gguf package: LoRA merged in float into the dequantized base, then
each 2-D weight quantized by gguf.quants.quantize (so the bytes are the reference quantizer's;
K-quants, which gguf cannot quantize, by qengine's own search in kquants.py) and written with
GGUFWriter, the metadata through transformers' GGUF_CONFIG_MAPPING reversed."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from ...nn import QuantEmbedding, QuantLinear
from ...nn.lora import LoRALinear
from ..checkpoint import build_model
from .kquants import KQUANT_TYPES, quantize_k
from .load import qk_row_index, require_gguf

__all__ = ["EXPORT_TYPES", "export_gguf"]

log = logging.getLogger("qengine")
# --type -> GGML type: those gguf.quants.quantize implements (no K-quant, IQ4_NL or NVFP4 quantizer
# there), and the K-quants, quantized by qengine's kquants.quantize_k (gguf only dequantizes them).
EXPORT_TYPES = ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "mxfp4", "bf16", "f16", "f32")
ARCHITECTURES = ("llama",)


def _unwrap(model: nn.Module) -> nn.Module:
    base = getattr(model, "get_base_model", None)  # a PEFT PeftModel
    return base() if callable(base) else model


def _dense(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """(float32 weight, had an adapter) of a linear: LoRA merged in float into the dequantized base."""
    if isinstance(module, LoRALinear):
        return module.merged_linear(torch.float32).weight.detach(), True
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return module.dequantize(torch.float32), False
    if hasattr(module, "base_layer") and hasattr(module, "merge"):  # a PEFT LoRA layer
        raise ValueError("export a PEFT-wrapped model after merging it (model.merge_and_unload()), or use "
                         "qengine.add_lora adapters, which export merges itself")
    return module.weight.detach().to(torch.float32), False


def _metadata(writer, config, arch: str) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    rope = getattr(config, "rope_parameters", None) or {}
    for key, attr in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(config, attr, None) if attr else None
        if attr == "rope_theta" and value is None:
            value = rope.get("rope_theta")
        if value is None:
            continue
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", int(value))


def export_gguf(model: nn.Module, path: str | os.PathLike, type: str = "q4_0") -> dict:
    """Writes `model` (a transformers Llama, float or qengine-quantized, with qengine LoRA
    adapters merged first) to the GGUF file `path`. 2-D weights are written as `type` (see
    EXPORT_TYPES), 1-D ones (norms) as F32; a weight whose row length is not a multiple of the
    type's block size (K-quants: 256) is written F16. Returns {"tensors": count, "type": type,
    "merged": {module: relative error ||W - dequantize(quantize(W))|| / ||W|| of each merged weight}}."""
    gguf = require_gguf()
    type = str(type).lower()
    if type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; export writes {', '.join(EXPORT_TYPES)} (no IQ4_NL, NVFP4 "
                         "or other K-quant quantizer)")
    qtype = gguf.GGMLQuantizationType[type.upper()]
    model = _unwrap(model)
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, got {arch!r}")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    names = {hf: g for g, hf in get_gguf_hf_weights_map(build_model(config, empty=True),
                                                        LlamaTensorProcessor(config.to_dict())).items()}
    modules = dict(model.named_modules())
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    _metadata(writer, config, arch)
    file_type = gguf.LlamaFileType.ALL_F32 if type == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{type.upper()}",
                                                                            None)
    if file_type is not None:  # llama.cpp names none for all-MXFP4, all-Q4_K or all-Q5_K (only _S / _M mixes)
        writer.add_file_type(int(file_type))
    merged, count = {}, 0
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, gguf_name in names.items():
        if tied and gguf_name == "output.weight":
            continue
        mod_name, attr = hf_name.rsplit(".", 1)
        module = modules.get(mod_name)
        if module is None:
            raise ValueError(f"the model has no {mod_name!r} (expected by the {arch} GGUF layout)")
        if attr == "weight" and isinstance(module, (nn.Linear, QuantLinear, LoRALinear, QuantEmbedding)):
            w, adapted = _dense(module)
        else:
            w, adapted = getattr(module, attr).detach().to(torch.float32), False
        index = qk_row_index(config, gguf_name, w.shape[0]) if w.dim() == 2 else None
        if index is not None:  # llama.cpp's row order: the inverse of the load-time permutation
            w = w[torch.argsort(index)]
        data = w.contiguous().numpy()
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if w.dim() == 1:
            writer.add_tensor(gguf_name, data)
        elif w.shape[-1] % block:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            try:
                q = quantize_k(w, type) if type in KQUANT_TYPES else gguf.quants.quantize(data, qtype)
            except ValueError as e:  # a non-finite or fp16-overflowing weight: name the tensor
                raise ValueError(f"{gguf_name}: {e}") from None
            writer.add_tensor(gguf_name, q, raw_dtype=None if type in ("f32", "f16") else qtype)
            if adapted:
                back = torch.from_numpy(np.asarray(gguf.quants.dequantize(q, qtype))).reshape(w.shape)
                merged[mod_name] = float((back - w).norm() / w.norm().clamp_min(1e-30))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for name, err in merged.items():
        log.info("qengine: %s: LoRA merged, re-quantized to %s, relative error %.4g", name, type, err)
    return {"tensors": count, "type": type, "merged": merged}
