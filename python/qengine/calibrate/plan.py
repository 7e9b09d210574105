"""Per-layer precision under a size budget: qengine.plan measures how much each candidate
setting (format x block size x double quant x method, or "keep 16-bit") damages each linear
layer, and picks one per layer minimising the total damage under a budget in bits per
parameter, counted as stored (QuantizedTensor.nbytes: codes, scales, nested state, table).

Damage of a candidate on layer l (sensitivity=):
- "proxy" (default): g_l * e_l(c), with e_l(c) = tr((W - Ŵ) H (W - Ŵ)^T) / tokens the layer's
  output error on the calibration inputs (H = X^T X from the float model) and g_l the layer's
  gain, measured once: the model's calibration loss increase (KL of the quantized model's
  next-token distribution from the float model's; mean squared output change for models
  without logits) when only that layer takes its worst candidate, over e_l(worst). One
  forward pass per layer.
- "loss": that loss increase measured for every candidate of every layer (one pass each).
- "output": e_l(c) alone (no pass; ranks layers by raw output error, blind to what follows).
The choice is a multiple-choice knapsack solved by dynamic programming over bytes (costs
rounded *up* to a granularity of at most 2^16 steps, so the budget holds exactly), then a
greedy pass spends the bytes the rounding left over. Deterministic: ties go to the earlier
(cheaper) candidate.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .._targets import experts_targets, linear_targets
from ..formats import get_format
from ..functional import quantize
from ..tensor import QuantizedTensor
from .blockwise import each_hessian
from .knapsack import choose
from .capture import calibration_batches
from .gptq import gptq_quantize
from .scale_search import search_scales

__all__ = ["Candidate", "FLOAT16", "Plan", "DEFAULT_CANDIDATES", "plan", "each_hessian", "quantize_candidate",
           "SENSITIVITIES"]

FLOAT16 = "float16"
PLAN_METHODS = ("rtn", "search", "gptq", "gptq+search")
SENSITIVITIES = ("proxy", "loss", "output")


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer: a qengine format, block size (None: per row), double
    quantization and the method choosing the codes ("rtn", "search", "gptq", "gptq+search")."""
    format: str
    blocksize: Optional[int] = 64
    double_quant: bool = True
    method: str = "gptq+search"

    def __post_init__(self):
        object.__setattr__(self, "format", get_format(self.format).name)  # ValueError naming the formats
        if self.method not in PLAN_METHODS:
            raise ValueError(f"candidate method must be one of {PLAN_METHODS}, got {self.method!r}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"candidate double_quant must be a bool, got {self.double_quant!r}")
        if self.blocksize is not None and (isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int)):
            raise TypeError(f"candidate blocksize must be an int or None, got {self.blocksize!r}")

    @property
    def label(self) -> str:
        return f"{self.format}/{self.blocksize or 'row'}{'/dq' if self.double_quant else ''}/{self.method}"

    def to_dict(self) -> dict:
        return {"format": self.format, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "method": self.method}

    @classmethod
    def from_any(cls, c: object) -> Union["Candidate", str]:
        if isinstance(c, Candidate) or c == FLOAT16:
            return c
        if isinstance(c, dict):
            unknown = set(c) - {"format", "blocksize", "double_quant", "method"}
            if unknown or "format" not in c:
                raise ValueError(f"a candidate dict has keys format, blocksize, double_quant, method; got {sorted(c)}")
            return cls(**c)
        raise TypeError(f"a candidate is a Candidate, a dict or {FLOAT16!r}, got {c!r}")


def default_candidates(calibrated: bool = True) -> list:
    m = "gptq+search" if calibrated else "rtn"
    return ([Candidate("nf4", bs, True, m) for bs in (256, 128, 64, 32)]
            + [Candidate("int4", bs, True, m) for bs in (128, 64, 32)]
            + [Candidate("int8", 64, True, m), FLOAT16])


DEFAULT_CANDIDATES = default_candidates()


