"""llama.cpp GGUF files in and out (docs/gguf.md): load_gguf places the file's quantized blocks in
QuantLinear layers without a float copy; export_gguf writes a model through the gguf package."""

from .codec import EXACT_TYPES, FALLBACK_TYPES, FLOAT_TYPES, decode_blocks
from .export import EXPORT_TYPES, export_gguf
from .load import load_gguf

__all__ = ["load_gguf", "export_gguf", "decode_blocks", "EXACT_TYPES", "FALLBACK_TYPES", "FLOAT_TYPES",
           "EXPORT_TYPES", "is_gguf_path"]


def is_gguf_path(path) -> bool:
    """Whether `path` names a GGUF file (by its .gguf suffix)."""
    import os

    return str(os.fspath(path)).lower().endswith(".gguf")
