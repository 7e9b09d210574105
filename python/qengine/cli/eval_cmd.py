"""`qengine eval`: quantization quality of a float model directory on a text file. The text is
split once, deterministically: calibration windows from its start, held-out windows after them
(never the calibration text). Prints the float model's held-out perplexity, each configuration
(format x method) with its perplexity, bits per parameter and quantization time, and each
linear layer's relative output error on the calibration windows; --json writes all of it."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .._io import atomic_write, check_writable_file

__all__ = ["add_eval_args", "cmd_eval"]


def _csv(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{what} is empty")
    return list(dict.fromkeys(items))


def _check_args(args: argparse.Namespace):
    from .._checks import check_blocksize
    from ..calibrate.driver import METHODS
    from ..formats import get_format

    formats = [get_format(f).name for f in _csv(args.formats, "--formats")]
    methods = _csv(args.methods, "--methods")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown method {bad[0]!r} (choose from {', '.join(METHODS)})")
    if args.blocksize is not None:
        check_blocksize(args.blocksize)
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.calib_tokens < args.seq_len:
        raise ValueError(f"--calib-tokens {args.calib_tokens} is less than one window of --seq-len {args.seq_len}")
    if args.eval_tokens is not None and args.eval_tokens < args.seq_len:
        raise ValueError(f"--eval-tokens {args.eval_tokens} is less than one window of --seq-len {args.seq_len}")
    if args.batch < 1:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    if not (args.damp >= 0 and args.damp < float("inf")):
        raise ValueError(f"--damp must be a finite number >= 0, got {args.damp}")
    if args.json:
        check_writable_file(args.json, "--json")
    return formats, methods


def cmd_eval(args: argparse.Namespace) -> int:
    from ..calibrate.evaluate import Config, evaluate, split_tokens
    from ..hf.checkpoint import saved_quantization_config, load_config
    from .model_cmds import check_model_dir, token_stream

    formats, methods = _check_args(args)
    check_model_dir(args.model_dir)
    config = load_config(args.model_dir)
    if saved_quantization_config(config) is not None:
        raise ValueError(f"{args.model_dir!r} is already quantized; qengine eval measures a float model's quantization")
    stream, tok_name = token_stream(args.model_dir, config.vocab_size, args.data)
    calib, held = split_tokens(stream, args.seq_len, args.calib_tokens, args.eval_tokens)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model_dir}: {n_params:,} parameters; data {args.data}: {stream.numel():,} tokens ({tok_name} "
          "tokenizer)")
    print(f"calibration: the first {calib.numel():,} tokens ({calib.shape[0]} windows of {args.seq_len}); held-out: "
          f"the next {held.numel():,} tokens, {held.shape[0]} non-overlapping windows of context {args.seq_len} "
          f"({held.shape[0] * (args.seq_len - 1):,} scored tokens)")
    configs = [Config(f, m, args.blocksize, args.double_quant) for f in formats for m in methods]
    log = None if args.quiet else (lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True))
    res = evaluate(model, calib, held, configs, skip=("lm_head",), damp=args.damp, act_order=args.act_order,
                   batch=args.batch, log=log)
    if args.plan:
        _plan_row(res, model, calib, held, args)
    _print_tables(res)
    if args.json:
        doc = {"model_dir": os.path.abspath(args.model_dir), "data": os.path.abspath(args.data), "params": n_params,
               "tokenizer": tok_name, "seq_len": args.seq_len, "blocksize": args.blocksize,
               "double_quant": args.double_quant, "damp": args.damp, "act_order": args.act_order,
               "calibration": {"tokens": calib.numel(), "windows": calib.shape[0], "start": 0},
               "held_out": {"tokens": held.numel(), "windows": held.shape[0], "start": calib.numel(),
                            "scored_tokens": res["float"]["tokens"]}, **res}
        with atomic_write(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _plan_row(res: dict, model, calib, held, args) -> None:
    """The --plan configuration: quantized by its plan on the same calibration windows, measured
    on the same held-out windows; its gap closed is against the first RTN row."""
    import copy
    import time

    from ..calibrate.evaluate import perplexity
    from ..calibrate.plan import Plan
    from ..model import memory_report, quantize_model

    plan = Plan.load(args.plan)
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize_model(m, plan=plan, calibration=calib, progress=False, damp=args.damp)
    seconds = time.perf_counter() - t0
    entry = {"label": "plan", "format": "plan", "method": "plan", "blocksize": None, "double_quant": None,
             "quant_seconds": seconds, "bits_per_param": 8.0 * plan.bytes / plan.params,
             **perplexity(m, held, args.batch)}
    rtn = next((e for e in res["configs"] if e["method"] == "rtn"), None)
    gap = None if rtn is None else rtn["nll"] - res["float"]["nll"]
    entry["gap_closed"] = (rtn["nll"] - entry["nll"]) / gap if gap is not None and gap > 0 else None
    res["configs"].append(entry)


def _print_tables(res: dict) -> None:
    fl = res["float"]
    print(f"\n{'configuration':<20} {'perplexity':>11} {'Δ log-ppl':>10} {'gap closed':>11} {'bits/param':>11} "
          f"{'quant s':>8}")
    print(f"{'float':<20} {fl['ppl']:>11.4f} {'':>10} {'':>11} {'':>11} {'':>8}")
    for e in res["configs"]:
        gap = "" if e["gap_closed"] is None or e["method"] == "rtn" else f"{100 * e['gap_closed']:.1f}%"
        print(f"{e['label']:<20} {e['ppl']:>11.4f} {e['nll'] - fl['nll']:>+10.5f} {gap:>11} "
              f"{e['bits_per_param']:>11.3f} {e['quant_seconds']:>8.1f}")
    labels = [e["label"] for e in res["configs"]]
    layers = res["layers"]
    if not layers:
        return
    width = max(len(n) for n in layers)
    print("\nrelative output error per layer, ||X(W - Ŵ)ᵀ|| / ||XWᵀ|| with X the float model's inputs on the "
          "calibration windows")
    print(f"{'layer':<{width}} " + " ".join(f"{lab:>12}" for lab in labels))
    for name, errs in layers.items():
        print(f"{name:<{width}} " + " ".join(f"{errs[lab]:>12.5f}" if lab in errs else f"{'-':>12}" for lab in labels))
    def mean(lab):
        vals = [e[lab] for e in layers.values() if lab in e]
        return f"{sum(vals) / len(vals):>12.5f}" if vals else f"{'-':>12}"
    print(f"{'mean':<{width}} " + " ".join(mean(lab) for lab in labels))


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="float Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--data", required=True, help="text (.txt, or .jsonl with a \"text\" field per line); its start "
                   "calibrates, the text after it is held out for perplexity")
    p.add_argument("--formats", default="nf4", help="comma-separated qengine formats (default nf4)")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated methods: rtn, gptq, search, gptq+search "
                   "(default rtn,gptq)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the block scales too (default on, as qengine quantize)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens from the start of the data, "
                   "in whole windows (default 16384)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens after the calibration part, in "
                   "whole windows (default: all the rest)")
    p.add_argument("--seq-len", type=int, default=512, help="window length for calibration and perplexity")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, a fraction of the mean diagonal of H")
    p.add_argument("--act-order", action="store_true", help="GPTQ columns in decreasing activation energy")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass for perplexity")
    p.add_argument("--plan", metavar="PLAN_JSON", help="also a row for this plan (from `qengine plan`; its gap "
                   "closed is against the first rtn row)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_eval)
