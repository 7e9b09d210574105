"""Quantization quality on real trained weights (DESIGN.md, "Measuring quality").

Two measures, both reusable (import this file with bench/ on sys.path):

- ``perplexity(model, tokens, ctx=256)``: held-out perplexity over fixed, non-overlapping
  windows of `ctx` tokens (the stream's tail shorter than a window is dropped; each window
  predicts its tokens 2..ctx from the ones before it inside the window, so
  ``windows * (ctx - 1)`` tokens are scored). Returns the mean NLL (nats) too: compare methods
  in mean log-perplexity.
- ``layer_errors(float_model, quant_model, tokens)``: for every nn.Linear of the float model
  (``lm_head`` skipped by default), ``||X W^T - X Ŵ^T|| / ||X W^T||`` (Frobenius over all
  captured rows), where X is that layer's input captured with forward hooks while the *float*
  model runs the calibration windows, and ``X Ŵ^T`` is the same-named module of `quant_model`
  applied to that X (a QuantLinear, or a float nn.Linear holding any dequantized weight), so
  each layer's error is isolated from the layers before it.

Also ``capture_linear_inputs`` (the X of each linear, for calibration methods), ``gap_closed``
(the share of the float-vs-RTN gap in mean log-perplexity a method closes) and the quantizers
used below (``rtn_model``, ``fitted_codebook_model``).

    python bench/quality.py             # float, RTN nf4/fp4/int4/uint4 (block 64, +-double quant),
                                        # fit_codebook per layer; table + bench/out/quality_real_lm.json

The model comes from bench/real_lm.py (built first if the cache lacks it). It is small and
trained on ~1 token per parameter, so quantization moves its perplexity less than it moves a
large model's (RTN NF4 at block 64: +0.2 %); the differences are still many standard errors
wide, so always read a method's Δ log-ppl next to its ± se (paired, over test windows).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["perplexity", "paired_delta", "capture_linear_inputs", "layer_errors", "linear_names", "gap_closed",
           "rtn_model", "fitted_codebook_model", "bits_per_param", "evaluate", "run"]

DEFAULT_CTX = 256
DEFAULT_CALIB_WINDOWS = 16


def _windows(tokens: torch.Tensor, ctx: int, max_windows: Optional[int] = None) -> torch.Tensor:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D token stream, got shape {tuple(tokens.shape)}")
    if ctx < 2:
        raise ValueError(f"ctx must be >= 2, got {ctx}")
    n = tokens.numel() // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"{tokens.numel()} tokens make no window of {ctx}")
    return tokens[: n * ctx].view(n, ctx).long()


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, ctx: int = DEFAULT_CTX, batch: int = 8,
               max_windows: Optional[int] = None, return_token_nll: bool = False) -> dict:
    """{"ppl", "nll" (mean, nats/token), "tokens" (scored), "windows", "ctx"} of a causal LM
    (called as ``model(input_ids=x).logits``) on non-overlapping windows of `tokens`; with
    `return_token_nll` also "token_nll", float64 [windows, ctx - 1], for paired comparisons
    (``paired_delta``)."""
    x = _windows(tokens, ctx, max_windows)
    dev = _device(model)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for i in range(0, x.shape[0], batch):
            xb = x[i: i + batch].to(dev)
            logits = model(input_ids=xb).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            parts.append(-lp.gather(-1, xb[:, 1:, None]).squeeze(-1).double().cpu())
    finally:
        model.train(was_training)
    nll = torch.cat(parts)
    mean = nll.mean().item()
    out = {"ppl": math.exp(mean), "nll": mean, "tokens": nll.numel(), "windows": int(x.shape[0]), "ctx": ctx}
    if return_token_nll:
        out["token_nll"] = nll
    return out


def paired_delta(token_nll: torch.Tensor, ref_token_nll: torch.Tensor) -> tuple[float, float]:
    """(mean NLL difference, its standard error) of two ``perplexity(..., return_token_nll=True)``
    results on the same tokens. The standard error is over per-window means (tokens inside a
    window are not independent), so |delta| / se > ~3 means the difference is not an accident
    of which text was held out."""
    if token_nll.shape != ref_token_nll.shape:
        raise ValueError(f"token_nll shapes differ: {tuple(token_nll.shape)} vs {tuple(ref_token_nll.shape)}")
    d = (token_nll - ref_token_nll).mean(dim=1)
    se = d.std(unbiased=True).item() / math.sqrt(d.numel()) if d.numel() > 1 else float("nan")
    return (token_nll - ref_token_nll).mean().item(), se


def linear_names(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> list[str]:
    """Names of the float nn.Linear modules of `model`, less those whose name, last component
    or a parent's name is in `skip`."""
    out = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            parts = name.split(".")
            if any(s == name or s in parts for s in skip):
                continue
            out.append(name)
    return out


