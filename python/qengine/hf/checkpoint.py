"""Hugging Face checkpoints on disk: quantize one tensor at a time, save and load quantized
models (safetensors + a `quantization_config` in config.json), and the bitsandbytes layout.

A qengine checkpoint is the model's state dict, in which each quantized nn.Linear appears as
QuantLinear stores it (`<module>.weight.<part>` flat tensors plus `<module>.bias`), in
`model.safetensors`, with config.json's `quantization_config` =
{"quant_method": "qengine", "format", "blocksize", "double_quant", "modules", "qengine_version",
"method"} and, for calibrated methods, "calibration_tokens", "sequential" and (GPTQ) "damp",
"act_order": a record of how the codes were chosen; every method stores the same layout, so
loading only checks these fields' types. A model whose layers differ (quantize_model(plan=...))
adds "plan": {module: {"format", "blocksize", "double_quant", "method"} or "float16"}, one entry
per planned module; "format", "blocksize" and "double_quant" then give the most common setting.
Quantized embeddings (QuantEmbedding, e.g. a GGUF token_embd) add "embeddings": [module names];
their state is the same flat layout under `<module>.weight.`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .._version import __version__
from .._io import atomic_path
from .._targets import linear_targets, parent_of
from ..formats import get_format
from ..functional import quantize
from ..moe import is_experts_module, is_float_expert_weight, quantize_experts
from ..nn import QuantEmbedding, QuantExpertsWeight, QuantLinear
from .gpt_oss import is_mxfp4_config, load_mxfp4_experts
from .qconfig import CALIBRATION_KEYS, QUANT_METHOD, check_plan_entries, check_quantization_config

__all__ = ["QUANT_METHOD", "layer_settings", "check_plan_entries",
           "check_quantization_config", "require_transformers", "load_config", "build_model", "quantizable_linears",
           "load_model", "save_quantized", "quantize_checkpoint", "iter_checkpoint_tensors", "saved_quantization_config",
           "copy_side_files", "CALIBRATION_KEYS"]

log = logging.getLogger("qengine")
SAFETENSORS_NAME = "model.safetensors"


def require_transformers():
    """The transformers module, or an ImportError that says how to get it."""
    try:
        import transformers
    except ImportError:
        from .._version import install_hint
        raise ImportError(f"this needs Hugging Face transformers: {install_hint('hf')}") from None
    return transformers


def load_config(model_dir: str | os.PathLike):
    """The transformers config of a model directory, with clear errors for a missing or
    malformed directory."""
    transformers = require_transformers()
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} has no config.json: not a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return transformers.AutoConfig.from_pretrained(model_dir)
    except (json.JSONDecodeError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path} is not a valid model config: {e}") from None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init cost);
    buffers (e.g. rotary frequencies, computed in __init__) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_model(config, empty: bool = False) -> nn.Module:
    """A causal-LM of `config` (random init), or with `empty` its parameters on the meta device."""
    transformers = require_transformers()
    ctx = _parameters_on_meta() if empty else contextlib.nullcontext()
    with ctx:
        return transformers.AutoModelForCausalLM.from_config(config)


def quantizable_linears(model: nn.Module, skip: Sequence[str]) -> list[str]:
    """Names of the nn.Linear modules quantize_model converts (the same rule: not skipped, not
    sharing their weight with another module, not inside nn.MultiheadAttention)."""
    return linear_targets(model, list(skip))


def _checkpoint_files(model_dir: str) -> list[str]:
    single = os.path.join(model_dir, SAFETENSORS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is malformed: {e}") from None
        paths = [os.path.join(model_dir, f) for f in files]
        for p in paths:
            if not os.path.isfile(p):
                raise ValueError(f"{index} names {os.path.basename(p)}, which is missing")
        return paths
    raise ValueError(f"{model_dir!r} has no model.safetensors (or sharded index): only safetensors checkpoints "
                     "are read")


def iter_checkpoint_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a safetensors checkpoint (sharded or not), one at a
    time, so at most one tensor is resident."""
    from safetensors import SafetensorError, safe_open

    for path in _checkpoint_files(os.fspath(model_dir)):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"cannot read {path}: {e}") from None


