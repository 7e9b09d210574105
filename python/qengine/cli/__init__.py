"""The `qengine` command (also `python -m qengine`): info, formats, quantize, eval, plan, finetune,
export, generate, bench, demo and doctor. Bad input ends with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys

from .._version import DISTRIBUTION, __version__
from ..doctor import add_doctor_args
from .demo import add_demo_args
from .eval_cmd import add_eval_args
from .export_cmd import add_export_args
from .info import cmd_formats, cmd_info
from .model_cmds import add_finetune_args, add_generate_args, add_quantize_args
from .plan_cmd import add_plan_args

__all__ = ["build_parser", "main"]


def _cmd_bench(args: argparse.Namespace) -> int:
    from .._io import check_writable_file
    from ..benchmark.suite import run

    if args.json:
        check_writable_file(args.json, "--json")  # now, not after the whole benchmark has run
    run(quick=args.quick, json_path=args.json)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `qengine: error:` line and exit status 2, as the
    commands' own errors are (subcommand parsers inherit the class)."""

    def error(self, message: str):
        cmd = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"qengine: error: {cmd}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qengine", description="qengine: quantization engine for PyTorch")
    parser.add_argument("--version", action="version", version=f"qengine {__version__} (distribution {DISTRIBUTION})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="version, CPU/CUDA build, formats with bits per parameter")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("formats", help="quantize a random weight in every format: error, bits/param, time")
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("ROWS", "COLS"))
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_formats)
    add_quantize_args(sub.add_parser("quantize", help="quantize a Hugging Face checkpoint, tensor by tensor"))
    add_eval_args(sub.add_parser("eval", help="quantization quality: held-out perplexity and per-layer error of "
                                 "formats x methods (rtn, gptq, search) on a text file"))
    add_plan_args(sub.add_parser("plan", help="per-layer formats of a model under a bits-per-parameter budget, "
                                 "from each layer's measured sensitivity (writes plan.json)"))
    add_finetune_args(sub.add_parser("finetune", help="QLoRA fine-tuning of a model directory on a text file"))
    add_export_args(sub.add_parser("export", help="write a model (with its LoRA adapter merged) as a llama.cpp GGUF "
                                   "file"))
    add_generate_args(sub.add_parser("generate", help="continue a prompt (optionally with a LoRA adapter)"))
    p = sub.add_parser("bench", help="kernel microbenchmarks against copy bandwidth and dense torch")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=_cmd_bench)
    add_demo_args(sub.add_parser("demo", help="QLoRA end to end on a shipped model config and text (no download)"))
    add_doctor_args(sub.add_parser("doctor", help="every kernel on every CPU ISA and GPU against the scalar CPU "
                                   "kernels; exit 1 on a mismatch"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError) as e:
        print(f"qengine: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk, ...: "<reason>: <file>", no traceback
        where = ": ".join(repr(f) for f in (e.filename, e.filename2) if f is not None)
        print(f"qengine: error: {e.strerror or e}{': ' + where if where else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qengine: interrupted", file=sys.stderr)
        return 130
