# 2:4 sparse NF4 against dense NF4 and dense bfloat16 F.linear, same run, with bytes moved.
"""Usage: python bench/bench_sparse.py [--quick] [--rounds R] [--json PATH] [--threads N]

On an 11008x4096 weight (NF4, block 64, double quant, in both layouts) with bfloat16
activations at batch 1, 8, 64 and 512: qengine.matmul on the 2:4 sparse layout, on the dense
layout, and dense bfloat16 F.linear (on the pruned weight). The two qengine layouts are timed
call by call in alternation (order swapped every pair), so bursts of load from other processes
on a shared machine hit both alike; the reported ratio is the median of the per-pair ratios.
F.linear is timed on its own (bench/_harness.measure: torch's OpenMP workers keep spinning
after a call and would slow the next call's threads). 'MB/call' is the bytes a call must move at
the least: the weight as stored, x and y (a path that writes a dense bfloat16 copy of W and reads
it back, where no native large-batch kernel applies, moves more). Ratios > 1 mean the 2:4 layout
is faster.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qengine  # noqa: E402
from _harness import bench_parser, copy_bandwidth, measure, other_load, print_table, write_json  # noqa: E402

N, K = 11008, 4096
BATCHES = [1, 8, 64, 512]


def parse_args():
    return bench_parser(__doc__, "sparse", "batches 1 and 64 only, half the time budget").parse_args()


def bytes_moved(weight_bytes: int, m: int) -> int:
    io = 2 * m * (K + N)  # bfloat16 x read, y written
    return weight_bytes + io


def paired(fa, fb, xs, budget_s: float, min_pairs: int = 7, max_pairs: int = 200):
    """Times fa and fb alternately on rotating inputs (a, b, then b, a, ...) after a warm-up;
    returns (median a, median b, median of b/a per pair, pairs, other cores busy)."""
    for x in xs[:2]:
        fa(x), fb(x)
    ta, tb = [], []
    t_start = time.perf_counter()
    while len(ta) < max_pairs and (len(ta) < min_pairs or time.perf_counter() - t_start < budget_s):
        x = xs[len(ta) % len(xs)]
        order = (0, 1) if len(ta) % 2 == 0 else (1, 0)
        t = [0.0, 0.0]
        for which in order:
            t0 = time.perf_counter()
            (fa if which == 0 else fb)(x)
            t[which] = time.perf_counter() - t0
        ta.append(t[0])
        tb.append(t[1])
    return (statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb)), len(ta),
            other_load(0.3))


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        qengine.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [1, 64] if args.quick else BATCHES
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s; other load {other_load():.2f} cores; qengine {qengine.build_info()}")
    w = torch.randn(N, K) * 0.02
    sparse = qengine.quantize(w, "nf4", 64, double_quant=True, sparsity="2:4")
    dense = qengine.quantize(w, "nf4", 64, double_quant=True)
    w_bf16 = sparse.dequantize(torch.bfloat16)  # the pruned weight, dense
    print(f"bits/param: 2:4 nf4+dq {sparse.bits_per_param:.3f}, dense nf4+dq {dense.bits_per_param:.3f}")
    rows = []
    for m in batches:
        xs = [torch.randn(m, K, dtype=torch.bfloat16) for _ in range(3)]
        budget = (4.0 if m < 64 else 12.0) * (0.5 if args.quick else 1.0)
        with torch.no_grad():
            t_s, t_d, ratio, pairs, load = paired(lambda x: qengine.matmul(x, sparse),
                                                  lambda x: qengine.matmul(x, dense), xs, budget)
            t_bf16 = measure(lambda x: F.linear(x, w_bf16), [(x,) for x in xs], budget_s=budget / 4).median
        r = {"batch": m, "sparse": t_s, "dense": t_d, "bf16": t_bf16, "x_dense": ratio, "pairs": pairs,
             "x_bf16": t_bf16 / t_s, "other_load": load}
        r["mb_sparse"] = bytes_moved(sparse.nbytes, m) / 1e6
        r["mb_dense"] = bytes_moved(dense.nbytes, m) / 1e6
        r["mb_bf16"] = bytes_moved(2 * N * K, m) / 1e6
        r["gbps_sparse"] = r["mb_sparse"] / 1e3 / t_s
        r["gbps_dense"] = r["mb_dense"] / 1e3 / t_d
        rows.append(r)
        print(f"  M={m}: 2:4 {t_s * 1e3:.3f} ms, dense nf4 {t_d * 1e3:.3f} ms, median pair ratio {ratio:.2f} "
              f"({pairs} pairs), bf16 {t_bf16 * 1e3:.3f} ms", flush=True)
    print_table([{k: (v * 1e3 if k in ("sparse", "dense", "bf16") else v) for k, v in r.items()} for r in rows],
                COLUMNS, title=f"{N}x{K}, bf16 activations (ms, medians; x dense nf4 = median of per-pair "
                               "ratios; > 1 = 2:4 faster)")
    write_json(args.json, rows, copy_gbps=copy_gbps, bits_per_param={"sparse": sparse.bits_per_param,
                                                                      "dense": dense.bits_per_param})


COLUMNS = [("batch", "M", "d"), ("sparse", "2:4 nf4", ".3f"), ("dense", "dense nf4", ".3f"),
           ("x_dense", "x dense nf4", ".2f"), ("pairs", "pairs", "d"), ("bf16", "bf16 F.linear", ".3f"),
           ("x_bf16", "x bf16", ".2f"),
           ("mb_sparse", "MB/call 2:4", ".1f"), ("mb_dense", "MB/call nf4", ".1f"), ("mb_bf16", "MB/call bf16", ".1f"),
           ("gbps_sparse", "GB/s 2:4", ".1f"), ("gbps_dense", "GB/s nf4", ".1f"), ("other_load", "other cores", ".2f")]

if __name__ == "__main__":
    main()
