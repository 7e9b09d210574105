"""Whole-model helpers: quantize every nn.Linear in place one layer at a time, add LoRA
adapters, select their parameters, report memory, save and load adapters alone."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .formats import Format, get_format
from .moe import is_experts_module, quantize_experts
from .nn import LoRAExperts, LoRALinear, QuantExpertsWeight, QuantLinear

__all__ = ["quantize_model", "add_lora", "lora_parameters", "mark_only_lora_trainable", "memory_report",
           "adapter_state_dict", "load_adapter_state_dict", "save_adapter", "load_adapter"]

log = logging.getLogger("qengine")
ADAPTER_FORMAT = "qengine-lora"
ADAPTER_VERSION = "1"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A module name matches a pattern equal to it, to its last component, or to a prefix of
    whole components ("model.layers.0" matches everything under that block)."""
    last = name.rsplit(".", 1)[-1]
    return any(name == p or last == p or name.startswith(p + ".") for p in patterns)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


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
                   damp: float = 0.01, sequential: bool = True) -> nn.Module:
    """Replaces every nn.Linear of `model` in place by a QuantLinear and returns `model`.

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
    from .calibrate.driver import Settings, check_method_args, quantize_calibrated

    check_method_args(method, calibration, damp, act_order, sequential, sparsity, masks)
    _check_already_quantized(model, list(skip), format, blocksize, double_quant, sparsity, compute_dtype,
                             quant_storage)
    names = _linear_targets(model, list(skip))
    experts = _experts_targets(model, list(skip))
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
        parent, attr = _parent(model, name)
        setattr(parent, attr, QuantLinear.from_linear(getattr(parent, attr), format, blocksize, double_quant,
                                                      compute_dtype=compute_dtype, quant_storage=quant_storage,
                                                      sparsity=sparsity, mask=(masks or {}).get(name)))
        # The old nn.Linear (and its float weight) has no reference left here and is freed now.
    if dtype is not None:
        model.to(dtype)
    _warn_unquantized(model, list(skip))
    model._qengine_method = record  # what save_quantized / mark_quantized record in quantization_config
    return model


def _check_already_quantized(model: nn.Module, skip: list[str], format, blocksize, double_quant, sparsity,
                             compute_dtype, quant_storage) -> None:
    """Raises ValueError naming the first already-quantized layer (outside skip) whose settings
    differ from the requested ones; layers quantized with the same settings are left as they are."""
    fmt = get_format(format)
    want = {"format": fmt.name, "blocksize": blocksize, "double_quant": double_quant, "sparsity": sparsity}
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear) or _matches(name, skip):
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


def _experts_targets(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the transformers experts modules (3-D expert weights) quantize_model converts."""
    return [name for name, mod in model.named_modules()
            if name and is_experts_module(mod) and not _matches(name, skip)
            and getattr(mod, "_qengine_moe", None) is None]


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
                notable.append((full, n, "3-D expert weight" + (", in skip" if _matches(mname, skip) else "")))
            elif _matches(mname, skip):
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


