"""PEFT interop: a PEFT LoRA layer for qengine's QuantLinear, found by PEFT's LoRA dispatch the
way its bitsandbytes / HQQ / torchao layers are, so a plain ``LoraConfig`` works on a model
quantized by qengine, with no call of ours:

    model = get_peft_model(qengine.quantize_model(model), LoraConfig(target_modules=["q_proj", "v_proj"]))

(and so TRL's ``SFTTrainer(..., peft_config=LoraConfig(...))``, ``PeftModel.from_pretrained`` of a
saved adapter, transformers' ``model.add_adapter``). PEFT builds each LoRA layer in
``LoraModel._create_new_module``, which asks a fixed list of ``dispatch_*`` functions (custom
modules, bitsandbytes, eetq, ..., torchao, default) in turn; that list has no registry, so
``install`` (run when this module is imported, which qengine._hf_hook does once both qengine
and peft are imported, in either order) puts ``dispatch_qengine`` in front of it, after a
user's own ``_custom_modules`` mapping. It also counts QuantLinear layers as linear for
``target_modules="all-linear"`` and lets DoRA read the dequantized weight. ``register(config)``,
PEFT's per-config custom-module mechanism, is kept for code written before and for a peft whose
internals ``install`` does not recognise (it then logs a warning that names register).

The adapters are PEFT's own (``lora_A`` / ``lora_B`` nn.Linear per adapter name), so PEFT's
save_pretrained / load, multiple adapters and disabling work as for any layer. With one active
vanilla adapter (the usual training and inference case) its side path runs fused into the
quantized matmul, as ``qengine.add_lora``'s does (LoraQuantLinear._fused_forward); anything else
(several adapters, mixed-batch adapter_names, DoRA, dropout in training, LoRA biases, hooks) runs
PEFT's own forward. Merging into the 4-bit base is refused, as in qengine.nn.LoRALinear.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys

import torch

__all__ = ["register", "install", "dispatch_qengine", "LoraQuantLinear"]

try:
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
except ImportError:  # peft is optional; register() / install() say so
    _PeftLoraLinear = None


if _PeftLoraLinear is not None:
    from ..nn import QuantLinear

    class LoraQuantLinear(_PeftLoraLinear):
        """PEFT's LoRA Linear with a qengine QuantLinear base (in/out features read from it)."""

        def _get_in_out_features(self, module):
            if isinstance(module, QuantLinear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def forward(self, x, *args, **kwargs):
            fused = self._fused_forward(x, args, kwargs)
            return fused if fused is not None else super().forward(x, *args, **kwargs)

        def _fused_forward(self, x, args, kwargs):
            """PEFT's forward with the adapter's side path fused into QuantLinear's kernel (as
            qengine.add_lora runs it: one rounding, the native LoRA backward), or None where
            PEFT's own forward must run: extra arguments (adapter_names, variant kwargs), disabled
            or merged adapters, other than exactly one active adapter, DoRA or another variant,
            dropout that is not an identity here, LoRA biases, or forward hooks on the pieces."""
            if args or kwargs or self.disable_adapters or self.merged:
                return None
            active = [a for a in self.active_adapters if a in self.lora_A]
            if len(active) != 1:
                return None
            name = active[0]
            if name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False):
                return None
            lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            identity = isinstance(dropout, torch.nn.Identity) or (
                type(dropout) is torch.nn.Dropout and (dropout.p == 0 or not dropout.training))
            base = self.get_base_layer()
            if (not identity or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear
                    or lora_a.bias is not None or lora_b.bias is not None or not isinstance(base, QuantLinear)
                    or any(m._forward_hooks or m._forward_pre_hooks for m in (base, lora_a, lora_b, dropout))):
                return None
            self._check_forward_args(x)
            return base(x, lora=(lora_a.weight, lora_b.weight, self.scaling[name]))

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise TypeError("merging a LoRA adapter into a 4-bit QuantLinear would re-quantize it silently; "
                            "dequantize first (QuantLinear.dequantize) and merge into a dense layer")

        def unmerge(self) -> None:
            raise TypeError("a LoRA adapter over a QuantLinear is never merged")
else:
    LoraQuantLinear = None


def _require_peft(what: str) -> None:
    if LoraQuantLinear is None:
        from .._version import install_hint
        raise ImportError(f"qengine.compat.peft.{what} needs the 'peft' package: {install_hint('hf')}")


def _base_layer(target):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def dispatch_qengine(target, adapter_name, config, **kwargs):
    """A PEFT LoRA dispatcher (the signature of peft's ``dispatch_bnb_4bit``): a LoraQuantLinear
    when `target` (or the base of a LoRA layer already there) is a QuantLinear, else None."""
    _require_peft("dispatch_qengine")
    from ..nn import QuantLinear

    if not isinstance(_base_layer(target), QuantLinear):
        return None
    if getattr(config, "use_dora", False):
        _patch_dora()
    return LoraQuantLinear(target, adapter_name, config=config, **kwargs)