def saved_quantization_config(model_config) -> Optional[dict]:
    """The quantization_config a transformers config records, as a dict (None: a float model)."""
    qc = getattr(model_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc


def layer_settings(model: nn.Module) -> tuple:
    """(format name, blocksize, double_quant, plan entries or None) of a quantized model's
    QuantLinear layers: their one setting, or with several (or a plan on the model) the most
    common one plus {module: entry} for every planned module. ValueError without any layer."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("model has no QuantLinear layers (quantize it with qengine.quantize_model first)")
    kinds = [(m.format.name, m.blocksize if not m.per_row else None, m.double_quant) for _, m in layers]
    common = max(sorted(set(kinds), key=str), key=kinds.count)
    planned = getattr(model, "_qengine_plan", None)
    if len(set(kinds)) == 1 and planned is None:
        return (*common, None)
    method = getattr(model, "_qengine_method", {}).get("method", "rtn")
    entries = {}
    if planned is not None:
        entries.update({n: "float16" for n, c in planned.entries.items() if c == "float16"})
        method_of = {n: c.method for n, c in planned.quantized().items()}
    else:
        method_of = {}
    for (n, _), (f, bs, dq) in zip(layers, kinds):
        entries[n] = {"format": f, "blocksize": bs, "double_quant": dq, "method": method_of.get(n, method)}
    return (*common, entries)


def configured_module(model: nn.Module, name: str, kind: type = nn.Linear, what: str = "module") -> nn.Module:
    """The `kind` module (nn.Linear; nn.Embedding for "embeddings") that a quantization_config
    names `name`: a ValueError where the model has no such module, or where it is another kind."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"quantization_config names {what} {name!r}, which this model does not have") from None
    if not isinstance(module, kind):
        raise ValueError(f"quantization_config names {name!r}, a {type(module).__name__}, not an nn.{kind.__name__}")
    return module


def _skeleton(model: nn.Module, qc: dict) -> None:
    """Replaces the named linears of a meta-device model by empty QuantLinear layers of the
    recorded layout, then gives every remaining meta parameter real (uninitialised) storage
    for load_state_dict to fill."""
    plan = qc.get("plan") or {}
    experts_modules = set()
    for name in qc["modules"]:
        entry = plan.get(name) if isinstance(plan.get(name), dict) else qc
        fmt, bs = get_format(entry["format"]), entry["blocksize"]
        parent, attr = parent_of(model, name)
        if is_float_expert_weight(parent, attr):
            # A Mixture-of-Experts weight [E, N, K] (or [E, K, N] transposed): an empty quantized one.
            E, a, b = getattr(parent, attr).shape
            N, K = (b, a) if parent.is_transposed else (a, b)
            delattr(parent, attr)
            setattr(parent, attr, QuantExpertsWeight(E, N, K, format=fmt, blocksize=bs,
                                                     double_quant=bool(entry["double_quant"])))
            experts_modules.add(parent)
            continue
        lin = configured_module(model, name)
        setattr(parent, attr, QuantLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, format=fmt,
                                          blocksize=bs, double_quant=bool(entry["double_quant"])))
    _embedding_skeletons(model, qc.get("embeddings") or [])
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
    for experts in experts_modules:
        quantize_experts(experts)  # both weights are quantized already: records the layout and the implementation


def _embedding_skeletons(model: nn.Module, names: object) -> None:
    """Replaces the embeddings a quantization_config's "embeddings" names by empty QuantEmbedding
    layers, which take whatever quantized layout the checkpoint holds."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"quantization_config's embeddings must be a list of module names, got {names!r}")
    for name in names:
        emb = configured_module(model, name, nn.Embedding, "embedding")
        parent, attr = parent_of(model, name)
        setattr(parent, attr, QuantEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx))


def load_model(model_dir: str | os.PathLike, format: Optional[str] = None, blocksize: Optional[int] = 64,
               double_quant: bool = True, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """A causal LM from `model_dir`: a qengine-quantized checkpoint loads as is (never
    re-quantized); a float checkpoint is quantized layer by layer when `format` is given."""
    from ..model import quantize_model

    model_dir = os.fspath(model_dir)
    config = load_config(model_dir)
    qc = saved_quantization_config(config)
    if qc is not None and is_mxfp4_config(qc):  # gpt-oss's MXFP4 experts, loaded as they are (hf/gpt_oss.py)
        del config.quantization_config
        return load_mxfp4_experts(build_model(config, empty=True), iter_checkpoint_tensors(model_dir))
    if qc is not None and qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{model_dir!r} is quantized with {qc.get('quant_method')!r}; qengine loads its own "
                         "checkpoints and float ones")
    if qc is not None:
        check_quantization_config(qc, f"{model_dir}/config.json")
        model = build_model(config, empty=True)
        _skeleton(model, qc)
        state = dict(iter_checkpoint_tensors(model_dir))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) \
            else set()
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(f"checkpoint {model_dir!r} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if tied:
            model.tie_weights()
        model._qengine_method = {k: qc[k] for k in ("method", *CALIBRATION_KEYS) if qc.get(k) is not None}
        if qc.get("plan"):
            from ..calibrate.plan import Plan

            model._qengine_plan = Plan.from_dict({"entries": qc["plan"]})
        return model.eval()
    transformers = require_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if format is not None:
        quantize_model(model, format, blocksize, double_quant, skip=skip, progress=False)
    return model.eval()


def _write_config(config, out_dir: str, quantization_config: dict) -> None:
    cfg = config.to_dict()
    cfg["quantization_config"] = quantization_config
    with atomic_path(os.path.join(out_dir, "config.json")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)


def _save_tensors(tensors: dict, out_dir: str, metadata: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(os.path.join(out_dir, SAFETENSORS_NAME)) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _quantization_config(fmt: str, blocksize, double_quant: bool, modules: list[str],
                         record: Optional[dict] = None, plan: Optional[dict] = None,
                         embeddings: Optional[list[str]] = None) -> dict:
    """`record`: how the codes were chosen ({"method", ...}; quantize_model leaves it on the model
    as _qengine_method); default round-to-nearest. `plan`: per-module entries (layer_settings).
    `embeddings`: the QuantEmbedding modules' names."""
    qc = {"quant_method": QUANT_METHOD, "format": fmt, "blocksize": blocksize, "double_quant": double_quant,
          "modules": modules, "qengine_version": __version__, "method": "rtn", **(record or {})}
    if plan is not None:
        qc["plan"] = plan
    if embeddings:
        qc["embeddings"] = embeddings
    return qc


