"""save_pretrained of a model with quantized Mixture-of-Experts weights: its conversions back to
transformers' per-expert matrices are dropped for those weights."""

from __future__ import annotations

import re

from torch import nn

from ..nn import QuantExpertsWeight


def keep_quantized_expert_keys(model: nn.Module) -> None:
    """Stops save_pretrained from splitting quantized expert weights back into transformers'
    per-expert checkpoint matrices (its reverse weight conversion would cut packed codes as if
    they were a float [E, N, K] tensor): the conversions that target a quantized experts weight
    are dropped from the model's list, so their qengine tensors are saved under their own names
    (from_pretrained of the folder reads them back through quantization_config.modules)."""
    from transformers.core_model_loading import PrefixChange, WeightConverter

    names = [n for n, m in model.named_modules() if isinstance(m, QuantExpertsWeight)]
    if not names:
        return
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]

    def targets_quantized(c) -> bool:
        return isinstance(c, WeightConverter) and any(
            re.search(re.escape(t).replace(r"\*", r"[^.]+"), n) for t in c.target_patterns for n in names)

    model._weight_conversions = [c for c in conversions if not targets_quantized(c)]
