"""Hugging Face integration: qengine checkpoints of transformers models (hf.checkpoint) and,
when transformers is installed, QEngineConfig registered as transformers' "qengine"
quantization method (hf.quantizer; importing this package registers it)."""

import os
from importlib.util import find_spec

from .._version import install_hint
from . import checkpoint as _checkpoint
from .checkpoint import build_model, quantize_checkpoint, save_quantized
from .gguf import export_gguf, load_gguf

__all__ = ["build_model", "load_model", "load_gguf", "export_gguf", "quantize_checkpoint", "save_quantized",
           "QEngineConfig", "QEngineHfQuantizer", "mark_quantized"]


def load_model(model_dir, *args, **kwargs):
    """A causal LM: checkpoint.load_model(model_dir, ...) for a model directory, or for a path
    ending in .gguf, gguf.load_gguf(path, ...) (llama.cpp's file, its quantized blocks placed
    in QuantLinear layers as they are; docs/gguf.md)."""
    if str(os.fspath(model_dir)).lower().endswith(".gguf"):
        return load_gguf(model_dir, *args, **kwargs)
    return _checkpoint.load_model(model_dir, *args, **kwargs)


_missing = None
if find_spec("transformers") is None:
    _missing = f"Hugging Face transformers: {install_hint('hf')}"
else:
    try:
        from .quantizer import QEngineConfig, QEngineHfQuantizer, mark_quantized
    except ImportError as e:  # transformers 4.x: no quantizer registry of this shape
        _missing = f"transformers >= 5 (its quantizer registry; {e})"

if _missing is not None:
    def __getattr__(name):
        if name in ("QEngineConfig", "QEngineHfQuantizer", "mark_quantized"):
            raise ImportError(f"qengine.hf.{name} needs {_missing}")
        raise AttributeError(f"module 'qengine.hf' has no attribute {name!r}")
