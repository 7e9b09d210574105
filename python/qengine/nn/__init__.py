"""Modules: QuantLinear (quantized nn.Linear), LoRALinear (low-rank adapter over a base) and the
quantized Mixture-of-Experts weights (QuantExpertsWeight, LoRAExperts, QuantExperts)."""

from .experts import LoRAExperts, QuantExperts, QuantExpertsWeight, experts_forward
from .lora import LoRALinear
from .quant_linear import QUANT_STORAGE_DTYPES, QuantLinear

__all__ = ["LoRAExperts", "QuantExperts", "QuantExpertsWeight", "experts_forward", "LoRALinear", "QuantLinear", "QUANT_STORAGE_DTYPES"]
