"""Model-level calibrated quantization, what quantize_model(method="gptq" | "search" |
"gptq+search") runs: calibration inputs captured decoder block by decoder block, each block's
linear layers quantized from their H = X^T X, and (sequential, the default) the quantized block
re-run to give the next block its inputs, as GPTQ does.

Flow for a model with a decoder-block list (find_blocks: e.g. model.model.layers):

1. One *stand-in pass* per calibration batch: every block's forward is replaced by one that
   records its call (the hidden states reaching block 0, and each block's other arguments:
   attention mask, position embeddings / ids, cache disabled) and returns its input unchanged;
   the last one stops the forward. Linears before the blocks are captured here (quantized
   first; in sequential mode the pass then runs again so block 0 sees their quantized output).
2. For each block: pre-hooks on its linears sum H over the stored inputs (sequential mode
   stops each forward once every linear has its input), the linears are quantized by the
   method and swapped in, Mixture-of-Experts weights of the block get round-to-nearest, and
   the block runs again to produce the next block's inputs (non-sequential: the float outputs
   of the hooked pass are used instead, one pass per block).
3. Linears after the blocks (e.g. lm_head when not skipped): one more pass in which block 0
   returns the stored final hidden states and the other blocks pass them through.

A model without such a list (e.g. nn.Sequential) is captured whole: every layer's H from one
pass over the calibration batches, then every layer quantized (non-sequential; an INFO log says
so). The model's float weights stay referenced until every layer is done, so a failure (bad
data, NaN activations, a layer no data reached) restores the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..formats import Format
from ..functional import quantize
from ..moe import expert_weight_names, quantize_experts
from ..nn import QuantExpertsWeight, QuantLinear
from ..nn.experts import check_expert_blocks
from .blockwise import blockwise, run_hooked
from .capture import HessianHooks, calibration_batches, find_blocks
from .gptq import gptq_quantize, gptq_quantize_experts
from .scale_search import search_scales

__all__ = ["METHODS", "Settings", "check_method_args", "quantize_calibrated"]

log = logging.getLogger("qengine")
METHODS = ("rtn", "gptq", "search", "gptq+search")
NEEDS_CALIBRATION = ("gptq", "gptq+search")
DEFAULT_DAMP = 0.01


@dataclass
class Settings:
    format: Format
    blocksize: Optional[int]
    double_quant: bool
    method: str
    damp: float = DEFAULT_DAMP
    act_order: bool = False
    compute_dtype: Optional[torch.dtype] = None
    quant_storage: torch.dtype = torch.uint8

    @property
    def full(self) -> bool:  # the full H (GPTQ), or only its diagonal (scale search)
        return self.method in NEEDS_CALIBRATION


def check_method_args(method: object, calibration: object, damp: object, act_order: object, sequential: object,
                      sparsity: object, masks: object) -> None:
    """ValueError / TypeError for settings quantize_model cannot honour, before any work."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    for name, flag in (("act_order", act_order), ("sequential", sequential)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of the mean diagonal of H), got {damp!r}")
    if method in NEEDS_CALIBRATION and calibration is None:
        raise ValueError(f"method={method!r} needs calibration data: pass calibration= (token ids [batch, seq_len], a "
                         "dict of model inputs, or an iterable of batches), e.g. 64 sequences of 512 tokens")
    if method == "rtn" and calibration is not None:
        raise ValueError("method='rtn' uses no calibration data; pass method='gptq', 'search' or 'gptq+search' to use "
                         "it, or drop calibration=")
    gptq_only = "applies to GPTQ (method='gptq' or 'gptq+search')"
    if act_order and method not in NEEDS_CALIBRATION:
        raise ValueError(f"act_order=True {gptq_only}, not to method={method!r}")
    if damp != DEFAULT_DAMP and method not in NEEDS_CALIBRATION:
        raise ValueError(f"damp {gptq_only}, not to method={method!r}")
    if not sequential and calibration is None:
        raise ValueError("sequential=False applies to calibration data (it says whose outputs feed the next block); "
                         f"method={method!r} without calibration= has none")
    if method != "rtn" and (sparsity is not None or masks is not None):
        raise ValueError(f"sparsity and masks work with method='rtn' only, not method={method!r}")


@contextlib.contextmanager
def _calibration_mode(model: nn.Module):
    """eval mode (no dropout), no KV cache, no autograd; restored afterwards."""
    training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        if use_cache is not None:
            config.use_cache = use_cache


