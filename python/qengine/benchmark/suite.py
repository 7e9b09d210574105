"""The kernel microbenchmarks behind `qengine bench`: quantize, dequantize and matmul per format
and batch, each against the machine's copy bandwidth and dense torch measured in the same run
(the full per-kernel studies, with bitsandbytes and torch's int4 kernel, are in bench/)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import dequantize, matmul, quantize
from .._io import check_writable_file
from .harness import copy_bandwidth, measure, print_table, write_json

__all__ = ["run"]

FORMATS = ("nf4", "fp4", "int4", "uint4", "int8", "uint8")


def _quantize_rows(w: torch.Tensor, formats, budget: float) -> list[dict]:
    rows = []
    in_bytes = w.numel() * w.element_size()
    copy = measure(lambda t: t.clone(), [(w,)], budget_s=budget).median
    for fmt in formats:
        for dq in (False, True):
            q = quantize(w, fmt, 64, double_quant=dq)
            tq = measure(lambda t: quantize(t, fmt, 64, double_quant=dq), [(w,)], budget_s=budget).median
            out = torch.empty_like(w)
            td = measure(lambda: dequantize(q, out=out), [()], budget_s=budget).median
            rows.append({"format": fmt, "dq": "yes" if dq else "no", "bits": q.bits_per_param,
                         "quant_ms": tq * 1e3, "quant_gbps": in_bytes / tq / 1e9,
                         "dequant_ms": td * 1e3, "dequant_gbps": in_bytes / td / 1e9,
                         "x_clone": copy / td})
    return rows


def _matmul_rows(n: int, k: int, batches, budget: float) -> list[dict]:
    rows = []
    w = torch.randn(n, k) * 0.02
    q = quantize(w, "nf4", 64, double_quant=True)
    w16 = w.to(torch.bfloat16)
    for m in batches:
        xs = [(torch.randn(m, k, dtype=torch.bfloat16),) for _ in range(3)]
        with torch.no_grad():
            tq = measure(lambda x: matmul(x, q), xs, budget_s=budget).median
            td = measure(lambda x: F.linear(x, w16), xs, budget_s=budget).median
        rows.append({"shape": f"{n}x{k}", "batch": m, "nf4_ms": tq * 1e3, "gbps": q.packed.numel() / tq / 1e9,
                     "bf16_ms": td * 1e3, "x_bf16": td / tq})
    return rows


def run(quick: bool = False, json_path: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Runs the suite, prints its tables and returns (and optionally writes) the figures. A
    json_path that cannot be written raises ValueError before any measurement."""
    if json_path:
        check_writable_file(json_path, "json_path")
    budget = 0.3 if quick else 1.0
    gbps = copy_bandwidth(64 << 20 if quick else 256 << 20)
    log(f"copy bandwidth (read + write): {gbps:.1f} GB/s")
    side = 2048 if quick else 4096
    w = torch.randn(side, side, dtype=torch.bfloat16)
    qrows = _quantize_rows(w, FORMATS[:2] + FORMATS[4:5] if quick else FORMATS, budget)
    print_table(qrows, [("format", "format", ""), ("dq", "double", ""), ("bits", "bits/param", ".3f"),
                        ("quant_ms", "quantize ms", ".2f"), ("quant_gbps", "GB/s in", ".1f"),
                        ("dequant_ms", "dequantize ms", ".2f"), ("dequant_gbps", "GB/s out", ".1f"),
                        ("x_clone", "x bf16 clone", ".2f")],
                title=f"{side}x{side} bfloat16 weight, block 64 (GB/s of bf16 data; x clone > 1: faster than a copy)")
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096)]
    batches = (1, 16, 256) if quick else (1, 4, 8, 16, 64, 512)
    mrows = [r for n, k in shapes for r in _matmul_rows(n, k, batches, budget)]
    print_table(mrows, [("shape", "weight", ""), ("batch", "batch", "d"), ("nf4_ms", "nf4+dq ms", ".3f"),
                        ("gbps", "GB/s", ".1f"), ("bf16_ms", "dense bf16 ms", ".3f"), ("x_bf16", "x bf16", ".2f")],
                title="matmul, bfloat16 activations (x bf16 > 1: faster than dense F.linear)")
    result = {"copy_gbps": gbps, "quantize": qrows, "matmul": mrows}
    if json_path:
        write_json(json_path, qrows + mrows, copy_gbps=gbps)
    return result