@dataclass
class Plan:
    """One setting per module: {name: Candidate or "float16"}; plus what it was planned for
    (budget in bits per parameter, stored bytes and parameters of the planned layers, each
    layer's estimated damage). Data: to_dict / from_dict / save / load; str() is a table."""
    entries: dict
    budget: Optional[float] = None
    bytes: int = 0
    params: int = 0
    damage: dict = field(default_factory=dict)
    sensitivity: str = ""
    # {module: [{"candidate", "bytes", "error", "damage"}]}: what plan() measured (not saved)
    measurements: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes / self.params if self.params else 0.0

    def quantized(self) -> dict:
        """{name: Candidate} of the modules the plan quantizes."""
        return {n: c for n, c in self.entries.items() if c != FLOAT16}

    def to_dict(self) -> dict:
        return {"entries": {n: (c if c == FLOAT16 else c.to_dict()) for n, c in self.entries.items()},
                "budget": self.budget, "bytes": self.bytes, "params": self.params, "damage": dict(self.damage),
                "sensitivity": self.sensitivity}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("entries"), dict) or not d["entries"]:
            raise ValueError("a plan dict needs a non-empty 'entries' mapping {module: settings or 'float16'}")
        entries = {}
        for n, c in d["entries"].items():
            try:
                entries[n] = Candidate.from_any(c)
            except (TypeError, ValueError) as e:
                raise ValueError(f"plan entry {n!r}: {e}") from None
        return cls(entries, d.get("budget"), int(d.get("bytes", 0)), int(d.get("params", 0)),
                   dict(d.get("damage", {})), d.get("sensitivity", ""))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read plan {os.fspath(path)!r}: {e}") from None
        return cls.from_dict(d)

    def __str__(self) -> str:
        w = max([len(n) for n in self.entries] + [6])
        lines = [f"{'module':{w}s}  {'format':7s} {'block':>5s} {'dq':>3s} {'method':12s} {'damage':>10s}"]
        for n, c in self.entries.items():
            dmg = self.damage.get(n)
            d = "" if dmg is None else f"{dmg:10.3e}"
            if c == FLOAT16:
                lines.append(f"{n:{w}s}  {'float16':7s} {'':>5s} {'':>3s} {'':12s} {d}")
            else:
                lines.append(f"{n:{w}s}  {c.format:7s} {str(c.blocksize or 'row'):>5s} {'yes' if c.double_quant else 'no':>3s}"
                             f" {c.method:12s} {d}")
        budget = "" if self.budget is None else f" (budget {self.budget:g})"
        lines.append(f"{len(self.entries)} modules, {self.params:,} parameters, {self.bytes:,} bytes stored: "
                     f"{self.bits_per_param:.4f} bits per parameter{budget}")
        return "\n".join(lines)


def quantize_candidate(w: torch.Tensor, c: Candidate, H: Optional[torch.Tensor], rows: int = 1,
                       damp: float = 0.01, factor_cache: Optional[dict] = None) -> QuantizedTensor:
    """w float [out, in] quantized by candidate c; H float32 [in, in] (None: data-free, allowed
    for rtn and search only), `rows` the inputs summed into it."""
    w = w.detach().contiguous()
    if c.method == "rtn":
        return quantize(w, c.format, c.blocksize, c.double_quant)
    if c.method == "search":
        imp = None if H is None else H.diagonal() / max(rows, 1)
        return search_scales(w, c.format, c.blocksize, c.double_quant, importance=imp)
    if H is None:
        raise ValueError(f"method {c.method!r} needs calibration data")
    return gptq_quantize(w, H, c.format, c.blocksize, c.double_quant, damp=damp, search=c.method == "gptq+search",
                         factor_cache=factor_cache)




