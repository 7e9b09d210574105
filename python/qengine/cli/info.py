"""`qengine info` (version, build, formats with bits per parameter) and `qengine formats`
(quantize a random weight in every format: error, storage cost and time)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .. import build_info, codebook, fit_codebook, get_format, quantize
from ..formats import available_formats


def cmd_info(_args: argparse.Namespace) -> int:
    info = build_info()
    print(f"qengine {info['version']}")
    print(f"  CPU kernels:  {info['cpu_isa']} (supported: {', '.join(info['supported_cpu_isas'])}), "
          f"{info['num_threads']} threads")
    print(f"  CUDA kernels: {'compiled' if info['cuda_compiled'] else 'not compiled'}, "
          f"{'GPU available' if info['cuda_available'] else 'no GPU in use'}")
    print(f"  torch {torch.__version__}")
    print("  formats (bits per parameter of a large weight at block 64, without / with double quantization):")
    for name in available_formats():
        fmt = get_format(name)
        plain, dq = (_bits_per_param(fmt, 64, d) for d in (False, True))
        print(f"    {name:9s} {fmt.bits}-bit {fmt.rule:6s} {plain:6.3f} / {dq:6.3f}  {fmt.description}")
    return 0


def _bits_per_param(fmt, blocksize: int, double_quant: bool) -> float:
    """Codes plus per-block float32 scales (and offsets for min/max formats); with double
    quantization each of those is an 8-bit code plus a float32 absmax per 256 blocks (the
    tables and the mean are a constant few bytes, negligible for a large weight)."""
    per_block = 8 + 32 / 256 if double_quant else 32
    return fmt.bits + (2 if fmt.rule == "minmax" else 1) * per_block / blocksize


def cmd_formats(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    rows, cols = args.shape
    w = torch.randn(rows, cols, dtype=torch.float32)
    print(f"qengine formats: a {rows}x{cols} standard-normal float32 weight, blocksize {args.blocksize}\n")
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
