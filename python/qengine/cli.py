"""The `qengine` command: `qengine info` (build and formats) and `qengine demo` (quantize a
weight in every format and print error and storage cost)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import build_info, codebook, fit_codebook, get_format, quantize
from .formats import available_formats


def _cmd_info(_args: argparse.Namespace) -> int:
    info = build_info()
    print(f"qengine {info['version']}")
    print(f"  CPU kernels:  {info['cpu_isa']} (supported: {', '.join(info['supported_cpu_isas'])}), "
          f"{info['num_threads']} threads")
    print(f"  CUDA kernels: {'compiled' if info['cuda_compiled'] else 'not compiled'}, "
          f"{'GPU available' if info['cuda_available'] else 'no GPU in use'}")
    print(f"  torch {torch.__version__}")
    print("  formats:")
    for name in available_formats():
        fmt = get_format(name)
        print(f"    {name:9s} {fmt.bits}-bit {fmt.rule:6s}  {fmt.description}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    rows, cols = args.shape
    w = torch.randn(rows, cols, dtype=torch.float32)
    print(f"qengine demo: a {rows}x{cols} standard-normal float32 weight, blocksize {args.blocksize}\n")
    quantize(w[:1], "nf4", blocksize=None).dequantize()  # first call registers the ops
    start = time.perf_counter()
    fitted = fit_codebook(w, bits=4, blocksize=args.blocksize)
    fit_s = time.perf_counter() - start
    rows_out = []
    candidates = [(n, n) for n in ("nf4", "fp4", "int4", "uint4", "int8", "uint8")]
    candidates.append(("kmeans4 (fitted)", fitted))
    candidates.append(("codebook5", codebook([-1.0, -0.4, 0.0, 0.4, 1.0])))
    for label, fmt in candidates:
        for dq in (False, True):
            t0 = time.perf_counter()
            q = quantize(w, fmt, blocksize=args.blocksize, double_quant=dq)
            t1 = time.perf_counter()
            w_hat = q.dequantize()
            t2 = time.perf_counter()
            err = (w_hat - w).abs()
            rel = (err.norm() / w.norm()).item()
            rows_out.append((label, "yes" if dq else "no", q.bits_per_param, err.mean().item(), rel,
                             (t1 - t0) * 1e3, (t2 - t1) * 1e3))
    print(f"{'format':18s} {'double':>6s} {'bits/param':>10s} {'mean |err|':>11s} {'rel. error':>10s} "
          f"{'quant ms':>9s} {'dequant ms':>10s}")
    for label, dq, bpp, mae, rel, tq, td in rows_out:
        print(f"{label:18s} {dq:>6s} {bpp:10.3f} {mae:11.5f} {rel:10.4f} {tq:9.1f} {td:10.1f}")
    print(f"\n(k-means codebook fitted in {fit_s:.2f} s; float32 costs 32 bits per parameter)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qengine", description="qengine: quantization engine for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, CPU/CUDA build, formats")
    p_info.set_defaults(func=_cmd_info)
    p_demo = sub.add_parser("demo", help="quantize a random weight in every format; print error and bits/param")
    p_demo.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("ROWS", "COLS"))
    p_demo.add_argument("--blocksize", type=int, default=64)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"qengine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
