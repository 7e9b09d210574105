"""Hugging Face integration: qengine checkpoints of transformers models (hf.checkpoint)."""

from .checkpoint import build_model, load_model, quantize_checkpoint, save_quantized

__all__ = ["build_model", "load_model", "quantize_checkpoint", "save_quantized"]
