"""Loads a llama.cpp GGUF file into a transformers model with qengine QuantLinear layers: the
config from the file's metadata and the tensor names through transformers' own GGUF mapping,
each supported quantized tensor moved block for block into a QuantizedTensor (codec.py), one
tensor at a time read with plain file reads (not the reader's memory map, whose pages would
stay resident)."""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from ...formats import get_format
from ...nn import QuantEmbedding, QuantLinear
from ..checkpoint import build_model, require_transformers
from .codec import (EXACT_TYPES, FALLBACK_TYPES, FLOAT_TYPES, MICROSCALING_TYPES, decode_blocks, decode_read,
                    permute_rows, supported_types)

__all__ = ["require_gguf", "open_gguf", "gguf_config", "load_gguf", "qk_row_index", "ARCHITECTURES"]

log = logging.getLogger("qengine")
# Architectures whose GGUF tensors are the HF ones up to the name and (llama) q/k row order:
# transformers' plain TensorProcessor or its LlamaTensorProcessor. Others reshape, split or
# merge tensors (MoE experts, fused qkv) and are refused by name.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def require_gguf():
    try:
        import gguf
    except ImportError:
        from ..._version import install_hint
        raise ImportError(f"reading and writing GGUF files needs the gguf package: {install_hint('hf')} "
                          "(or pip install gguf)") from None
    return gguf


def open_gguf(path: str):
    """A GGUFReader of `path`, with one clear ValueError for a file that is not GGUF, truncated
    or corrupt (any tensor's data past the end of the file included)."""
    gguf = require_gguf()
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        raise ValueError(f"{path!r} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path!r} is truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, "
                             f"the file has {size}")
    return reader


def gguf_config(path: str):
    """The transformers config built from the file's metadata by transformers' own mapping."""
    transformers = require_transformers()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        cfg = dict(load_gguf_checkpoint(path, return_tensors=False)["config"])
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"cannot build a model config from {path!r}: {e}") from None
    model_type = cfg.pop("model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{path!r} holds a {model_type!r} model; qengine loads GGUF {', '.join(ARCHITECTURES)} "
                         "models (other architectures split or merge tensors)")
    return transformers.AutoConfig.for_model(model_type, **cfg)


def qk_row_index(config, name: str, rows: int) -> Optional[torch.Tensor]:
    """The row order that undoes llama.cpp's q/k permutation of GGUF tensor `name` (transformers'
    LlamaTensorProcessor applied to row numbers), or None for other tensors and architectures."""
    if getattr(config, "model_type", None) not in ("llama", "mistral") or not (".attn_q." in name or ".attn_k." in name):
        return None
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    index = LlamaTensorProcessor(heads).process(np.arange(rows), name).weights
    return torch.from_numpy(np.ascontiguousarray(index))


def _read(f, t, start: int = 0, n: Optional[int] = None) -> torch.Tensor:
    """Bytes start..start + n of tensor t (default: all of it), a plain file read."""
    buf = torch.empty(int(t.n_bytes) if n is None else n, dtype=torch.uint8)
    f.seek(int(t.data_offset) + start)
    if f.readinto(buf.numpy()) != buf.numel():
        raise ValueError(f"tensor {t.name!r}: the file ended early (truncated)")
    return buf


def _decode(f, t, type_name: str, shape: tuple[int, ...]):
    """The QuantizedTensor of an EXACT_TYPES tensor, read and decoded a chunk at a time (the
    tensor's whole bytes are never held beside its codes); a corrupt block names the tensor."""
    try:
        return decode_read(lambda start, n: _read(f, t, start, n), type_name, shape)
    except ValueError as e:
        raise ValueError(f"GGUF tensor {t.name!r}: {e}") from None


def _float(raw: torch.Tensor, type_name: str, shape: tuple[int, ...], gguf) -> torch.Tensor:
    if type_name in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[type_name]).reshape(shape)
    if type_name in EXACT_TYPES:
        return decode_blocks(raw, type_name, shape).dequantize(torch.float32)
    # gguf's numpy decoder makes several float32 temporaries of its input: a few rows at a time
    # (about 4 MiB of output each) keeps them small beside the output.
    qtype = gguf.GGMLQuantizationType[type_name]
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
    raw_rows = raw.numpy().reshape(rows, -1)
    out = torch.empty(rows, cols, dtype=torch.float32)
    step = max(1, (1 << 20) // max(cols, 1))
    for r in range(0, rows, step):
        out[r:r + step] = torch.from_numpy(gguf.quants.dequantize(raw_rows[r:r + step], qtype))
    return out.reshape(shape)


def _set_param(module: nn.Module, attr: str, value: torch.Tensor, hf_name: str) -> None:
    old = getattr(module, attr)
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"GGUF tensor for {hf_name} has shape {list(value.shape)}, the model expects "
                         f"{list(old.shape)}")
    module._parameters[attr] = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)


