"""Modules: QuantLinear (quantized nn.Linear), QuantEmbedding (quantized nn.Embedding), LoRALinear
(low-rank adapter over a base) and the quantized Mixture-of-Experts weights (QuantExpertsWeight,
LoRAExperts, QuantExperts)."""

from .experts import LoRAExperts, QuantExperts, QuantExpertsWeight, experts_forward
from .lora import LoRALinear
from .quant_embedding import QuantEmbedding
from .quant_linear import QUANT_STORAGE_DTYPES, QuantLinear

__all__ = ["LoRAExperts", "QuantExperts", "QuantExpertsWeight", "experts_forward", "LoRALinear", "QuantEmbedding", "QuantLinear", "QUANT_STORAGE_DTYPES"]
