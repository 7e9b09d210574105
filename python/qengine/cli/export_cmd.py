"""`qengine export MODEL OUT.gguf --type q4_0`: a model directory (float or qengine-quantized)
or a GGUF file, with an optional LoRA adapter merged in float, written as llama.cpp GGUF."""

from __future__ import annotations

import argparse
import os

__all__ = ["add_export_args", "cmd_export"]


def cmd_export(args: argparse.Namespace) -> int:
    from .._io import check_writable_file
    from ..hf import export_gguf, load_model
    from ..hf.gguf import EXPORT_TYPES
    from ..model import add_lora, load_adapter
    from .model_cmds import add_lora_from_adapter

    if args.type.lower() not in EXPORT_TYPES:
        raise ValueError(f"--type {args.type!r} is not one of {', '.join(EXPORT_TYPES)}")
    if not args.out.lower().endswith(".gguf"):
        raise ValueError(f"output {args.out!r} must end in .gguf")
    if not os.path.exists(args.model):
        raise ValueError(f"model {args.model!r} does not exist (a model directory or a .gguf file)")
    check_writable_file(args.out, "OUT")
    model = load_model(args.model)
    if args.adapter:
        add_lora_from_adapter(model, args.adapter, add_lora, load_adapter)
    report = export_gguf(model, args.out, type=args.type)
    print(f"wrote {args.out}: {report['tensors']} tensors as {report['type']}")
    for name, err in report["merged"].items():
        print(f"  {name}: LoRA merged, re-quantized, relative error {err:.4g}")
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (float or qengine-quantized) or a .gguf file")
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument("--type", default="q4_0", help="GGUF tensor type of the 2-D weights: q4_0 (default), q4_1, q8_0, "
                   "q5_0, q5_1, q4_k, q5_k, q6_k, mxfp4, bf16, f16, f32")
    p.add_argument("--adapter", help="LoRA adapter written by `qengine finetune`, merged before quantizing")
    p.set_defaults(func=cmd_export)
