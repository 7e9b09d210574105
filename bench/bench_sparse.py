# 2:4 sparse NF4 against dense NF4 and dense bfloat16 F.linear, same run, with bytes moved.
"""Usage: python bench/bench_sparse.py [--quick] [--rounds R] [--json PATH] [--threads N]

On an 11008x4096 weight (NF4, block 64, double quant, in both layouts) with bfloat16
activations at batch 1, 8, 64 and 512: qengine.matmul on the 2:4 sparse layout, on the dense
layout, and dense bfloat16 F.linear (on the pruned weight). Each is measured `rounds` times,
the three interleaved round by round, and the median of the per-round medians is reported,
so that load from other processes on a shared machine hits all three alike. 'MB/call' is
the bytes each call moves: the weight as stored (plus, above 16 rows, the dense bfloat16 copy
written and read back), x and y. Ratios > 1 mean the 2:4 layout is faster.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qengine  # noqa: E402
from _harness import copy_bandwidth, measure, other_load, print_table, write_json  # noqa: E402

N, K = 11008, 4096
BATCHES = [1, 8, 64, 512]
SMALL_BATCH_ROWS = 16  # qengine.matmul dequantizes the layer above this many rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batches 1 and 64 only, 3 rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "sparse.json"))
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def bytes_moved(weight_bytes: int, m: int, dense_copy: bool) -> int:
    io = 2 * m * (K + N)  # bfloat16 x read, y written
    return weight_bytes + io + (2 * 2 * N * K if dense_copy else 0)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        qengine.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = 3 if args.quick else args.rounds
    batches = [1, 64] if args.quick else BATCHES
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s; other load {other_load():.2f} cores; qengine {qengine.build_info()}")
    w = torch.randn(N, K) * 0.02
    sparse = qengine.quantize(w, "nf4", 64, double_quant=True, sparsity="2:4")
    dense = qengine.quantize(w, "nf4", 64, double_quant=True)
    w_bf16 = sparse.dequantize(torch.bfloat16)  # the pruned weight, dense
    print(f"bits/param: 2:4 nf4+dq {sparse.bits_per_param:.3f}, dense nf4+dq {dense.bits_per_param:.3f}")
    fns = {
        "sparse": lambda x: qengine.matmul(x, sparse),
        "dense": lambda x: qengine.matmul(x, dense),
        "bf16": lambda x: F.linear(x, w_bf16),
    }
    rows = []
    for m in batches:
        xs = [(torch.randn(m, K, dtype=torch.bfloat16),) for _ in range(3)]
        per_round = {k: [] for k in fns}
        loads = []
        with torch.no_grad():
            for _ in range(rounds):
                for name, fn in fns.items():
                    st = measure(fn, xs, budget_s=1.0 if m < 64 else 2.0, retries=0)
                    per_round[name].append(st.median)
                    loads.append(st.other)
        r = {"batch": m, **{k: statistics.median(v) for k, v in per_round.items()}}
        big = m > SMALL_BATCH_ROWS
        r["mb_sparse"] = bytes_moved(sparse.nbytes, m, big) / 1e6
        r["mb_dense"] = bytes_moved(dense.nbytes, m, big) / 1e6
        r["mb_bf16"] = bytes_moved(2 * N * K, m, False) / 1e6
        r["x_dense"] = r["dense"] / r["sparse"]
        r["x_bf16"] = r["bf16"] / r["sparse"]
        r["gbps_sparse"] = r["mb_sparse"] / 1e3 / r["sparse"]
        r["gbps_dense"] = r["mb_dense"] / 1e3 / r["dense"]
        r["round_ratios"] = [d / s for d, s in zip(per_round["dense"], per_round["sparse"])]
        r["other_load"] = statistics.median(loads)
        rows.append(r)
        print(f"  M={m}: 2:4 {r['sparse'] * 1e3:.3f} ms, dense nf4 {r['dense'] * 1e3:.3f} ms, "
              f"ratio per round {['%.2f' % v for v in r['round_ratios']]}", flush=True)
    print_table([{k: (v * 1e3 if k in ("sparse", "dense", "bf16") else v) for k, v in r.items()} for r in rows],
                COLUMNS, title=f"{N}x{K}, bf16 activations (ms, median of {rounds} interleaved rounds; "
                               "x = time / 2:4 time, > 1 = 2:4 faster)")
    write_json(args.json, rows, copy_gbps=copy_gbps, bits_per_param={"sparse": sparse.bits_per_param,
                                                                      "dense": dense.bits_per_param})


COLUMNS = [("batch", "M", "d"), ("sparse", "2:4 nf4", ".3f"), ("dense", "dense nf4", ".3f"),
           ("x_dense", "x dense nf4", ".2f"), ("bf16", "bf16 F.linear", ".3f"), ("x_bf16", "x bf16", ".2f"),
           ("mb_sparse", "MB/call 2:4", ".1f"), ("mb_dense", "MB/call nf4", ".1f"), ("mb_bf16", "MB/call bf16", ".1f"),
           ("gbps_sparse", "GB/s 2:4", ".1f"), ("gbps_dense", "GB/s nf4", ".1f"), ("other_load", "other cores", ".2f")]

if __name__ == "__main__":
    main()