def save_quantized(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Writes a model converted by quantize_model as a qengine checkpoint (see module doc),
    recording the method quantize_model used (and its calibration settings)."""
    out_dir = os.fspath(out_dir)
    fmt, bs, dq, plan = layer_settings(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    state, seen = {}, set()
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ptr in seen:  # tied weights: stored once, re-tied on load
            continue
        seen.add(ptr)
        state[key] = t.detach().contiguous().cpu()
    os.makedirs(out_dir, exist_ok=True)
    _save_tensors(state, out_dir, {"format": "pt"})
    embeddings = [n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]
    _write_config(model.config, out_dir, _quantization_config(fmt, bs, dq, [n for n, _ in layers],
                                                              getattr(model, "_qengine_method", None), plan,
                                                              embeddings))


def quantize_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, format: str = "nf4",
                        blocksize: Optional[int] = 64, double_quant: bool = True,
                        skip: Sequence[str] = ("lm_head",), bnb: bool = False, progress: bool = True) -> dict:
    """Quantizes a float safetensors checkpoint tensor by tensor into out_dir (qengine layout,
    or with `bnb` the transformers + bitsandbytes 4-bit layout). Peak memory: one float tensor
    plus the quantized output. Returns {"bytes_in", "bytes_out", "layers"}."""
    from ..compat.bnb import to_bnb_state_dict
    from ._files import page_out

    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ValueError("the output directory must differ from the model directory")
    config = load_config(model_dir)
    if saved_quantization_config(config) is not None:
        raise ValueError(f"{model_dir!r} is already quantized ({saved_quantization_config(config).get('quant_method')})")
    fmt = get_format(format)
    if bnb and fmt.name not in ("nf4", "fp4"):
        raise ValueError(f"the bitsandbytes layout holds nf4 or fp4 weights, not {fmt.name}")
    _checkpoint_files(model_dir)  # fail on a directory without weights before any work
    skeleton = build_model(config, empty=True)
    targets = set(quantizable_linears(skeleton, skip))
    if any(is_experts_module(m) for m in skeleton.modules()):
        log.warning("qengine: %s is a Mixture-of-Experts model; the streaming quantizer keeps its per-expert "
                    "checkpoint matrices in float. Load it with from_pretrained(quantization_config=QEngineConfig()) "
                    "or qengine.hf.load_model(format=...), then save_pretrained / save_quantized, to quantize the "
                    "experts too", model_dir)
    keys = {f"{n}.weight": n for n in targets}
    out, bytes_in = {}, 0
    items = iter_checkpoint_tensors(model_dir)
    if progress:
        try:
            from tqdm.auto import tqdm
            items = tqdm(items, desc="quantizing", unit="tensor")
        except ImportError:
            pass
    found = set()
    for key, t in items:
        bytes_in += t.numel() * t.element_size()
        if key in keys and t.dim() == 2 and t.is_floating_point():
            q = quantize(t.float().contiguous(), fmt, blocksize, double_quant)
            out.update(to_bnb_state_dict(q, key) if bnb else q.state_dict(key + "."))
            found.add(keys[key])
            page_out(t)  # the float weight was read through mmap: drop its pages from our RSS now
        else:
            out[key] = t
        del t
    missing = sorted(targets - found)
    if missing:
        raise ValueError(f"checkpoint lacks the weights of {missing[:5]}")
    bytes_out = sum(t.numel() * t.element_size() for t in out.values())
    os.makedirs(out_dir, exist_ok=True)
    _save_tensors(out, out_dir, {"format": "pt"})
    if bnb:
        qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
              "bnb_4bit_quant_type": fmt.name, "bnb_4bit_use_double_quant": double_quant,
              "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
              "llm_int8_skip_modules": list(skip)}
    else:
        qc = _quantization_config(fmt.name, blocksize, double_quant, sorted(found))
    _write_config(config, out_dir, qc)
    copy_side_files(model_dir, out_dir)
    return {"bytes_in": bytes_in, "bytes_out": bytes_out, "layers": len(found)}


def copy_side_files(model_dir: str, out_dir: str) -> None:
    """Copies the generation config and tokenizer files of model_dir (those present) to out_dir."""
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            with open(src, "rb") as f, atomic_path(os.path.join(out_dir, name)) as tmp:
                with open(tmp, "wb") as g:
                    g.write(f.read())