class LossProbe:
    """The model's calibration loss increase when some weights change: KL(float || model) of
    the next-token distributions (mean per token) for outputs with .logits, else the mean
    squared change of the output; over calibration batches up to about `tokens` tokens."""

    def __init__(self, model: nn.Module, calibration, tokens: int):
        self.model, self.kl = model, False
        batches, count = [], 0
        for b in calibration_batches(calibration, model):
            batches.append(b)
            first = b[0][0] if b[0] else next(iter(b[1].values()))
            count += first.numel() if isinstance(first, torch.Tensor) else 1
            if count >= tokens:
                break
        self.batches = batches
        self.reference = [self._out(b) for b in batches]
        self.passes = 0

    def _out(self, batch) -> torch.Tensor:
        out = self.model(*batch[0], **batch[1])
        logits = getattr(out, "logits", None)
        if logits is not None:
            self.kl = True
            return torch.log_softmax(logits.float(), dim=-1)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def __call__(self) -> float:
        self.passes += 1
        total, n = 0.0, 0
        for b, ref in zip(self.batches, self.reference):
            out = self._out(b)
            if self.kl:
                total += float((ref.exp() * (ref - out)).sum())
                n += ref[..., 0].numel()
            else:
                total += float((out - ref).square().sum())
                n += ref.numel()
        return total / max(n, 1)


def _check_budget(budget: object) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bits per parameter, got {budget!r}")
    return float(budget)


def check_candidates(candidates: object) -> list:
    if isinstance(candidates, (str, dict, Candidate)) or not isinstance(candidates, Sequence) or not candidates:
        raise ValueError("candidates must be a non-empty list of Candidate, dicts or 'float16'")
    out = []
    for c in candidates:
        c = Candidate.from_any(c)
        if c not in out:
            out.append(c)
    return out