def quantize_layer(linear: nn.Linear, H: Optional[torch.Tensor], rows: int, s: Settings, name: str,
                   factor_cache: Optional[dict] = None) -> QuantLinear:
    """The QuantLinear of one float linear quantized by s.method from its input statistics:
    H float32 [in, in] (GPTQ) or its diagonal [in] (search; None: data-free search), `rows` the
    number of input rows summed into it; factor_cache as in gptq_quantize."""
    w = linear.weight.detach()
    w = w if w.is_contiguous() else w.contiguous()
    try:
        if s.method == "rtn":  # a plan's round-to-nearest layer inside a calibrated run
            q = quantize(w, s.format, s.blocksize, s.double_quant)
        elif s.method == "search":
            imp = None if H is None else (H if H.dim() == 1 else H.diagonal()) / max(rows, 1)
            q = search_scales(w, s.format, s.blocksize, s.double_quant, importance=imp)
        else:
            q = gptq_quantize(w, H, s.format, s.blocksize, s.double_quant, damp=s.damp, act_order=s.act_order,
                              search=s.method == "gptq+search", factor_cache=factor_cache)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    bias = None if linear.bias is None else linear.bias.detach().clone().requires_grad_(linear.bias.requires_grad)
    return QuantLinear.from_quantized(q, bias, compute_dtype=s.compute_dtype, quant_storage=s.quant_storage)


class _Swaps:
    """Layer replacements made so far, undone in reverse by restore()."""

    def __init__(self, model: nn.Module):
        self.model, self.done = model, []

    def replace(self, name: str, new: nn.Module) -> None:
        path, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(path) if path else self.model
        self.done.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, new)

    def experts(self, mod: nn.Module, s: Settings, layers: Optional[dict] = None) -> None:
        """Quantizes an experts module: its weights replaced by `layers` ({attr:
        QuantExpertsWeight}) when given, else by round-to-nearest."""
        config = getattr(mod, "config", None)
        saved = ({a: getattr(mod, a) for a in expert_weight_names(mod)}, getattr(config, "_experts_implementation", None))
        self.done.append((mod, None, saved))
        for attr, layer in (layers or {}).items():
            delattr(mod, attr)
            setattr(mod, attr, layer)
        quantize_experts(mod, s.format, s.blocksize, s.double_quant)  # the rest (RTN), layout, implementation

    def restore(self) -> None:
        for parent, attr, old in reversed(self.done):
            if attr is not None:
                setattr(parent, attr, old)
                continue
            weights, impl = old
            for a, t in weights.items():
                delattr(parent, a)
                setattr(parent, a, t)
            parent.__dict__.pop("_qengine_moe", None)
            if getattr(parent, "config", None) is not None:
                parent.config._experts_implementation = impl
        self.done = []


def _quantize_names(model: nn.Module, names: list[str], hooks: Optional[HessianHooks], s: Settings,
                    swaps: _Swaps, per_layer: Optional[dict] = None) -> int:
    """Quantizes the named float linears from the hooks' statistics (each by its own Settings
    when per_layer, a plan, names it); returns the rows of the first one (the calibration
    token count)."""
    rows0, cache = 0, {}
    base = s
    for name in names:
        s = (per_layer or {}).get(name, base)
        if hooks is not None and not hooks.seen(name):
            raise ValueError(f"no calibration data reached {name} (its forward never ran on the calibration batches): "
                             "pass calibration inputs that exercise it, or add it to skip")
        H, rows = hooks.hessian(name) if hooks is not None else (None, 0)
        rows0 = rows0 or rows
        swaps.replace(name, quantize_layer(model.get_submodule(name), H, rows, s, name, cache))
    return rows0


def _quantize_experts(model: nn.Module, name: str, hooks: HessianHooks, s: Settings, swaps: _Swaps) -> None:
    """Calibrates an experts module's two 3-D weights expert by expert (gptq_quantize_experts)
    from the tokens the router sent to each expert."""
    mod = model.get_submodule(name)
    layers, idle = {}, 0
    for which, attr in zip(("up", "down"), expert_weight_names(mod)):
        w = getattr(mod, attr).detach()
        w = (w.transpose(1, 2) if mod.is_transposed else w).contiguous()
        E, N, K = w.shape
        check_expert_blocks(N, K, s.blocksize)
        if (N * K * s.format.bits) % 8:
            raise ValueError(f"{name}.{attr}: one expert's {N}x{K} weight does not fill whole bytes at "
                             f"{s.format.bits} bits")
        hessians = hooks.expert_hessians(name, which, E)
        if all(H is None for H, _ in hessians):
            raise ValueError(f"no calibration data reached {name} (its forward never ran on the calibration "
                             "batches): pass calibration inputs that exercise it, or add it to skip")
        idle = sum(H is None for H, _ in hessians)
        try:
            q = gptq_quantize_experts(w, hessians, s.format, s.blocksize, s.double_quant, damp=s.damp,
                                      act_order=s.act_order, search=s.method in ("search", "gptq+search"),
                                      gptq=s.method in NEEDS_CALIBRATION)
        except ValueError as e:
            raise ValueError(f"{name}.{attr}: {e}") from None
        layer = QuantExpertsWeight.from_quantized(q)
        layer.num_experts, layer.expert_out_features = E, N
        layers[attr] = layer
    if idle:
        log.info("qengine: %s: %d of %d experts received no calibration tokens and are rounded to nearest", name,
                 idle, len(hessians))
    swaps.experts(mod, s, layers)