@torch.no_grad()
def _run_with_hooks(model: nn.Module, tokens: torch.Tensor, ctx: int, n_windows: int, batch: int,
                    names: Iterable[str], fn: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    x = _windows(tokens, ctx, n_windows)
    dev = _device(model)
    hooks = []
    for name in names:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_hook(
            lambda m, inp, out, _n=name: fn(_n, inp[0].reshape(-1, inp[0].shape[-1]),
                                              out.reshape(-1, out.shape[-1]))))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, x.shape[0], batch):
            model(input_ids=x[i: i + batch].to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def capture_linear_inputs(model: nn.Module, tokens: torch.Tensor, ctx: int = DEFAULT_CTX,
                          n_windows: int = DEFAULT_CALIB_WINDOWS, names: Optional[Sequence[str]] = None,
                          max_rows: Optional[int] = None, batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """{linear name: X [rows, in_features] (float32, CPU)}: the inputs each linear saw while
    `model` ran the first `n_windows` windows of `tokens` (default: every float nn.Linear but
    lm_head). `max_rows` keeps that many rows per layer, the same rows for every layer
    (chosen by `seed`). Memory: rows * in_features * 4 bytes per layer."""
    names = linear_names(model) if names is None else list(names)
    rows = min(n_windows, tokens.numel() // ctx) * ctx
    keep = None
    if max_rows is not None and max_rows < rows:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(rows, generator=g)[:max_rows].sort().values
    chunks: dict[str, list] = {n: [] for n in names}

    def fn(name, x, _y):
        chunks[name].append(x.detach().float().cpu())

    _run_with_hooks(model, tokens, ctx, n_windows, batch, names, fn)
    out = {}
    for n, c in chunks.items():
        x = torch.cat(c)
        out[n] = x[keep] if keep is not None else x
        chunks[n] = []
    return out


@torch.no_grad()
def layer_errors(float_model: nn.Module, quant_model: nn.Module, tokens: torch.Tensor,
                 ctx: int = DEFAULT_CTX, n_windows: int = DEFAULT_CALIB_WINDOWS,
                 names: Optional[Sequence[str]] = None, batch: int = 8) -> dict[str, float]:
    """{linear name: ||X W^T - X Ŵ^T||_F / ||X W^T||_F} with X each float layer's input on
    the first `n_windows` windows of `tokens` (use the calibration split) and Ŵ the weight
    that `quant_model`'s module of the same name applies (its bias, if any, is removed, so
    the error is the weight's alone). Nothing is stored: each layer's error is accumulated as
    the float model runs."""
    names = linear_names(float_model) if names is None else list(names)
    qmods = {n: quant_model.get_submodule(n) for n in names}
    num = {n: 0.0 for n in names}
    den = {n: 0.0 for n in names}

    def fn(name, x, y):
        fm = float_model.get_submodule(name)
        ref = y if fm.bias is None else y - fm.bias
        q = qmods[name]
        yq = q(x.to(ref.dtype))
        if getattr(q, "bias", None) is not None:
            yq = yq - q.bias
        num[name] += (yq.double() - ref.double()).pow(2).sum().item()
        den[name] += ref.double().pow(2).sum().item()

    _run_with_hooks(float_model, tokens, ctx, n_windows, batch, names, fn)
    return {n: math.sqrt(num[n] / den[n]) if den[n] > 0 else float("nan") for n in names}


def gap_closed(float_nll: float, rtn_nll: float, method_nll: float) -> float:
    """Share of the float-vs-RTN gap in mean log-perplexity that a method closes: 1 = as good
    as float, 0 = no better than RTN, negative = worse than RTN."""
    gap = rtn_nll - float_nll
    return float("nan") if gap == 0 else (rtn_nll - method_nll) / gap


def bits_per_param(model: nn.Module) -> Optional[float]:
    """Bits actually stored per quantized weight (codes, scales, nested state, tables), from
    qengine.memory_report; None when nothing is quantized."""
    import qengine

    rep = qengine.memory_report(model)["quantized"]
    return rep["bits_per_param"] if rep["params"] else None


def rtn_model(model: nn.Module, fmt, blocksize: int = 64, double_quant: bool = False) -> nn.Module:
    """A round-to-nearest quantized copy of `model` (lm_head left in float, as QLoRA does)."""
    import qengine

    return qengine.quantize_model(copy.deepcopy(model), fmt, blocksize=blocksize,
                                  double_quant=double_quant, progress=False)


def fitted_codebook_model(model: nn.Module, bits: int = 4, blocksize: int = 64, double_quant: bool = False,
                          skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """A copy of `model` whose every linear (but `skip`) is quantized with its own codebook,
    ``qengine.fit_codebook(weight, bits, blocksize)`` (k-means on the block-normalised weights),
    rounded to nearest."""
    import qengine
    from qengine.nn import QuantLinear

    m = copy.deepcopy(model)
    for name in linear_names(m, skip):
        lin = m.get_submodule(name)
        fmt = qengine.fit_codebook(lin.weight.detach(), bits=bits, blocksize=blocksize)
        ql = QuantLinear.from_linear(lin, fmt, blocksize=blocksize, double_quant=double_quant)
        parent, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, ql)
    return m


def evaluate(float_model: nn.Module, quant_model: nn.Module, calib: torch.Tensor, test: torch.Tensor,
             ctx: int = DEFAULT_CTX, calib_windows: int = DEFAULT_CALIB_WINDOWS,
             float_token_nll: Optional[torch.Tensor] = None) -> dict:
    """Test perplexity of `quant_model` and the per-layer errors of its linears against
    `float_model` on the calibration tokens, with their mean and max. With `float_token_nll`
    (from ``perplexity(float_model, test, ctx, return_token_nll=True)``) also the paired
    "delta_nll_vs_float" and its standard error "delta_nll_se"."""
    t = time.perf_counter()
    ppl = perplexity(quant_model, test, ctx, return_token_nll=True)
    ppl_s = time.perf_counter() - t
    tok = ppl.pop("token_nll")
    if float_token_nll is not None:
        ppl["delta_nll_vs_float"], ppl["delta_nll_se"] = paired_delta(tok, float_token_nll)
    t = time.perf_counter()
    errs = layer_errors(float_model, quant_model, calib, ctx, calib_windows)
    err_s = time.perf_counter() - t
    vals = list(errs.values())
    return {**ppl, "bits_per_param": bits_per_param(quant_model),
            "layer_err_mean": sum(vals) / len(vals), "layer_err_max": max(vals),
            "layer_errors": errs, "ppl_seconds": round(ppl_s, 2), "layer_err_seconds": round(err_s, 2)}


def _machine() -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from real_lm import _cpu_name

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def run(formats: Sequence[str] = ("nf4", "fp4", "int4", "uint4"), blocksize: int = 64,
        ctx: int = DEFAULT_CTX, calib_windows: int = DEFAULT_CALIB_WINDOWS, fit: bool = True,
        out_path: Optional[str] = None, layer_table: bool = True) -> dict:
    """The whole comparison; prints tables and writes JSON to `out_path`."""
    import qengine

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from real_lm import load_real_lm

    lm = load_real_lm()
    model, calib, test = lm.model, lm.calib_tokens, lm.test_tokens
    print(f"model: {lm.path}\n  {lm.meta['parameters']:,} parameters, test split {test.numel()} tokens, "
          f"calibration split {calib.numel()} tokens; ppl over {test.numel() // ctx} windows of {ctx} "
          f"({test.numel() // ctx * (ctx - 1)} scored tokens); layer errors on {calib_windows} calibration "
          f"windows ({calib_windows * ctx} tokens)", flush=True)

    rows = []
    t = time.perf_counter()
    fl = perplexity(model, test, ctx, return_token_nll=True)
    fl_tok = fl.pop("token_nll")
    rows.append({"method": "float32", "format": "-", "double_quant": None, **fl, "bits_per_param": 32.0,
                 "delta_nll_vs_float": 0.0, "delta_nll_se": 0.0,
                 "quantize_seconds": 0.0, "ppl_seconds": round(time.perf_counter() - t, 2),
                 "layer_err_mean": 0.0, "layer_err_max": 0.0, "layer_errors": {}})
    print(f"  float32 ppl {fl['ppl']:.3f}", flush=True)

    cases = [("rtn", f, dq) for f in formats for dq in (False, True)]
    if fit:
        cases.append(("fit_codebook", "kmeans4", False))
    for method, fmt, dq in cases:
        t = time.perf_counter()
        if method == "rtn":
            qm = rtn_model(model, fmt, blocksize, dq)
        else:
            qm = fitted_codebook_model(model, 4, blocksize, dq)
        qs = time.perf_counter() - t
        r = evaluate(model, qm, calib, test, ctx, calib_windows, fl_tok)
        rows.append({"method": method, "format": fmt, "double_quant": dq, **r, "quantize_seconds": round(qs, 2)})
        print(f"  {method} {fmt} dq={dq}: ppl {r['ppl']:.3f}  (quantize {qs:.1f} s, ppl {r['ppl_seconds']:.1f} s)",
              flush=True)
        del qm

    ref_nll = {r["format"]: r["nll"] for r in rows if r["method"] == "rtn" and not r["double_quant"]}
    for r in rows:
        r["gap_closed_vs_rtn_nf4"] = (gap_closed(fl["nll"], ref_nll["nf4"], r["nll"])
                                      if "nf4" in ref_nll and r["method"] != "float32" else None)

    hdr = (f"{'method':<13}{'format':<8}{'dq':<4}{'bits/w':>7}{'ppl':>9}{'Δlogppl':>9}{'±se':>8}{'gap vs nf4':>11}"
           f"{'lay.err mean':>13}{'max':>7}{'quant s':>8}{'eval s':>7}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        dq = "-" if r["double_quant"] is None else ("y" if r["double_quant"] else "n")
        gc = "" if r["gap_closed_vs_rtn_nf4"] is None else f"{100 * r['gap_closed_vs_rtn_nf4']:.0f}%"
        print(f"{r['method']:<13}{r['format']:<8}{dq:<4}{r['bits_per_param']:>7.3f}{r['ppl']:>9.3f}"
              f"{r['delta_nll_vs_float']:>9.4f}{r['delta_nll_se']:>8.4f}{gc:>11}{r['layer_err_mean']:>13.4f}{r['layer_err_max']:>7.4f}"
              f"{r['quantize_seconds']:>8.1f}{r['ppl_seconds']:>7.1f}")

    if layer_table:
        qrows = [r for r in rows if r["layer_errors"] and not r["double_quant"]]
        names = list(qrows[0]["layer_errors"]) if qrows else []
        head = f"\nper-layer relative output error (block {blocksize}, no double quant)\n{'layer':<16}" + \
            "".join(f"{r['format']:>9}" for r in qrows)
        print(head)
        for n in names:
            print(f"{_short(n):<16}" + "".join(f"{r['layer_errors'][n]:>9.4f}" for r in qrows))

    result = {
        "benchmark": "quality_real_lm", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": _machine(), "qengine": getattr(qengine, "__version__", None),
        "model": {k: lm.meta.get(k) for k in ("tag", "parameters", "model_config", "splits", "train_seconds")},
        "source": {k: lm.meta["source"][k] for k in ("package", "version", "kind", "package_license",
                                                      "text_license")},
        "files": sorted(os.path.basename(f) for f in lm.meta["source"]["files"]),
        "settings": {"blocksize": blocksize, "ctx": ctx, "test_windows": test.numel() // ctx,
                     "scored_tokens": test.numel() // ctx * (ctx - 1), "calib_windows": calib_windows,
                     "calib_tokens_used": calib_windows * ctx, "skip": ["lm_head"]},
        "rows": rows,
    }
    if out_path:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {out_path}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Perplexity and per-layer error of quantized copies of the "
                                             "bench/real_lm.py model.")
    ap.add_argument("--formats", default="nf4,fp4,int4,uint4")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=DEFAULT_CTX)
    ap.add_argument("--calib-windows", type=int, default=DEFAULT_CALIB_WINDOWS)
    ap.add_argument("--no-fit", action="store_true", help="skip the fit_codebook row")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                  "quality_real_lm.json"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run([f for f in a.formats.split(",") if f], a.blocksize, a.ctx, a.calib_windows, not a.no_fit, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
