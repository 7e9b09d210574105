"""`qengine info` (version, build, formats with bits per parameter) and `qengine formats`
(quantize a random weight in every format: error, storage cost and time)."""

from __future__ import annotations

import argparse
import math
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
    rows, cols = INFO_SHAPE
    print(f"  formats: bits per parameter of a {rows}x{cols} weight at block {INFO_BLOCKSIZE} (every stored byte "
          "counted),\n  without / with double quantization:")
    for name in available_formats():
        fmt = get_format(name)
        plain, dq = (bits_per_param(fmt, INFO_SHAPE, INFO_BLOCKSIZE, d) for d in (False, True))
        print(f"    {name:9s} {fmt.bits}-bit {fmt.rule:6s} {plain:6.3f} / {dq:6.3f}  {fmt.description}")
    return 0


# The weight `qengine info` prices: the README's formats table uses the same one.
INFO_SHAPE = (4096, 4096)
INFO_BLOCKSIZE = 64


def bits_per_param(fmt, shape: tuple[int, ...], blocksize: int, double_quant: bool) -> float:
    """QuantizedTensor.bits_per_param of a dense weight of `shape` quantized in `fmt` at
    `blocksize`, computed without quantizing one: 8 * bytes / numel with bytes = codes
    (ceil(numel * bits / 8)) + the format's table (4 bytes a value) + per scale part (scales,
    and offsets for min/max formats) 4 bytes a block, or with double quantization 1 byte a
    block + a float32 absmax per 256 blocks + the 256-value dynamic table + a float32 mean."""
    from ..tensor import NESTED_BLOCKSIZE, NESTED_FORMAT

    numel = math.prod(shape)
    if fmt.scale_format:  # mxfp4 / nvfp4: codes + a scale byte per fixed block (+ nvfp4's float32 tensor scale)
        nblocks = -(-numel // fmt.fixed_blocksize)
        nbytes = -(-numel * fmt.bits // 8) + nblocks + (4 if fmt.scale_format == "_e4m3" else 0)
        return 8.0 * nbytes / numel
    nblocks = -(-numel // blocksize)
    if double_quant:
        part = nblocks + 4 * -(-nblocks // NESTED_BLOCKSIZE) + 4 * len(get_format(NESTED_FORMAT).values) + 4
    else:
        part = 4 * nblocks
    table = 4 * len(fmt.values) if fmt.stored_table else 0  # fp8_e4m3's table is the spec's, not stored
    nbytes = -(-numel * fmt.bits // 8) + table + (2 if fmt.rule == "minmax" else 1) * part
    return 8.0 * nbytes / numel


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
            q = quantize(w, fmt, blocksize=args.blocksize, double_quant=dq)
            w_hat = q.dequantize()
            err = (w_hat - w).abs()
            rel = (err.norm() / w.norm()).item()
            tq = _median_ms(lambda: quantize(w, fmt, blocksize=args.blocksize, double_quant=dq))
            td = _median_ms(q.dequantize)
            rows_out.append((label, "yes" if dq else "no", q.bits_per_param, err.mean().item(), rel, tq, td))
    print(f"{'format':18s} {'double':>6s} {'bits/param':>10s} {'mean |err|':>11s} {'rel. error':>10s} "
          f"{'quant ms':>9s} {'dequant ms':>10s}")
    for label, dq, bpp, mae, rel, tq, td in rows_out:
        print(f"{label:18s} {dq:>6s} {bpp:10.3f} {mae:11.5f} {rel:10.4f} {tq:9.1f} {td:10.1f}")
    print(f"\n(times: median of {TIMING_REPEATS} calls after a warm-up; k-means codebook fitted in {fit_s:.2f} s; "
          "float32 costs 32 bits per parameter)")
    return 0


TIMING_REPEATS = 5  # after the call above that measured the error (the warm-up): a median, not one noisy call


def _median_ms(fn) -> float:
    times = []
    for _ in range(TIMING_REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3