def quantize_calibrated(model: nn.Module, names: list[str], experts: list[str], calibration: object, s: Settings,
                        sequential: bool = True, progress: bool = False, per_layer: Optional[dict] = None) -> dict:
    """Quantizes the float linears `names` of `model` in place by s.method (and the transformers
    experts modules `experts` by round-to-nearest); see the module docstring for the flow.

    Peak memory, blockwise: the float model + the hidden states of all calibration tokens
    (tokens x hidden size, in the model's dtype) + each block's call arguments per batch
    (masks, position embeddings; shared between blocks) + one block's forward temporaries for
    one chunk of about CHUNK_TOKENS tokens + one block's H (float32 in^2 per distinct input:
    23 MiB for a Llama block of hidden 768 and MLP 2048; only the diagonals for search) + the
    quantized layers made so far (kept beside the float ones until the end, for the restore).
    Whole-model capture: every layer's H at once instead of one block's.

    per_layer: {name: Settings} of the layers whose settings differ from s (a plan); s.method
    must then be one that captures what every layer needs (the full H when any is GPTQ).

    Returns {"method", "mode" ("blocks", "whole-model" or "data-free"), "sequential", "tokens"
    (rows each layer's H summed), "blocks", "seconds"}.
    """
    t0 = time.perf_counter()
    batches = calibration_batches(calibration, model) if calibration is not None else None
    swaps = _Swaps(model)
    info = {"method": s.method, "sequential": sequential and batches is not None, "blocks": 0, "tokens": 0}
    try:
        with _calibration_mode(model):
            if batches is None:
                info.update(mode="data-free", tokens=_quantize_names(model, names, None, s, swaps, per_layer))
                done = set()
            else:
                found = find_blocks(model, names)
                result = None if found is None else blockwise(
                    model, found, names, experts, batches, s.full, sequential,
                    lambda nms, hooks: _quantize_names(model, nms, hooks, s, swaps, per_layer),
                    lambda e, hooks: _quantize_experts(model, e, hooks, s, swaps),
                    f"{s.method} blocks" if progress else None)
                if result is None:
                    log.info("qengine: no decoder-block list found in %s: capturing every linear layer's inputs in "
                             "one pass over the calibration data (non-sequential; all H resident at once)",
                             type(model).__name__)
                    result = (_whole_model(model, names, experts, batches, s, swaps, per_layer), 0, set(experts))
                    info["sequential"] = False
                info["tokens"], info["blocks"], done = result
                info["mode"] = "blocks" if info["blocks"] else "whole-model"
            rest = [e for e in experts if e not in done]
            for name in rest:
                swaps.experts(model.get_submodule(name), s)
            if rest:
                log.info("qengine: %d Mixture-of-Experts modules (3-D expert weights, e.g. %s) are quantized with "
                         "round-to-nearest: %s", len(rest), rest[0], "method='search' without calibration data"
                         if batches is None else "they lie outside the decoder blocks")
    except BaseException:
        swaps.restore()
        raise
    info["seconds"] = time.perf_counter() - t0
    log.info("qengine: %s quantized %d linear layers (%s%s) on %d calibration tokens in %.1f s", s.method, len(names),
             info["mode"], f", {info['blocks']} blocks, {'sequential' if info['sequential'] else 'non-sequential'}"
             if info["blocks"] else "", info["tokens"], info["seconds"])
    return info


def _whole_model(model, names, experts, batches, s, swaps, per_layer=None) -> int:
    hooks = run_hooked(model, HessianHooks({n: model.get_submodule(n) for n in names}, s.full, stop=True,
                                           experts={e: model.get_submodule(e) for e in experts}), batches)
    tokens = _quantize_names(model, names, hooks, s, swaps, per_layer)
    for e in experts:
        _quantize_experts(model, e, hooks, s, swaps)
    return tokens
