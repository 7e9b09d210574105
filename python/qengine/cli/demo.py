"""`qengine demo`: QLoRA end to end on what ships in the package (no download): a small
Llama-architecture model built from a config, quantized to NF4, fine-tuned with LoRA on a short
text until the loss clearly falls, then asked to continue a line."""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from importlib import resources

import torch

from .. import set_num_threads
from .._io import check_writable_dir
from ..finetune import DEFAULT_TARGETS, FinetuneConfig, finetune
from ..text_data import ByteTokenizer


def _asset(name: str) -> str:
    return str(resources.files("qengine").joinpath("assets", name))


def _memory_table(model) -> None:
    from ..model import memory_report, quantize_model

    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [("float32", fp32, None)]
    for label, dq in (("NF4", False), ("NF4 + double quant", True)):
        q = quantize_model(copy.deepcopy(model), "nf4", 64, double_quant=dq, progress=False)
        rep = memory_report(q)
        rows.append((label, rep["total"]["bytes"], rep["quantized"]["bits_per_param"]))
    print(f"{'weights':20s} {'model bytes':>12s} {'% of fp32':>10s} {'bits/param (linears)':>21s}")
    for label, nbytes, bits in rows:
        b = "32.000" if bits is None else f"{bits:.3f}"
        print(f"{label:20s} {nbytes:12,d} {100 * nbytes / fp32:9.1f}% {b:>21s}")


def cmd_demo(args: argparse.Namespace) -> int:
    from ..hf.checkpoint import build_model, require_transformers
    from ..model import quantize_model
    from .model_cmds import generate_text

    transformers = require_transformers()
    if args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    check_writable_dir(args.out, "--out")
    # A 2M-parameter model's ops take microseconds: threads would spend more time meeting at
    # barriers than computing (and stall whenever the machine is shared).
    torch.set_num_threads(args.threads)
    set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = transformers.AutoConfig.from_pretrained(_asset("tiny_llama.json"))
    model = build_model(config)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"qengine demo: a {nparams / 1e6:.1f}M-parameter Llama-architecture model built from "
          f"qengine/assets/tiny_llama.json (random init), byte-level tokens\n")
    _memory_table(model)
    quantize_model(model, "nf4", 64, double_quant=True, progress=False)
    if os.path.isdir(os.path.join(args.out, "checkpoint")):
        shutil.rmtree(os.path.join(args.out, "checkpoint"))  # a demo always starts from the base model
    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, rank=16, alpha=32, targets=(*DEFAULT_TARGETS, "lm_head"),
                         batch=8, seq_len=64, optim=args.optim, seed=args.seed, checkpoint_every=args.steps,
                         log_every=20, gradient_checkpointing=False)
    print(f"\nQLoRA: LoRA r=16 on every projection and lm_head, {cfg.optim}, lr {cfg.lr}, batch 8 x 64 tokens")

    def fell_enough(losses: list) -> bool:  # smoothed loss below 55% of the first steps'
        return len(losses) >= 20 and sum(losses[-10:]) / 10 < 0.55 * sum(losses[:5]) / 5

    result = finetune(model, ByteTokenizer(), _asset("demo_text.txt"), args.out, cfg, stop_when=fell_enough)
    losses = result["losses"]
    first, last = sum(losses[:5]) / min(5, len(losses)), sum(losses[-10:]) / min(10, len(losses))
    print(f"loss {first:.3f} -> {last:.3f} ({100 * (1 - last / first):.0f}% lower) in {result['steps']} steps, "
          f"{result['tokens_per_s']:,.0f} tokens/s")
    model.config.use_cache = True
    prompt = "The weights "
    print(f"\ngenerated: {prompt}{generate_text(model.eval(), ByteTokenizer(), prompt, 48)!r}")
    print(f"\nwrote {', '.join(result['files'])} (total {time.perf_counter() - start:.0f} s)")
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="qengine-demo", help="output folder (default ./qengine-demo)")
    p.add_argument("--steps", type=int, default=300, help="at most this many steps (stops once the loss fell)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optim", default="paged_adamw_8bit", choices=("paged_adamw_8bit", "paged_adamw", "adamw"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and qengine (default 1)")
    p.set_defaults(func=cmd_demo)
