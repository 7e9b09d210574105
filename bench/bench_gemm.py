# The large-batch products against dense bfloat16 torch, interleaved: y = x @ W^T (qengine.matmul
# against F.linear) and the backward's gx = g @ W (torch.ops.qengine.matmul_t against g @ W),
# for an NF4 + double-quant weight and bfloat16 activations; --formats adds the forward of other
# formats (minmax, 8-bit, microscaling) against the same dense reference.
"""Usage: python bench/bench_gemm.py [--rounds 7] [--shape 11008x4096] [--batches 64,512]
                                [--formats nf4,uint4,int8] [--threads N] [--json PATH]

Each round times every case once in turn (median of 5 calls after a warm-up); the table gives
each case's median over rounds and the median over rounds of its per-round ratio to the dense
reference (the machine's drift hits both sides of a ratio alike)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import _harness as H  # noqa: E402

import qengine  # noqa: E402


def ms(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--batches", default="64,512")
    ap.add_argument("--formats", default="nf4",
                    help="comma-separated: nf4 (NF4 + double quant, block 64: forward and backward) and any "
                         "other format name, optionally /blocksize (default 64), for its forward")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "gemm.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        qengine.set_num_threads(args.threads)
    n, k = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k)
    q = qengine.quantize(w, "nf4", 64, double_quant=True)
    kw = q.kernel_weight()
    others = {}
    for spec in args.formats.split(","):
        name, _, bs = spec.partition("/")
        if name != "nf4":
            others[spec] = qengine.quantize(w, name) if name in ("mxfp4", "nvfp4") else \
                qengine.quantize(w, name, int(bs) if bs else 64)
    wb = w.to(torch.bfloat16)
    cases = {}
    for m in (int(b) for b in args.batches.split(",")):
        x = torch.randn(m, k).to(torch.bfloat16)
        g = torch.randn(m, n).to(torch.bfloat16)
        if "nf4" in args.formats.split(","):
            cases[f"forward M={m}"] = (lambda x=x: qengine.matmul(x, q), lambda x=x: F.linear(x, wb))
            cases[f"backward (x) M={m}"] = (
                lambda g=g: torch.ops.qengine.matmul_t(g, kw.packed, kw.table, kw.scales, kw.nested, None, 4, 64, k),
                lambda g=g: g @ wb)
        for spec, qo in others.items():
            cases[f"{spec} forward M={m}"] = (lambda x=x, qo=qo: qengine.matmul(x, qo), lambda x=x: F.linear(x, wb))
    times = {name: ([], []) for name in cases}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (ours, dense) in cases.items():
                times[name][0].append(ms(ours))
                times[name][1].append(ms(dense))
    print(f"{H.machine_info()['cpu_model']}, {os.cpu_count()} CPUs")
    print(f"{n}x{k} NF4 + double quant (and --formats), bfloat16 activations, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads, qengine build {qengine.build_info()['cpu_isa']}, "
          f"OpenMP runtime {qengine._C.openmp_runtime() or '(own pool)'}")
    width = max(22, *(len(name) for name in cases))
    print(f"{'case':<{width}} {'qengine ms':>11} {'dense bf16 ms':>14} {'qengine / dense':>16}")
    result = {}
    for name, (ours, dense) in times.items():
        ratio = statistics.median(a / b for a, b in zip(ours, dense))
        print(f"{name:<{width}} {statistics.median(ours):>11.2f} {statistics.median(dense):>14.2f} {ratio:>16.3f}")
        result[name] = {"qengine_ms": ours, "dense_ms": dense, "ratio": ratio}
    H.write_json(args.json, [{"case": name, **r} for name, r in result.items()])


if __name__ == "__main__":
    main()
