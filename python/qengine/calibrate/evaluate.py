"""Quality of quantization methods on one model, what `qengine eval` reports: perplexity on
held-out text over fixed non-overlapping windows (the float model and every configuration in
one run), bits per parameter, quantization time, and each linear layer's relative output
error on the calibration inputs. Held-out windows never overlap the calibration text."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..formats import get_format
from ..nn import QuantLinear
from ..tensor import QuantizedTensor
from .blockwise import each_hessian

__all__ = ["Config", "split_tokens", "perplexity", "layer_errors", "evaluate"]


@dataclass(frozen=True)
class Config:
    format: str
    method: str
    blocksize: Optional[int] = 64
    double_quant: bool = True

    @property
    def label(self) -> str:
        return f"{self.format}/{self.method}"


def split_tokens(stream: torch.Tensor, seq_len: int, calib_tokens: int,
                 eval_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows int64 [n_c, seq_len], held-out windows [n_e, seq_len]) of a 1-D token
    stream: calibration from its first calib_tokens tokens (whole windows), held-out windows
    from the tokens after those (at most eval_tokens tokens; None: all of them). Deterministic;
    ValueError when either part has no whole window."""
    n_c = calib_tokens // seq_len
    if n_c < 1:
        raise ValueError(f"--calib-tokens {calib_tokens} is less than one window of --seq-len {seq_len}")
    rest = stream.numel() - n_c * seq_len
    n_e = rest // seq_len if eval_tokens is None else min(eval_tokens // seq_len, max(rest, 0) // seq_len)
    if n_e < 1:
        raise ValueError(f"the data has {stream.numel()} tokens: too few for {n_c * seq_len} calibration tokens plus "
                         f"one held-out window of {seq_len} (lower --calib-tokens or --seq-len, or use more text)")
    calib = stream[: n_c * seq_len].reshape(n_c, seq_len)
    held = stream[n_c * seq_len: (n_c + n_e) * seq_len].reshape(n_e, seq_len)
    return calib, held


def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> dict:
    """{"nll": mean negative log-likelihood (nats), "ppl", "tokens"} of a causal LM over the
    windows int64 [n, ctx]: each window predicts its tokens 2..ctx from those before it in the
    window, so n * (ctx - 1) tokens are scored."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for rows in windows.split(batch):
                rows = rows.to(device)
                logits = model(input_ids=rows).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                                        reduction="sum")
                total += float(nll)
                count += rows[:, 1:].numel()
    finally:
        model.train(training)
    mean = total / count
    return {"nll": mean, "ppl": math.exp(mean), "tokens": count}


def _relative_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||X (W - Ŵ)^T|| / ||X W^T|| (Frobenius over all rows of X) from H = X^T X."""
    H64, W = H.double(), w.double()
    D = W - w_hat.double()
    den = float(((W @ H64) * W).sum())
    return math.sqrt(max(float(((D @ H64) * D).sum()), 0.0) / den) if den > 0 else float("nan")


def layer_errors(float_model: nn.Module, weights: dict[str, dict[str, torch.Tensor]], calibration) -> dict:
    """{layer: {label: relative output error}} for every layer named in weights[label] (its
    quantized weight, any float [out, in] tensor or QuantizedTensor), with X the layer's inputs
    while the *float* model runs `calibration` (so each layer's error is isolated from the
    layers before it). Captured decoder block by decoder block, one block's H at a time."""
    wanted = {n for per in weights.values() for n in per}
    names = [n for n, _ in float_model.named_modules() if n in wanted]  # model order
    out: dict[str, dict[str, float]] = {n: {} for n in names}

    def measure(n: str, H: torch.Tensor, rows: int) -> None:
        w = float_model.get_submodule(n).weight.detach()
        for label, per in weights.items():
            if n in per:
                q = per[n]
                w_hat = q.dequantize(torch.float32) if isinstance(q, QuantizedTensor) else q
                out[n][label] = _relative_error(w, w_hat, H)

    each_hessian(float_model, names, calibration, measure)
    return out


def evaluate(model: nn.Module, calib: torch.Tensor, held: torch.Tensor, configs: Sequence[Config],
             skip: Sequence[str] = ("lm_head",), damp: float = 0.01, act_order: bool = False, batch: int = 8,
             log=None) -> dict:
    """The float model's held-out perplexity, then for each configuration (quantized on a copy
    of `model`, which is left float) its perplexity, bits per parameter of the quantized layers,
    quantization seconds and, against round-to-nearest of the same format, the share of the
    float-to-RTN gap in mean log-perplexity it closes; and every layer's relative output error
    on the calibration windows. calib / held: int64 [n, seq_len] token windows."""
    from ..model import memory_report, quantize_model

    say = log or (lambda msg: None)
    say(f"float model: perplexity on {held.shape[0]} held-out windows of {held.shape[1]} tokens")
    result = {"float": perplexity(model, held, batch), "configs": [], "layers": {}}
    weights: dict[str, dict] = {}
    for cfg in configs:
        say(f"{cfg.label}: quantizing")
        m = copy.deepcopy(model)
        kw = {} if cfg.method == "rtn" else {"calibration": calib}
        if cfg.method in ("gptq", "gptq+search"):
            kw.update(damp=damp, act_order=act_order)
        t0 = time.perf_counter()
        quantize_model(m, get_format(cfg.format), cfg.blocksize, cfg.double_quant, skip=skip, progress=False,
                       method=cfg.method, **kw)
        seconds = time.perf_counter() - t0
        say(f"{cfg.label}: quantized in {seconds:.1f} s; perplexity")
        entry = {"label": cfg.label, "format": cfg.format, "method": cfg.method, "blocksize": cfg.blocksize,
                 "double_quant": cfg.double_quant, "quant_seconds": seconds,
                 "bits_per_param": memory_report(m)["quantized"]["bits_per_param"], **perplexity(m, held, batch)}
        weights[cfg.label] = {n: mod.quantized() for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
        result["configs"].append(entry)
        del m
    float_nll = result["float"]["nll"]
    for entry in result["configs"]:
        rtn = next((e for e in result["configs"] if e["method"] == "rtn" and all(
            e[k] == entry[k] for k in ("format", "blocksize", "double_quant"))), None)
        gap = None if rtn is None else rtn["nll"] - float_nll
        # Only a real gap (RTN worse than float) has a share to close.
        entry["gap_closed"] = (rtn["nll"] - entry["nll"]) / gap if gap is not None and gap > 0 else None
    say("per-layer output errors on the calibration windows")
    result["layers"] = layer_errors(model, weights, calib)
    return result