def _linear_targets(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the nn.Linear layers quantize_model converts (names only: holding the modules
    here would keep their float weights alive during the conversion)."""
    owners: dict[int, set[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mname)
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            if not name:
                return []
            skip.append(name)
            log.info("qengine: %s is nn.MultiheadAttention (reads its projections' weights directly): kept in "
                     "float", name)
        if not isinstance(mod, nn.Linear) or _matches(name, skip):
            continue
        if not name:
            raise TypeError("model is itself an nn.Linear: use QuantLinear.from_linear")
        sharers = owners[id(mod.weight)] - {name}
        if sharers:
            log.warning("qengine: %s.weight is shared with %s (tied weights): kept in float", name,
                        ", ".join(sorted(sharers)))
            continue
        names.append(name)
    experts = {n for n, m in model.named_modules() if n and is_experts_module(m)}
    for pname, p in model.named_parameters():
        if p.dim() >= 3 and pname.rsplit(".", 1)[0] not in experts:
            log.warning("qengine: %s is a %d-D parameter outside a transformers experts module: kept in float",
                        pname, p.dim())
    return names


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
             target_modules: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
             freeze_base: bool = True, init: str = "default", iters: int = 5, format: str | Format = "nf4",
             blocksize: Optional[int] = 64, double_quant: bool = True, experts: bool = False) -> nn.Module:
    """Wraps the target layers of `model` in LoRALinear, in place, and returns `model`.

    target_modules: names (full, last component such as "q_proj", or a parent's name);
    default: every QuantLinear. Targets must be QuantLinear or nn.Linear. With freeze_base,
    only LoRA parameters stay trainable afterwards (mark_only_lora_trainable).

    init: "default" (A Kaiming-uniform, B = 0: the layer starts equal to its base) or "loftq"
    (LoftQ): each target must be a float nn.Linear (default targets: every nn.Linear except
    ``lm_head``), which is quantized here (`format`, `blocksize`, `double_quant`) while
    alternating, `iters` times, Q = quantize(W - s*B@A) and s*B@A = rank-r SVD of W - Q, so the
    quantized base plus the adapter starts closer to W than the quantized weight alone.

    experts: also give the quantized Mixture-of-Experts weights (QuantExpertsWeight, see
    quantize_model) a per-expert adapter (LoRAExperts): all of them when target_modules is None,
    else those whose name (e.g. "gate_up_proj", "down_proj", "experts") matches. Their side path
    runs inside the grouped kernel. Expert weights are never targeted without experts=True.

    Adapters do not stack. The default targets are the layers without one (so a second call
    adapts only the layers added since; ValueError naming a layer when every one already has
    an adapter); a layer named in target_modules that already has one raises ValueError naming
    it, before anything changes: replace the old adapter by its base or merged layer first, or
    name only layers without one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if init not in ("default", "loftq"):
        raise ValueError(f"init must be 'default' or 'loftq', got {init!r}")
    if init == "loftq":
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be a positive int, got {iters!r}")
        _loftq_targets(model, target_modules, r, alpha, format, blocksize, double_quant, iters, dtype)
        if target_modules is None:
            target_modules = [n for n, m in model.named_modules() if isinstance(m, _LoftQ)]
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names, expert_names, adapted = [], [], []
    for name, mod in model.named_modules():
        if name and isinstance(mod, (LoRALinear, LoRAExperts)) and not _inside_lora(model, name):
            if isinstance(mod, LoRALinear) or experts:
                adapted.append(name)
            if target_modules is not None and _matches(name, target_modules) and (isinstance(mod, LoRALinear)
                                                                                  or experts):
                raise ValueError(f"{name} already has a LoRA adapter ({type(mod).__name__}, r={mod.r}); add_lora "
                                 "does not stack adapters. Replace it by its base (.base_layer) or merged layer "
                                 "(LoRALinear.merged_linear()) first, or pass target_modules naming only layers "
                                 "without one")
        if not name or isinstance(mod, (LoRALinear, LoRAExperts)) or _inside_lora(model, name):
            continue
        if isinstance(mod, QuantExpertsWeight):
            if experts and (target_modules is None or _matches(name, target_modules)):
                expert_names.append(name)
        elif target_modules is None:
            if isinstance(mod, QuantLinear):
                names.append(name)
        elif _matches(name, target_modules) and isinstance(mod, (QuantLinear, nn.Linear, _LoftQ)):
            names.append(name)
    for name in expert_names:
        parent, attr = _parent(model, name)
        setattr(parent, attr, LoRAExperts(getattr(parent, attr), r=r, alpha=alpha, dtype=dtype))
    if not names and expert_names:
        if freeze_base:
            mark_only_lora_trainable(model)
        return model
    if not names and target_modules is None and adapted:
        raise ValueError(f"every layer add_lora targets by default already has a LoRA adapter ({adapted[0]}"
                         f"{f' and {len(adapted) - 1} more' if len(adapted) > 1 else ''}); add_lora does not stack "
                         "adapters: train the existing ones, or replace them by their base layers (.base_layer) first")
    if not names:
        raise ValueError(f"no layer of the model matches target_modules={target_modules!r} "
                         "(QuantLinear or nn.Linear layers, by full or last name)")
    for name in names:
        parent, attr = _parent(model, name)
        target = getattr(parent, attr)
        if isinstance(target, _LoftQ):
            layer = LoRALinear(target.base, r=r, alpha=alpha, dropout=dropout, dtype=dtype)
            with torch.no_grad():
                layer.lora_A.copy_(target.lora_A)
                layer.lora_B.copy_(target.lora_B)
        else:
            layer = LoRALinear(target, r=r, alpha=alpha, dropout=dropout, dtype=dtype)
        setattr(parent, attr, layer)
    if freeze_base:
        mark_only_lora_trainable(model)
    return model


class _LoftQ(nn.Module):
    """Transient holder while add_lora(init="loftq") runs: the quantized base and its A, B."""

    def __init__(self, base: QuantLinear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base, self.lora_A, self.lora_B = base, a, b


def loftq(weight: torch.Tensor, r: int, scaling: float, format: str | Format = "nf4", blocksize: Optional[int] = 64,
          double_quant: bool = True, iters: int = 5):
    """LoftQ for one weight W (float [out, in]): returns (q, A [r, in], B [out, r]) with
    dequantize(q) + scaling * B @ A close to W, by alternating q = quantize(W - s*B@A) and
    s*B@A = the rank-r truncated SVD of W - dequantize(q) (computed in float32), `iters` times."""
    from .functional import quantize

    w = weight.detach().to(torch.float32)
    lowrank = torch.zeros_like(w)
    for _ in range(iters):
        q = quantize((w - lowrank).contiguous(), format, blocksize, double_quant)
        u, s, vh = torch.linalg.svd(w - q.dequantize(torch.float32), full_matrices=False)
        root = s[:r].sqrt() / math.sqrt(scaling)
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        lowrank = scaling * (b @ a)
    return q, a, b


def _loftq_targets(model, target_modules, r, alpha, format, blocksize, double_quant, iters, dtype) -> None:
    """Replaces each float nn.Linear target by a _LoftQ holder (add_lora then wraps it)."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = []
    for name, mod in model.named_modules():
        if not name or _inside_lora(model, name):
            continue
        hit = _matches(name, target_modules) if target_modules is not None else not _matches(name, ["lm_head"])
        if not hit:
            continue
        if isinstance(mod, (QuantLinear, LoRALinear)):
            raise ValueError(f"LoftQ needs the float weight, but {name} is already a {type(mod).__name__}: call "
                             "add_lora(init='loftq') on the unquantized model (it quantizes the targets itself)")
        if isinstance(mod, nn.Linear):
            names.append(name)
    if not names:
        raise ValueError(f"no float nn.Linear layer matches target_modules={target_modules!r} for LoftQ")
    for name in names:
        parent, attr = _parent(model, name)
        lin = getattr(parent, attr)
        if r > min(lin.in_features, lin.out_features):
            raise ValueError(f"LoRA rank r={r} exceeds min(in_features, out_features) of {name}")
        q, a, b = loftq(lin.weight, r, alpha / r, format, blocksize, double_quant, iters)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        base = QuantLinear.from_quantized(q, bias)
        setattr(parent, attr, _LoftQ(base, a, b))


def _inside_lora(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), (LoRALinear, LoRAExperts, _LoftQ))
               for i in range(1, len(parts)))


def _lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every adapter: LoRALinear layers and LoRAExperts (per-expert adapters)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B parameters of every LoRALinear in `model` (what an optimizer should train)."""
    return [p for _, m in _lora_modules(model) for p in (m.lora_A, m.lora_B)]


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Sets requires_grad on LoRA parameters only; returns the number of trainable elements."""
    keep = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
                else "embedding" if isinstance(mod, nn.Embedding) else "other")
        if own:
            kinds[kind]["modules"] += 1
        for t in own.values():
            add(kind, t)
    total = {key: sum(v[key] for v in kinds.values()) for key in ("modules", "params", "bytes")}
    kinds["total"] = total
    for v in kinds.values():
        v["bits_per_param"] = 8.0 * v["bytes"] / v["params"] if v["params"] else 0.0
    return kinds


# ---------------------------------------------------------------------- adapters
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]} for every LoRALinear."""
    sd = {}
    for name, mod in _lora_modules(model):
        sd.update(mod.adapter_state_dict(name + "."))
    if not sd:
        raise ValueError("model has no LoRALinear layers (call qengine.add_lora first)")
    return sd


def _adapter_config(model: nn.Module) -> dict:
    return {name: {"r": m.r, "alpha": m.alpha, "in_features": m.in_features, "out_features": m.out_features}
            for name, m in _lora_modules(model)}


def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], config: Optional[dict] = None) -> None:
    """Loads A and B of every LoRALinear from `sd`; the adapter must cover exactly this model's
    LoRA layers with the same shapes (else ValueError naming the first difference). `config`
    (as save_adapter stores it) restores each layer's alpha."""
    mods = dict(_lora_modules(model))
    if not mods:
        raise ValueError("model has no LoRALinear layers (call qengine.add_lora with the adapter's settings first)")
    names = {k.rsplit(".", 1)[0] for k in sd}
    extra = sorted(n for n in names if n not in mods)
    missing = sorted(n for n in mods if n not in names)
    if extra or missing:
        raise ValueError(f"adapter does not match this model: layers only in the adapter {extra[:5]}, layers only "
                         f"in the model {missing[:5]} (an adapter for a different model or target_modules?)")
    for name, mod in mods.items():
        if config is not None and name in config and int(config[name].get("r", mod.r)) != mod.r:
            raise ValueError(f"adapter layer {name} has rank {config[name]['r']}, the model's has {mod.r}")
        mod.load_adapter_state_dict(sd, name + ".")
        if config is not None and name in config:
            mod.alpha = float(config[name]["alpha"])


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the adapter alone (A, B of every LoRALinear, plus ranks and alphas) as safetensors."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "config": json.dumps(_adapter_config(model))}
    from ._io import atomic_path

    with atomic_path(path) as tmp:  # a save killed midway leaves the previous adapter intact
        save_file(sd, tmp, metadata=meta)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Loads an adapter written by save_adapter into the model's LoRALinear layers."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read adapter file {os.fspath(path)!r}: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a qengine LoRA adapter (metadata format "
                         f"{meta.get('format')!r})")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"adapter metadata is corrupt: {e}") from None
    device = next(iter(lora_parameters(model)), torch.empty(0)).device
    load_adapter_state_dict(model, {k: v.to(device) for k, v in sd.items()}, config)
