"""Hugging Face integration: qengine checkpoints of transformers models (hf.checkpoint) and,
when transformers is installed, QEngineConfig registered as transformers' "qengine"
quantization method (hf.quantizer; importing this package registers it)."""

from importlib.util import find_spec

from .._version import install_hint
from .checkpoint import build_model, load_model, quantize_checkpoint, save_quantized

__all__ = ["build_model", "load_model", "quantize_checkpoint", "save_quantized", "QEngineConfig",
           "QEngineHfQuantizer", "mark_quantized"]

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
