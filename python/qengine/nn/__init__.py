"""Modules: QuantLinear (quantized nn.Linear) and LoRALinear (low-rank adapter over a base)."""

from .lora import LoRALinear
from .quant_linear import QUANT_STORAGE_DTYPES, QuantLinear

__all__ = ["LoRALinear", "QuantLinear", "QUANT_STORAGE_DTYPES"]