def _custom_mapping(config, target) -> bool:
    """True when the config's own custom modules (LoraConfig._register_custom_module) cover
    target: an explicit mapping wins over ours."""
    custom = getattr(config, "_custom_modules", None) or {}
    base = _base_layer(target)
    return any(isinstance(base, cls) for cls in custom)


def _patch_create_new_module() -> None:
    from peft.tuners.lora.model import LoraModel

    current = inspect.getattr_static(LoraModel, "_create_new_module", None)
    if not isinstance(current, staticmethod):
        raise TypeError(f"peft's LoraModel._create_new_module is a {type(current).__name__}, not the staticmethod "
                        "qengine extends")
    original = current.__func__
    if getattr(original, "_qengine", False):
        return

    @functools.wraps(original)
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if not _custom_mapping(lora_config, target):
            new_module = dispatch_qengine(target, adapter_name, lora_config, **kwargs)
            if new_module is not None:
                return new_module
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._qengine = True
    LoraModel._create_new_module = staticmethod(_create_new_module)


def _patch_all_linear() -> None:
    """target_modules="all-linear" picks nn.Linear (bitsandbytes' layers are subclasses) and
    Conv1D layers; for a LoraConfig it picks QuantLinear layers too, except the output layer,
    as PEFT leaves out a float lm_head."""
    import peft.tuners.tuners_utils as tu
    from peft import LoraConfig
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    original = tu._maybe_include_all_linear_layers
    if getattr(original, "_qengine", False):
        return
    from ..nn import QuantLinear

    @functools.wraps(original)
    def _maybe_include_all_linear_layers(peft_config, model):
        targets = getattr(peft_config, "target_modules", None)
        wanted = (isinstance(peft_config, LoraConfig) and isinstance(targets, str)
                  and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND)
        peft_config = original(peft_config, model)
        if wanted:
            get_out = getattr(model, "get_output_embeddings", None)
            out = get_out() if callable(get_out) else None
            tuned = [n for n, m in model.named_modules() if isinstance(m, tu.BaseTunerLayer)]
            names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m is not out
                     and not any(n.startswith(t + ".") for t in tuned)}
            peft_config.target_modules = set(peft_config.target_modules) | names
        return peft_config

    _maybe_include_all_linear_layers._qengine = True
    tu._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    conv = sys.modules.get("peft.utils.transformers_weight_conversion")  # imported the name, when loaded
    if conv is not None and getattr(conv, "_maybe_include_all_linear_layers", None) is original:
        conv._maybe_include_all_linear_layers = _maybe_include_all_linear_layers


def _patch_dora() -> None:
    """DoRA (LoraConfig(use_dora=True)) reads the base weight through peft's
    dequantize_module_weight, which knows bitsandbytes, HQQ and torchao layers but not
    QuantLinear (no `.weight`): teach it QuantLinear.dequantize (float32, [out, in]), in each
    of peft's LoRA modules that imported the function by name."""
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
    for name in ("peft.tuners.lora.dora", "peft.tuners.lora.layer", "peft.tuners.lora.variants"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "dequantize_module_weight", None) is original:
            mod.dequantize_module_weight = dequantize_module_weight


def install() -> None:
    """Makes PEFT's LoRA find QuantLinear layers by itself (idempotent): dispatch_qengine in
    LoraModel's dispatch, "all-linear" counting QuantLinear, DoRA's dequantized weight. Run
    automatically when qengine and peft are both imported."""
    _require_peft("install")
    _patch_create_new_module()
    _patch_all_linear()
    _patch_dora()


def register(config) -> None:
    """Registers LoraQuantLinear for QuantLinear targets in a peft LoraConfig (in place); with
    use_dora, DoRA's magnitude reads the dequantized QuantLinear weight. Not needed since
    install() runs on import; kept for existing code and as the fallback where it could not."""
    _require_peft("register")
    from ..nn import QuantLinear

    config._register_custom_module({QuantLinear: LoraQuantLinear})
    if getattr(config, "use_dora", False):
        _patch_dora()


def _install_on_import() -> None:
    try:
        install()
    except Exception as e:  # a peft whose internals changed: the per-config way still works
        logging.getLogger("qengine").warning("qengine: could not add QuantLinear to peft's LoRA dispatch (%r); call "
                                             "qengine.compat.peft.register(config) on each LoraConfig", e)


# Importing this module means peft is in use; it is also how qengine._hf_hook installs (here,
# not there, as this import may be what imports peft and so fires the hook before it finishes).
if LoraQuantLinear is not None:
    _install_on_import()
