"""quantize_model: every nn.Linear of a model (and its transformers experts) quantized in
place, one layer at a time, by round-to-nearest or a calibrated method; memory_report. LoRA
adapters live in qengine.adapters, LoftQ in qengine.loftq."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from ._targets import experts_targets, linear_targets, matches, parent_of
from .adapters import (add_lora, adapter_state_dict, load_adapter, load_adapter_state_dict, lora_parameters,
                       mark_only_lora_trainable, save_adapter)
from .formats import Format, get_format
from .moe import quantize_experts
from .nn import LoRAExperts, LoRALinear, QuantEmbedding, QuantExpertsWeight, QuantLinear

# add_lora and the adapter helpers stay importable from here, where they used to live.
__all__ = ["quantize_model", "memory_report", "add_lora", "lora_parameters", "mark_only_lora_trainable",
           "adapter_state_dict", "load_adapter_state_dict", "save_adapter", "load_adapter"]

log = logging.getLogger("qengine")


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return items
    return tqdm(items, desc=desc, unit="layer", disable=None)


def quantize_model(model: nn.Module, format: str | Format = "nf4", blocksize: Optional[int] = 64,
                   double_quant: bool = True, skip: Sequence[str] = ("lm_head",),
                   compute_dtype: Optional[torch.dtype] = None, quant_storage: torch.dtype = torch.uint8,
                   dtype: Optional[torch.dtype] = None, progress: bool = True, sparsity: Optional[str] = None,
                   masks: Optional[dict] = None, method: str = "rtn", calibration=None, act_order: bool = False,
                   damp: float = 0.01, sequential: bool = True, plan=None) -> nn.Module:
    """Replaces every nn.Linear of `model` in place by a QuantLinear and returns `model`.

    plan: a qengine.calibrate.plan.Plan (or its to_dict()) as qengine.plan returns: each named
    layer gets its own format, block size, double quantization and method ("float16" entries
    stay float), and format / blocksize / double_quant / method are then not used; layers the
    plan does not name must be in skip. GPTQ entries need calibration.

    With method="rtn", layers are converted one at a time and each float weight is dropped as
    soon as its replacement is in place, so the peak memory is the model plus one layer's
    quantized copy (provided nothing else, e.g. an optimizer, holds the old weights). The
    calibrated methods run decoder block by decoder block and keep the float weights until all
    layers are done (a failure restores the model): see qengine.calibrate.driver for the flow
    and its memory bound.

    Args:
        skip: module names (full, last component, or a parent's name) left in float;
            ``lm_head`` by default, as QLoRA does.
        dtype: if given, the parameters left in float (embeddings, norms, skipped layers,
            biases) are cast to it afterwards (QLoRA recipes keep them in bfloat16); the
            quantized state is never cast.
        progress: a tqdm progress bar when tqdm is installed (none otherwise).
        method: how codes are chosen (every method stores RTN's layout and bytes per
            parameter): "rtn" round-to-nearest; "gptq" GPTQ error-compensating rounding from
            each layer's H = X^T X over `calibration`; "search" per-block clipped scales
            weighted by each input channel's mean square (unweighted without calibration);
            "gptq+search" both.
        calibration: token ids [batch, seq_len] (int), a dict of model inputs, an iterable of
            such batches, or a callable returning one (e.g. 64 sequences of 512 tokens).
        act_order, damp: GPTQ's (see qengine.calibrate.gptq_quantize).
        sequential: each decoder block is calibrated on the outputs of the blocks before it,
            already quantized (GPTQ's order); False: on the float model's activations.
        sparsity: None, or "2:4" for the 2:4 sparse layout (see qengine.quantize).
        masks: {module name: bool mask [out, in]} as qengine.prune(model, ...) returns; each
            layer's pruned weights stay exactly zero (see qengine.quantize's mask).
    Mixture-of-Experts layers of transformers models (their 3-D expert weights) are quantized
    too, with the same settings (qengine.moe.quantize_experts; by round-to-nearest whatever the
    method, which an INFO log says), and run through the grouped kernel; an experts layout it does not support raises ValueError naming the flag (skip the
    module to keep it in float). Layers not converted, and why, are logged on the "qengine"
    logger: linears whose weight is shared with another module (tied embeddings), linears
    inside nn.MultiheadAttention (which reads their weight directly), other 3-D parameters.

    Embeddings, norms and biases stay float by design (an embedding is a row lookup, not a
    matmul, and QLoRA keeps it float; norms and biases are small per-channel vectors), as do
    the layers in `skip`; an INFO log says how many parameters each holds. A WARNING names the
    float weights that a quantized model would normally have quantized, when they hold more
    than a tenth of the parameters: 3-D expert weights left in float (skipped or not), and 2-D
    weights outside `skip` that were not converted (nn.Linear inside nn.MultiheadAttention or
    sharing its weight, linears of other types such as transformers' Conv1D). Tied weights
    count once.

    Already quantized: a QuantLinear (or quantized experts weight) outside `skip` is never
    re-quantized. Called again with the settings it was quantized with (format, blocksize,
    double_quant, sparsity, compute_dtype, quant_storage), quantize_model leaves those layers
    as they are and converts only the float nn.Linear layers left (usually none): a no-op.
    With other settings it raises ValueError naming the first such layer and both settings,
    before changing anything (re-quantizing codes compounds their rounding error: quantize the
    float model instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = [skip]
    if plan is not None:
        return _quantize_planned(model, plan, list(skip), calibration, damp, sequential, compute_dtype,
                                 quant_storage, dtype, progress)
    from .calibrate.driver import Settings, check_method_args, quantize_calibrated

    check_method_args(method, calibration, damp, act_order, sequential, sparsity, masks)
    _check_already_quantized(model, list(skip), format, blocksize, double_quant, sparsity, compute_dtype,
                             quant_storage)
    names = linear_targets(model, list(skip))
    experts = experts_targets(model, list(skip))
    record = {"method": method} if names or experts else getattr(model, "_qengine_method", {"method": method})
    if method != "rtn":
        info = quantize_calibrated(model, names, experts, calibration, Settings(
            get_format(format), blocksize, double_quant, method, damp, act_order, compute_dtype, quant_storage),
            sequential, progress)
        record.update(calibration_tokens=info["tokens"], sequential=info["sequential"])
        if method in ("gptq", "gptq+search"):
            record.update(damp=damp, act_order=act_order)
        names, experts = [], []
    for name in _progress(names + experts, progress, "quantizing"):
        if name in experts:
            quantize_experts(model.get_submodule(name), format, blocksize, double_quant)
            continue
        owner, attr = parent_of(model, name)
        setattr(owner, attr, QuantLinear.from_linear(getattr(owner, attr), format, blocksize, double_quant,
                                                      compute_dtype=compute_dtype, quant_storage=quant_storage,
                                                      sparsity=sparsity, mask=(masks or {}).get(name)))
        # The old nn.Linear (and its float weight) has no reference left here and is freed now.
    if dtype is not None:
        model.to(dtype)
    _warn_unquantized(model, list(skip))
    model._qengine_method = record  # what save_quantized / mark_quantized record in quantization_config
    return model


def _quantize_planned(model: nn.Module, plan, skip: list, calibration, damp, sequential, compute_dtype,
                      quant_storage, dtype, progress) -> nn.Module:
    """quantize_model(plan=...): every layer by its plan entry (see quantize_model)."""
    from .calibrate.driver import Settings, quantize_calibrated
    from .calibrate.plan import FLOAT16, Plan

    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a qengine Plan or its to_dict(), got {type(plan).__name__}")
    keep = [n for n, c in plan.entries.items() if c == FLOAT16]
    quant = plan.quantized()
    done = set()
    for name, c in quant.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the plan names {name!r}, which this model does not have") from None
        if isinstance(mod, QuantLinear):  # already quantized: only with the plan's own settings
            _check_already_quantized(mod, [], c.format, c.blocksize, c.double_quant, None, compute_dtype,
                                     quant_storage, prefix=name)
            done.add(name)
        elif not isinstance(mod, nn.Linear):
            raise ValueError(f"the plan names {name!r}, a {type(mod).__name__}, not an nn.Linear")
    names = linear_targets(model, skip + keep)
    if experts_targets(model, skip + keep):
        raise ValueError("plans cover nn.Linear layers; add the Mixture-of-Experts modules to skip")
    uncovered = [n for n in names if n not in quant]
    if uncovered:
        raise ValueError(f"the plan does not name {uncovered[0]} ({len(uncovered)} layers in all): plan this "
                         "model again, or add them to skip")
    odd = [n for n in quant if n not in names and n not in done]
    if odd:
        raise ValueError(f"the plan names {odd[0]}, which quantize_model would not convert (in skip, or sharing its "
                         "weight with another module)")
    methods = {quant[n].method for n in names}
    gptq = bool(methods & {"gptq", "gptq+search"})
    if gptq and calibration is None:
        raise ValueError("the plan has GPTQ layers, which need calibration data: pass calibration= (token ids "
                         "[batch, seq_len] of real text)")
    per = {n: Settings(get_format(quant[n].format), quant[n].blocksize, quant[n].double_quant, quant[n].method, damp,
                       False, compute_dtype, quant_storage) for n in names}
    record = {"method": "plan"}
    if names and (calibration is not None or "search" in methods):
        base = next(iter(per.values()))
        lead = Settings(base.format, base.blocksize, base.double_quant, "gptq" if gptq else "search", damp)
        info = quantize_calibrated(model, names, [], calibration, lead, sequential, progress, per_layer=per)
        record.update(calibration_tokens=info["tokens"], sequential=info["sequential"])
        if gptq:
            record.update(damp=damp)
    else:
        for name in _progress(names, progress, "quantizing"):
            owner, attr = parent_of(model, name)
            c = quant[name]
            setattr(owner, attr, QuantLinear.from_linear(getattr(owner, attr), c.format, c.blocksize, c.double_quant,
                                                          compute_dtype=compute_dtype, quant_storage=quant_storage))
    if dtype is not None:
        model.to(dtype)
    _warn_unquantized(model, skip + keep)
    model._qengine_method = record
    model._qengine_plan = plan
    return model


def _check_already_quantized(model: nn.Module, skip: list[str], format, blocksize, double_quant, sparsity,
                             compute_dtype, quant_storage, prefix: str = "") -> None:
    """Raises ValueError naming the first already-quantized layer (outside skip) whose settings
    differ from the requested ones; layers quantized with the same settings are left as they are."""
    fmt = get_format(format)
    want = {"format": fmt.name, "blocksize": blocksize, "double_quant": double_quant, "sparsity": sparsity}
    for name, mod in model.named_modules(prefix=prefix):
        if not isinstance(mod, QuantLinear) or matches(name, skip):
            continue
        have = {"format": mod.format.name, "blocksize": None if mod.per_row else mod.blocksize,
                "double_quant": mod.double_quant, "sparsity": "2:4" if mod.layout == "2:4" else None}
        asked = dict(want)
        if not isinstance(mod, QuantExpertsWeight):  # quantize_experts applies neither
            have.update(compute_dtype=mod.compute_dtype, quant_storage=mod.quant_storage)
            asked.update(compute_dtype=compute_dtype, quant_storage=quant_storage)
        if have != asked or mod.format != fmt:
            raise ValueError(f"{name} is already quantized ({_settings(have)}); quantize_model was called with "
                             f"{_settings(asked)}. qengine does not re-quantize quantized codes (the rounding errors "
                             "would compound): quantize the float model with the new settings, call with the "
                             "layer's settings to convert only the float layers left, or add the layer to skip")


def _settings(d: dict) -> str:
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in d.items())


def _storage_key(t: torch.Tensor):
    """One key per stored tensor, so tied weights (one storage, one or two Parameter objects)
    count once."""
    try:
        if t.device.type != "meta":
            return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        pass
    return ("id", id(t))


def _warn_unquantized(model: nn.Module, skip: list[str], threshold: float = 0.1) -> None:
    """After quantize_model: logs (INFO) how many parameters stay float by design, and warns
    naming the float weights a user would expect quantized (3-D expert weights, skipped or
    not; 2-D weights outside `skip` that were not converted) when they hold more than
    `threshold` of the model's parameters. Every stored tensor counts once (tied weights)."""
    embedding_keys = {_storage_key(p) for mod in model.modules() if isinstance(mod, (nn.Embedding, nn.EmbeddingBag))
                      for p in mod.parameters(recurse=False)}
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    counts = {"quantized": 0, "embedding": 0, "vector": 0, "skipped": 0, "adapter": 0}
    notable: list[tuple[str, int, str]] = []
    seen: set = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            counts["quantized"] += mod.in_features * mod.out_features
        for pname, p in mod.named_parameters(recurse=False):
            key = _storage_key(p)
            if key in seen:
                continue
            seen.add(key)
            n, full = p.numel(), f"{mname}.{pname}" if mname else pname
            if isinstance(mod, QuantLinear):
                if p.is_floating_point():  # the bias; the packed codes are counted above
                    counts["vector"] += n
            elif isinstance(mod, (LoRALinear, LoRAExperts)):
                counts["adapter"] += n
            elif key in embedding_keys:
                counts["embedding"] += n
            elif p.dim() < 2:
                counts["vector"] += n
            elif p.dim() == 3:  # MoE experts: most of such a model, so named even when skipped
                notable.append((full, n, "3-D expert weight" + (", in skip" if matches(mname, skip) else "")))
            elif matches(mname, skip):
                counts["skipped"] += n
            elif any(mname == a or mname.startswith(a + ".") for a in mha):
                notable.append((full, n, "nn.MultiheadAttention projection (it reads its weights directly)"))
            elif isinstance(mod, nn.Linear):
                notable.append((full, n, "nn.Linear sharing its weight with another module"))
            else:
                notable.append((full, n, f"{p.dim()}-D {type(mod).__name__} weight; quantize_model converts "
                                         "nn.Linear only"))
    total = sum(counts.values()) + sum(n for _, n, _ in notable)
    if not total:
        return
    pct = {k: 100.0 * v / total for k, v in counts.items()}
    log.info("qengine: %.1f%% of the parameters are quantized; float by design: embeddings %.1f%% (a row lookup, "
             "not a matmul; QLoRA keeps them float too; tied weights counted once), norms and biases %.1f%% (small "
             "per-channel vectors), layers in skip %.1f%%, LoRA adapters %.1f%%", pct["quantized"], pct["embedding"],
             pct["vector"], pct["skipped"], pct["adapter"])
    held = sum(n for _, n, _ in notable)
    if held > threshold * total:
        top = sorted(notable, key=lambda t: -t[1])[:5]
        log.warning("qengine: %.1f%% of the model's parameters stay unquantized in weights that are normally "
                    "quantized: %s%s. (Embeddings, norms and biases, %.1f%% more, stay float by design.)",
                    100.0 * held / total, ", ".join(f"{n} ({c:,}; {why})" for n, c, why in top),
                    f" and {len(notable) - 5} more" if len(notable) > 5 else "", pct["embedding"] + pct["vector"])


def memory_report(model: nn.Module) -> dict:
    """Bytes and bits per parameter by kind of layer.

    Returns {kind: {"modules", "params", "bytes", "bits_per_param"}} for kinds "quantized"
    (QuantLinear weights: codes, scales, nested state, tables), "lora" (A and B), "linear"
    (float nn.Linear weights), "embedding", "bias" (of quantized layers) and "other"
    (norms, anything else), plus "total". params counts logical weights (in*out for a
    quantized layer); every tensor is counted once even when shared (layers of one format
    share its codebook table until they are moved to another device)."""
    kinds = {k: {"modules": 0, "params": 0, "bytes": 0} for k in
             ("quantized", "lora", "linear", "embedding", "bias", "other")}
    seen: set = set()

    def add(kind, t, params=None):
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            return
        seen.add(key)
        kinds[kind]["params"] += t.numel() if params is None else params
        kinds[kind]["bytes"] += t.numel() * t.element_size()

    for _, mod in model.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        own.update({k: v for k, v in mod.named_buffers(recurse=False) if v is not None})
        if isinstance(mod, QuantLinear):
            kinds["quantized"]["modules"] += 1
            kinds["quantized"]["params"] += mod.in_features * mod.out_features
            for name, t in own.items():
                if name == "bias":
                    add("bias", t)
                elif name[-3:] != "_bs":  # the nested block size (an int) is not stored data
                    add("quantized", t, params=0)
            continue
        kind = ("lora" if isinstance(mod, (LoRALinear, LoRAExperts)) else "linear" if isinstance(mod, nn.Linear)
                else "embedding" if isinstance(mod, (nn.Embedding, QuantEmbedding)) else "other")
        if own:
            kinds[kind]["modules"] += 1
        for t in own.values():
            add(kind, t)
    total = {key: sum(v[key] for v in kinds.values()) for key in ("modules", "params", "bytes")}
    kinds["total"] = total
    for v in kinds.values():
        v["bits_per_param"] = 8.0 * v["bytes"] / v["params"] if v["params"] else 0.0
    return kinds
