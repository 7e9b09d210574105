"""transformers integration: QEngineConfig and its HfQuantizer, registered in transformers'
quantizer registry under quant_method "qengine", so that

    AutoModelForCausalLM.from_pretrained(path, quantization_config=QEngineConfig(format="nf4"))

quantizes each nn.Linear as its weight is read (one float weight resident at a time),
save_pretrained writes the qengine checkpoint layout (the same files `qengine quantize` and
hf.checkpoint.save_quantized write), and from_pretrained of such a folder loads the quantized
tensors without re-quantizing. Importing qengine.hf registers all this.
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

import torch
from torch import nn

from .._version import __version__
from .._checks import check_blocksize, check_stored_blocksize
from ..formats import get_format
from ..functional import quantize
from .._targets import experts_targets, parent_of
from ..moe import expert_weight_names, experts_layout, is_float_expert_weight, quantize_experts
from ..nn import QuantExpertsWeight, QuantLinear
from ..nn.experts import check_expert_blocks
from ..tensor import QuantizedTensor
from ..calibrate.driver import METHODS
from ..calibrate.scale_search import search_scales
from ._files import page_out, read_tensor, safetensors_index
from .checkpoint import configured_module, layer_settings, quantizable_linears
from .expert_keys import keep_quantized_expert_keys
from .qconfig import CALIBRATION_KEYS, QUANT_METHOD, check_plan_entries, check_quantization_config

from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = ["QEngineConfig", "QEngineHfQuantizer", "mark_quantized"]

log = logging.getLogger("qengine")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Checkpoint keys of a QuantLinear weight (QuantizedTensor.state_dict under "<module>.weight."):
# transformers' loader does not know them; the quantizer reads them itself after loading.
_QUANT_KEYS = r"\.weight\.(packed|codebook|quant_meta|scales|offsets|positions|mask)(\.|$)"


class QEngineConfig(QuantizationConfigMixin):
    """qengine quantization settings for ``from_pretrained(quantization_config=...)``.

    Args:
        format: a qengine format name ("nf4", "fp4", "int4", "int8", ... or a registered one).
        blocksize: a power of two in [32, 4096], or None for one block per row.
        double_quant: quantize the per-block scales again (8-bit, blocks of 256), as QLoRA.
        compute_dtype: dtype the quantized matmuls run in (None: the activations' dtype).
        skip: module names left in float (full, last component, or a parent's name).
        method: how codes are chosen while loading: "rtn" (round-to-nearest) or "search"
            (searched block scales, data-free: from_pretrained has no calibration data). GPTQ
            needs data: load the float model (from_pretrained without quantization_config),
            ``qengine.quantize_model(model, method="gptq", calibration=ids)``, then
            ``qengine.hf.mark_quantized(model)`` and ``save_pretrained`` (or
            ``qengine.hf.save_quantized``); from_pretrained of that folder loads it like any
            qengine checkpoint (the bytes are RTN's layout).
        plan: per-module settings, a qengine Plan (qengine.plan), its to_dict() or {module:
            {"format", "blocksize", "double_quant", "method"} or "float16"}: each planned layer
            is quantized with its own entry while loading ("float16" entries stay float; the
            methods must be "rtn" or "search": GPTQ entries need data, so quantize_model(plan=,
            calibration=) the float model instead); a saved planned checkpoint records it.
    ``modules`` and ``qengine_version`` are filled in when a model is quantized and are what a
    saved checkpoint records (config.json's ``quantization_config``, the layout of
    qengine.hf.checkpoint), with ``method`` and, for calibrated methods, ``damp``,
    ``act_order``, ``calibration_tokens`` and ``sequential`` (a record only: loading never
    needs them)."""

    def __init__(self, format: str = "nf4", blocksize: Optional[int] = 64, double_quant: bool = True,
                 compute_dtype: Optional[torch.dtype | str] = None, skip: Sequence[str] = ("lm_head",),
                 modules: Optional[Sequence[str]] = None, qengine_version: Optional[str] = None, method: str = "rtn",
                 plan=None, **kwargs):
        kwargs.pop("quant_method", None)
        # Quantized embeddings (a GGUF token_embd saved by save_quantized): loaded by
        # qengine.hf.load_model only; kept here so the error below can say so.
        self.embeddings = kwargs.pop("embeddings", None)
        if plan is not None and not isinstance(plan, dict):
            to_dict = getattr(plan, "to_dict", None)
            if to_dict is None:
                raise TypeError(f"plan must be a qengine Plan or a dict, got {type(plan).__name__}")
            plan = to_dict()
        if isinstance(plan, dict) and isinstance(plan.get("entries"), dict):
            plan = plan["entries"]
        self.plan = None if plan is None else dict(check_plan_entries(plan, "QEngineConfig"))
        self.calibration = {k: kwargs.pop(k) for k in CALIBRATION_KEYS if kwargs.get(k) is not None}
        for k in CALIBRATION_KEYS:
            kwargs.pop(k, None)
        if kwargs:
            raise ValueError(f"QEngineConfig got unknown settings {sorted(kwargs)}")
        if not isinstance(method, str) or (modules is None and method not in METHODS + ("plan",)):
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        self.method = method
        self.quant_method = QUANT_METHOD
        self.format = get_format(format).name  # ValueError naming the available formats
        if blocksize is not None:  # a saved layout may use a smaller block (GGUF Q6_K: 16)
            (check_blocksize if modules is None else check_stored_blocksize)(blocksize)
        self.blocksize = blocksize
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
        self.double_quant = double_quant
        if isinstance(compute_dtype, torch.dtype):
            names = {v: k for k, v in _DTYPES.items()}
            if compute_dtype not in names:
                raise TypeError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
            compute_dtype = names[compute_dtype]
        if compute_dtype is not None and compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)} or None, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self.skip = [skip] if isinstance(skip, str) else list(skip)
        self.modules = None if modules is None else list(modules)
        self.qengine_version = qengine_version
        if modules is not None:  # a saved checkpoint's config: its version must be one this qengine reads
            check_quantization_config(self.to_dict(), "quantization_config")

    @property
    def torch_compute_dtype(self) -> Optional[torch.dtype]:
        return None if self.compute_dtype is None else _DTYPES[self.compute_dtype]

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format": self.format, "blocksize": self.blocksize,
                "double_quant": self.double_quant, "modules": self.modules, "qengine_version": self.qengine_version,
                "compute_dtype": self.compute_dtype, "skip": list(self.skip), "method": self.method,
                **self.calibration, **({} if self.plan is None else {"plan": self.plan}),
                **({"embeddings": self.embeddings} if self.embeddings else {})}

    def entry(self, name: str) -> tuple:
        """(format, blocksize, double_quant, method) of one module: its plan entry or the config's."""
        e = (self.plan or {}).get(name)
        if isinstance(e, dict):
            return (e["format"], e.get("blocksize", 64), e.get("double_quant", True), e.get("method", "rtn"))
        return (self.format, self.blocksize, self.double_quant, self.method)


class _Quantize(ConversionOps):
    """Quantizes one float nn.Linear weight as transformers reads it and swaps in the QuantLinear."""

    def __init__(self, hf_quantizer: "QEngineHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                missing_keys=None, **kwargs):
        (value,) = [v[0] if isinstance(v, list) else v for v in input_dict.values()]
        cfg = self.hf_quantizer.quantization_config
        if full_layer_name in self.hf_quantizer._expert_params:
            # A Mixture-of-Experts weight, after transformers merged the checkpoint's per-expert
            # matrices into its 3-D parameter.
            experts, attr = parent_of(model, full_layer_name)
            q = QuantExpertsWeight.from_weight(value, cfg.format, cfg.blocksize, cfg.double_quant,
                                               transposed=bool(experts.is_transposed))
            page_out(value)
            q._is_hf_initialized = True
            delattr(experts, attr)
            setattr(experts, attr, q)
            _finish_experts(experts)
            if missing_keys is not None:
                missing_keys.discard(full_layer_name)
            return {}
        name = full_layer_name.rsplit(".", 1)[0]
        parent, attr = parent_of(model, name)
        linear = getattr(parent, attr)
        bias = linear.bias if linear.bias is not None and linear.bias.device.type != "meta" else None
        fmt, bs, dq, method = cfg.entry(name)
        if method == "search":  # data-free: every input channel weighs the same
            q = search_scales(value.contiguous(), fmt, bs, dq)
        else:
            q = quantize(value.contiguous(), fmt, bs, dq)
        page_out(value)
        layer = QuantLinear.from_quantized(q, bias, compute_dtype=cfg.torch_compute_dtype)
        if linear.bias is not None and bias is None:  # bias not read yet: transformers fills it later
            layer.bias = linear.bias
        layer._is_hf_initialized = True
        setattr(parent, attr, layer)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class _Slot(nn.Module):
    """Stands for a quantized layer while transformers loads the rest of a qengine checkpoint:
    holds only the bias, so the float weight is never allocated."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias


class _ExpertSlot(nn.Module):
    """Stands for a quantized Mixture-of-Experts weight [E, N, K] while a qengine checkpoint
    loads (the float 3-D parameter is never allocated)."""

    def __init__(self, weight: torch.Tensor, transposed: bool):
        super().__init__()
        E, a, b = weight.shape
        self.num_experts, self.expert_out_features, self.in_features = (E, b, a) if transposed else (E, a, b)


def _finish_experts(experts: nn.Module) -> None:
    """Once both weights of an experts module are quantized: its layout and the "qengine"
    experts implementation (quantize_experts quantizes nothing more then)."""
    if all(isinstance(getattr(experts, a), QuantExpertsWeight) for a in expert_weight_names(experts)):
        quantize_experts(experts)


class QEngineHfQuantizer(HfQuantizer):
    """transformers' quantizer for QEngineConfig (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: QEngineConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._targets: set = set()
        self._expert_params: set = set()
        self._files: list = []

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("qengine-quantized models cannot be offloaded to disk (device_map has 'disk')")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        return param_name in self._expert_params or (param_name.endswith(".weight")
                                                     and param_name[: -len(".weight")] in self._targets)

    def get_quantize_ops(self):
        return _Quantize(self)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        if not self.pre_quantized:
            if cfg.method not in ("rtn", "search"):
                raise ValueError(f"QEngineConfig(method={cfg.method!r}) needs calibration data, which from_pretrained "
                                 "does not have: load the float model (from_pretrained without quantization_config), "
                                 f"call qengine.quantize_model(model, method={cfg.method!r}, calibration=token_ids), then "
                                 "qengine.hf.mark_quantized(model) and save_pretrained (or qengine.hf.save_quantized)")
            if cfg.method == "search" and experts_targets(model, list(cfg.skip)):
                log.info("qengine: method='search' applies to nn.Linear layers; Mixture-of-Experts weights are "
                         "quantized with round-to-nearest")
            skip = list(cfg.skip) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
            if cfg.plan is not None:
                skip += [n for n, e in cfg.plan.items() if e == "float16"]
                bad = [(n, e["method"]) for n, e in cfg.plan.items()
                       if isinstance(e, dict) and e.get("method", "rtn") not in ("rtn", "search")]
                if bad:
                    raise ValueError(f"QEngineConfig's plan quantizes {bad[0][0]} with method={bad[0][1]!r}, which "
                                     "needs calibration data that from_pretrained does not have: load the float "
                                     "model and call qengine.quantize_model(model, plan=plan, calibration=token_ids)")
            self._targets = set(quantizable_linears(model, skip))
            if cfg.plan is not None:
                planned = {n for n, e in cfg.plan.items() if e != "float16"}
                if self._targets != planned:
                    odd = sorted(self._targets ^ planned)
                    raise ValueError(f"QEngineConfig's plan does not match the model's linear layers ({odd[0]}: "
                                     f"{'not in the plan' if odd[0] in self._targets else 'not a layer to quantize'})")
            for name in experts_targets(model, skip):
                experts = model.get_submodule(name)
                experts_layout(experts)  # an unsupported layout fails now, naming it, not midway through loading
                self._expert_params.update(f"{name}.{a}" for a in expert_weight_names(experts))
            return model
        check_quantization_config(cfg.to_dict(), "quantization_config")
        if cfg.embeddings:
            raise ValueError(f"this qengine checkpoint holds quantized embeddings ({', '.join(cfg.embeddings)}: a GGUF "
                             "token_embd kept quantized), which transformers' from_pretrained cannot place; load it "
                             "with qengine.hf.load_model(path)")
        self._files = list(checkpoint_files or [])
        for name in cfg.modules:
            parent, attr = parent_of(model, name)
            if is_float_expert_weight(parent, attr):
                weight = getattr(parent, attr)
                delattr(parent, attr)
                setattr(parent, attr, _ExpertSlot(weight, bool(parent.is_transposed)))
                continue
            setattr(parent, attr, _Slot(configured_module(model, name)))
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {_QUANT_KEYS}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized:
            _load_quantized(model, cfg, self._files)
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                # transformers re-creates non-persistent buffers empty after loading (for models
                # to re-initialise); the nested block size is one: rebuild it from the state.
                mod._set_quantized(mod.quantized())
        cfg.modules = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
        cfg.qengine_version = __version__
        keep_quantized_expert_keys(model)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (LoRA, ...) train over the frozen quantized layers

    @property
    def is_compileable(self) -> bool:
        return True



def _load_quantized(model: nn.Module, cfg: QEngineConfig, files: list) -> None:
    """Replaces every _Slot by the QuantLinear stored in the checkpoint files, one layer's
    tensors read at a time; the quantize kernel is never called."""
    slots = {n: m for n, m in model.named_modules() if isinstance(m, (_Slot, _ExpertSlot))}
    if not slots:
        return
    if not files:
        raise ValueError("a qengine checkpoint is read from safetensors files; none were found")
    pattern = re.compile(_QUANT_KEYS)
    where: dict[str, list] = {n: [] for n in slots}  # module -> [(file, key, entry)]
    indexes = {}
    for path in files:
        indexes[path] = base, header = safetensors_index(path)
        for key, entry in header.items():
            m = pattern.search(key)
            if m and key[: m.start()] in where:
                where[key[: m.start()]].append((path, key, entry))
    for name, slot in slots.items():
        if not where[name]:
            raise ValueError(f"checkpoint lacks the quantized weight of {name} (no {name}.weight.* tensors)")
        sd = {}
        for path, key, entry in where[name]:
            with open(path, "rb") as f:
                sd[key[len(name) + 1:]] = read_tensor(f, path, indexes[path][0], key, entry)
        q = QuantizedTensor.from_state_dict(sd, "weight.")
        if isinstance(slot, _ExpertSlot):
            expected = (slot.num_experts * slot.expert_out_features, slot.in_features)
            if tuple(q.shape) != expected:
                raise ValueError(f"{name}.weight has shape {tuple(q.shape)}, the model's {slot.num_experts} experts of "
                                 f"[{slot.expert_out_features}, {slot.in_features}] need {expected}")
            layer = QuantExpertsWeight.from_quantized(q)
            layer.num_experts, layer.expert_out_features = slot.num_experts, slot.expert_out_features
            check_expert_blocks(slot.expert_out_features, slot.in_features, None if q.per_row else q.blocksize)
            parent, attr = parent_of(model, name)
            setattr(parent, attr, layer)
            _finish_experts(parent)
            continue
        if tuple(q.shape) != (slot.out_features, slot.in_features):
            raise ValueError(f"{name}.weight has shape {tuple(q.shape)}, the model expects "
                             f"({slot.out_features}, {slot.in_features})")
        bias = slot.bias
        if bias is not None and bias.device.type == "meta":
            raise ValueError(f"checkpoint lacks {name}.bias")
        layer = QuantLinear.from_quantized(q, None, compute_dtype=cfg.torch_compute_dtype)
        layer.bias = bias
        if bias is not None and bias.device != q.device:
            layer.to(bias.device)
        parent, attr = parent_of(model, name)
        setattr(parent, attr, layer)


def mark_quantized(model: nn.Module) -> QEngineConfig:
    """Records the settings of a model converted by qengine.quantize_model in its config (and
    attaches the quantizer), so ``model.save_pretrained`` writes a qengine checkpoint that
    ``from_pretrained`` loads. Returns the config. All QuantLinear layers must share one
    format, block size and double-quant setting, or the config records them per module
    ("plan", as quantize_model(plan=...) makes)."""
    fmt, bs, dq, plan = layer_settings(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    cdt = {m.compute_dtype for _, m in layers}
    record = dict(getattr(model, "_qengine_method", None) or {"method": "rtn"})
    cfg = QEngineConfig(fmt, bs, dq, compute_dtype=cdt.pop() if len(cdt) == 1 else None, plan=plan, **record)
    cfg.modules, cfg.qengine_version = sorted(n for n, _ in layers), __version__
    model.config.quantization_config = cfg
    keep_quantized_expert_keys(model)
    model.hf_quantizer = QEngineHfQuantizer(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return cfg


def register() -> None:
    """Registers QEngineConfig and QEngineHfQuantizer with transformers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QEngineConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(QEngineConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QEngineHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(QEngineHfQuantizer)


register()