def load_gguf(path: str | os.PathLike, fallback: str = "float32", skip: tuple = ()) -> nn.Module:
    """A causal LM from a GGUF file (see docs/gguf.md).

    Linear weights of the exact types (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, MXFP4, NVFP4)
    become QuantLinear layers holding the file's codes and scales; an embedding of those types
    (but MXFP4 / NVFP4, whose nested scale codes QuantEmbedding does not gather) becomes a
    QuantEmbedding (unless the output head is tied to it: then it is decoded to float32, as the
    head shares it). Float tensors (F32/F16/BF16) load as float32 with their exact values;
    another quantized tensor of a non-Linear parameter is decoded to float32 exactly, and so is
    a linear named in `skip` (e.g. "lm_head"). A quantized Linear weight of a type without an
    exact layout (FALLBACK_TYPES; none today) follows `fallback`: "float32" (a dense nn.Linear
    of the exactly decoded weight) or a qengine format name (re-quantized from the float32
    decode, block size 64, no double quant: lossy, and said so in a warning)."""
    gguf = require_gguf()
    path = os.fspath(path)
    reader = open_gguf(path)
    config = gguf_config(path)
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch = str(reader.fields["general.architecture"].contents())
    model = build_model(config, empty=True)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    if fallback != "float32":
        get_format(fallback)  # ValueError naming the formats
    modules = dict(model.named_modules())
    unsupported = [(t.name, t.tensor_type.name) for t in reader.tensors
                   if t.tensor_type.name not in (*EXACT_TYPES, *FALLBACK_TYPES, *FLOAT_TYPES)]
    if unsupported:
        name, type_name = unsupported[0]
        raise ValueError(f"{path!r}: tensor {name!r} has GGUF type {type_name}, which qengine cannot load "
                         f"({len(unsupported)} such tensors); supported: {supported_types()}")
    fallbacks = []
    with open(path, "rb") as f:
        for t in reader.tensors:
            hf_name = names.get(t.name)
            if hf_name is None:
                log.info("GGUF tensor %s has no place in the %s model: skipped", t.name, config.model_type)
                continue
            type_name = t.tensor_type.name
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
            mod_name, attr = hf_name.rsplit(".", 1)
            module = modules[mod_name]
            index = qk_row_index(config, t.name, shape[0]) if len(shape) == 2 else None
            quantize_here = isinstance(module, nn.Linear) and attr == "weight" and not any(
                mod_name == s or mod_name.endswith("." + s) for s in skip)
            if _quantized_embedding(module, attr, type_name, config):
                layer = QuantEmbedding.from_quantized(_decode(f, t, type_name, shape), module.padding_idx)
                _replace(model, mod_name, layer)
                modules[mod_name] = layer
                continue
            if quantize_here and type_name in EXACT_TYPES:
                q = _decode(f, t, type_name, shape)
                q = permute_rows(q, index) if index is not None else q
                layer = QuantLinear.from_quantized(q)
                if module.bias is not None:
                    layer.register_parameter("bias", module.bias)  # filled by its own tensor
                _replace(model, mod_name, layer)
                modules[mod_name] = layer
                continue
            raw = _read(f, t)
            w = _float(raw, type_name, shape, gguf)
            w = w[index] if index is not None else w
            if quantize_here and type_name not in FLOAT_TYPES:
                fallbacks.append(f"{t.name} ({type_name})")
                if fallback != "float32":
                    from ...functional import quantize

                    layer = QuantLinear.from_quantized(quantize(w.to(torch.float32), fallback, blocksize=64,
                                                                double_quant=False))
                    if module.bias is not None:
                        layer.register_parameter("bias", module.bias)
                    _replace(model, mod_name, layer)
                    modules[mod_name] = layer
                    continue
            _set_param(module, attr, w, hf_name)
            del raw
    if fallbacks:
        log.warning("qengine: GGUF tensors with no exact qengine layout, decoded to float and kept as %s: %s",
                    fallback, ", ".join(fallbacks))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{path!r} has no tensor for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def _quantized_embedding(module: nn.Module, attr: str, type_name: str, config) -> bool:
    """Whether a GGUF tensor stays quantized as a QuantEmbedding: an embedding table of an exact
    type with plain float32 block scales (not MXFP4 / NVFP4), not tied to the output head (a
    tied head would need the float weight)."""
    return (isinstance(module, nn.Embedding) and attr == "weight" and type_name in EXACT_TYPES
            and type_name not in MICROSCALING_TYPES and not getattr(config, "tie_word_embeddings", False))


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)

