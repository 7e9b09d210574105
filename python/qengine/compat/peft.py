"""PEFT interop: a PEFT LoRA layer for qengine's QuantLinear, registered through PEFT's custom
module mechanism (``LoraConfig._register_custom_module``), so ``peft.get_peft_model`` adds LoRA
on top of a model quantized with ``qengine.quantize_model``.

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    qengine.compat.peft.register(config)
    model = get_peft_model(qengine.quantize_model(model), config)

The adapters are PEFT's own (``lora_A`` / ``lora_B`` nn.Linear per adapter name), so PEFT's
save_pretrained / load, multiple adapters and disabling work as for any layer. Their side path
runs as PEFT computes it, beside the quantized matmul (not fused into it: use qengine.add_lora
for the fused path). Merging into the 4-bit base is refused, as in qengine.nn.LoRALinear.
"""

from __future__ import annotations

__all__ = ["register", "LoraQuantLinear"]

try:
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
except ImportError:  # peft is optional; register() says so
    _PeftLoraLinear = None


if _PeftLoraLinear is not None:
    from ..nn import QuantLinear

    class LoraQuantLinear(_PeftLoraLinear):
        """PEFT's LoRA Linear with a qengine QuantLinear base (in/out features read from it)."""

        def _get_in_out_features(self, module):
            if isinstance(module, QuantLinear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise TypeError("merging a LoRA adapter into a 4-bit QuantLinear would re-quantize it silently; "
                            "dequantize first (QuantLinear.dequantize) and merge into a dense layer")

        def unmerge(self) -> None:
            raise TypeError("a LoRA adapter over a QuantLinear is never merged")
else:
    LoraQuantLinear = None


def _patch_dora() -> None:
    """DoRA (LoraConfig(use_dora=True)) reads the base weight through peft's
    dequantize_module_weight, which knows bitsandbytes, HQQ and torchao layers but not
    QuantLinear (no `.weight`): teach it QuantLinear.dequantize (float32, [out, in])."""
    import peft.tuners.lora.dora as dora

    original = dora.dequantize_module_weight
    if getattr(original, "_qengine", False):
        return
    from ..nn import QuantLinear

    def dequantize_module_weight(module):
        if isinstance(module, QuantLinear):
            return module.dequantize()
        return original(module)

    dequantize_module_weight._qengine = True
    dora.dequantize_module_weight = dequantize_module_weight


def register(config) -> None:
    """Registers LoraQuantLinear for QuantLinear targets in a peft LoraConfig (in place); with
    use_dora, DoRA's magnitude reads the dequantized QuantLinear weight."""
    if LoraQuantLinear is None:
        from .._version import install_hint
        raise ImportError(f"qengine.compat.peft needs the 'peft' package: {install_hint('hf')}")
    from ..nn import QuantLinear

    config._register_custom_module({QuantLinear: LoraQuantLinear})
    if getattr(config, "use_dora", False):
        _patch_dora()