def plan(model: nn.Module, calibration, budget: float = 4.25, candidates: Optional[Sequence] = None,
         skip: Sequence[str] = ("lm_head",), sensitivity: str = "proxy", damp: float = 0.01,
         loss_tokens: int = 4096, log: Optional[Callable[[str], None]] = None) -> Plan:
    """The Plan minimising the estimated total damage of the float `model`'s linear layers
    (those quantize_model would convert, outside `skip`) with at most `budget` bits per
    parameter over them, counted as stored (QuantizedTensor.nbytes; "float16" = 2 bytes).

    Args:
        calibration: as quantize_model's (token ids [batch, seq_len], a dict of inputs, an
            iterable of batches); H of each layer's inputs comes from the float model on it.
        candidates: Candidate / dict / "float16" list (default DEFAULT_CANDIDATES: NF4 at blocks
            256..32, int4 at 128..32, int8 at 64, all double-quantized GPTQ+search, and float16).
        sensitivity: "proxy", "loss" or "output" (module docstring); loss_tokens: calibration
            tokens the loss passes use (the first batches).
    The model is left unchanged (each measurement swaps one weight and restores it).
    Raises ValueError when even the cheapest candidates exceed the budget (naming the least
    achievable bits per parameter), for bad arguments, and for layers no data reached."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    budget = _check_budget(budget)
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    if calibration is None:
        raise ValueError("plan needs calibration data (token ids [batch, seq_len] of real text, a dict of model "
                         "inputs or an iterable of batches): each layer's sensitivity is measured on it")
    cands = check_candidates(DEFAULT_CANDIDATES if candidates is None else candidates)
    say = log or (lambda msg: None)
    skip = [skip] if isinstance(skip, str) else list(skip)
    names = linear_targets(model, skip)
    experts = experts_targets(model, skip)
    if experts:
        raise ValueError(f"plan covers nn.Linear layers; {experts[0]} holds Mixture-of-Experts weights: add it to "
                         "skip (and quantize it with quantize_model afterwards)")
    if not names:
        raise ValueError("the model has no float nn.Linear layer to plan (all skipped or already quantized?)")
    t0 = time.perf_counter()
    measured: dict = {}

    def on_hessian(name, H, rows):
        w = model.get_submodule(name).weight.detach().float()
        cache: dict = {}
        H64, rows_ = H.double(), max(rows, 1)
        per = []
        for c in cands:
            if c == FLOAT16:
                q, w_hat, nbytes = None, w.to(torch.float16).float(), 2 * w.numel()
            else:
                try:
                    q = quantize_candidate(w, c, H, rows, damp, cache)
                except ValueError as e:
                    raise ValueError(f"{name}, candidate {c.label}: {e}") from None
                w_hat, nbytes = q.dequantize(torch.float32), q.nbytes
            D = (w_hat - w).double()
            per.append({"candidate": c, "bytes": int(nbytes), "error": float(((D @ H64) * D).sum()) / rows_, "q": q})
        measured[name] = per

    say(f"plan: {len(names)} layers x {len(cands)} candidates: quantizing and measuring output errors")
    model_training = model.training
    each_hessian(model, names, calibration, on_hessian)
    missing = [n for n in names if n not in measured]
    if missing:
        raise ValueError(f"no calibration data reached {missing[0]} (its forward never ran on the calibration "
                         "batches): pass calibration inputs that exercise it, or add it to skip")
    if sensitivity == "output":
        for per in measured.values():
            for m in per:
                m["damage"] = m["error"]
    else:
        _measure_losses(model, names, measured, calibration, sensitivity, loss_tokens, say)
    model.train(model_training)
    costs = [[m["bytes"] for m in measured[n]] for n in names]
    damages = [[m["damage"] for m in measured[n]] for n in names]
    params = sum(model.get_submodule(n).weight.numel() for n in names)
    capacity = int(math.floor(budget * params / 8))
    least = sum(min(c) for c in costs)
    if least > capacity:
        raise ValueError(f"a budget of {budget:g} bits per parameter ({capacity:,} bytes for {params:,} parameters) "
                         f"is below the cheapest candidates' {8 * least / params:.4f}: raise the budget or add "
                         "cheaper candidates (larger blocks, double quantization)")
    picks = choose(costs, damages, capacity)
    entries = {n: measured[n][k]["candidate"] for n, k in zip(names, picks)}
    total = sum(c[k] for c, k in zip(costs, picks))
    for per in measured.values():
        for m in per:
            m.pop("q", None)
    say(f"plan: {8 * total / params:.4f} bits per parameter in {time.perf_counter() - t0:.1f} s")
    return Plan(entries, budget, total, params, {n: damages[i][k] for i, (n, k) in enumerate(zip(names, picks))},
                sensitivity, measurements=measured)


def _measure_losses(model, names, measured, calibration, sensitivity, loss_tokens, say) -> None:
    """Fills each measurement's "damage" (module docstring); every weight restored after."""
    with torch.no_grad():
        was = model.training
        model.eval()
        probe = LossProbe(model, calibration, loss_tokens)
        try:
            for i, n in enumerate(names):
                lin = model.get_submodule(n)
                orig = lin.weight.data
                per = measured[n]
                quantized = [m for m in per if m["q"] is not None]
                todo = per if sensitivity == "loss" else [max(quantized or per, key=lambda m: m["error"])]
                for m in todo:
                    w_hat = m["q"].dequantize(torch.float32) if m["q"] is not None else orig.float().half()
                    try:
                        lin.weight.data = w_hat.to(orig.dtype)
                        m["loss"] = max(probe(), 0.0)
                    finally:
                        lin.weight.data = orig
                if sensitivity == "loss":
                    for m in per:
                        m["damage"] = m["loss"]
                else:
                    ref = todo[0]
                    m_gain = ref["loss"] / ref["error"] if ref["error"] > 0 else 0.0
                    for m in per:
                        m["gain"] = m_gain
                say(f"plan: loss measured for {i + 1}/{len(names)} layers ({probe.passes} passes)")
        finally:
            model.train(was)
    if sensitivity == "proxy":
        gains = sorted(per[0]["gain"] for per in measured.values() if per[0]["gain"] > 0)
        floor = 1e-3 * gains[len(gains) // 2] if gains else 1.0  # a layer whose worst candidate did not move the loss
        for per in measured.values():
            g = per[0]["gain"] if per[0]["gain"] > 0 else floor
            for m in per:
                m["damage"] = g * m["error"]
