"""`qengine plan MODEL_DIR --data FILE --budget 4.25`: per-layer settings of a float model under a
bits-per-parameter budget (qengine.plan), printed as a table and written as JSON for
`qengine quantize --plan` and `qengine eval --plan`."""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["add_plan_args", "cmd_plan", "parse_candidates"]


def parse_candidates(text: str) -> list:
    """"nf4/64/dq/gptq+search,int8/64/dq/rtn,float16" -> Candidate list (block "row": per row;
    "dq" / "nodq")."""
    from ..calibrate.plan import FLOAT16, Candidate

    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if item == FLOAT16:
            out.append(FLOAT16)
            continue
        parts = item.split("/")
        if len(parts) != 4 or parts[2] not in ("dq", "nodq"):
            raise ValueError(f"--candidates: {item!r} is not FORMAT/BLOCK/dq|nodq/METHOD (e.g. nf4/64/dq/gptq) or "
                             "float16")
        try:
            block = None if parts[1] == "row" else int(parts[1])
        except ValueError:
            raise ValueError(f"--candidates: block size {parts[1]!r} of {item!r} is not a number or 'row'") from None
        out.append(Candidate(parts[0], block, parts[2] == "dq", parts[3]))
    if not out:
        raise ValueError("--candidates is empty")
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    from .._io import check_writable_file
    from ..calibrate.evaluate import split_tokens
    from ..calibrate.plan import plan
    from ..hf.checkpoint import load_config, saved_quantization_config
    from .model_cmds import check_model_dir, token_stream

    cands = parse_candidates(args.candidates) if args.candidates else None
    check_writable_file(args.out, "--out")
    check_model_dir(args.model_dir)
    config = load_config(args.model_dir)
    if saved_quantization_config(config) is not None:
        raise ValueError(f"{args.model_dir!r} is already quantized; plan the float model")
    stream, _ = token_stream(args.model_dir, config.vocab_size, args.data)
    calib, _ = split_tokens(stream[: args.calib_tokens + args.seq_len], args.seq_len, args.calib_tokens, args.seq_len)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    log = None if args.quiet else (lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True))
    p = plan(model, calib, budget=args.budget, candidates=cands, sensitivity=args.sensitivity, log=log)
    print(p)
    p.save(args.out)
    print(f"wrote {args.out}")
    return 0


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="float Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--data", required=True, help="calibration text (.txt or .jsonl); its start is used")
    p.add_argument("--budget", type=float, default=4.25, help="bits per parameter over the quantized layers, as "
                   "stored (default 4.25)")
    p.add_argument("--out", default="plan.json", help="where to write the plan (default plan.json)")
    p.add_argument("--candidates", help="comma-separated FORMAT/BLOCK/dq|nodq/METHOD or float16 (default: NF4 "
                   "blocks 256..32, int4 128..32, int8 64, all dq gptq+search, and float16)")
    p.add_argument("--sensitivity", choices=("proxy", "loss", "output"), default="proxy")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_plan)
