# Batch-1 products with the weight coming from memory, not from the cache: what decoding one
# token of a model much larger than the last-level cache costs per layer.
"""Usage: python bench/bench_cold.py [--rounds R] [--threads N] [--json PATH]

bench_matmul.py and bench_sparse.py call one weight over and over, so on a CPU whose last-level
cache holds it (a 300 MiB L3 holds even the dense float32 11008x4096 weight, 180 MB) they time
products whose weight is cache-resident. Here every configuration rotates over enough copies of
its weight (different random values) to fill twice the last-level cache, so each call reads its
weight from DRAM, as a layer of a large model does once per token. 11008x4096, x of one row:
dense bfloat16 and float32 F.linear, NF4 + double quant with bfloat16 and float32 x, 2:4 NF4 +
double quant with bfloat16 x. A round times one pass over the copies of every configuration,
in an order that alternates between rounds; the ratios are medians of per-round ratios.
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
from _harness import bench_parser, copy_bandwidth, llc_bytes, print_table, rotation_count, write_json  # noqa: E402

N, K = 11008, 4096


def main() -> None:
    p = bench_parser(__doc__, "cold", "3 rounds")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        qengine.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    gen = torch.Generator().manual_seed(0)

    def weights(count):
        return [torch.randn(N, K, generator=gen) * 0.02 for _ in range(count)]

    print(f"last-level cache {llc_bytes() / 2**20:.0f} MiB; copy bandwidth {copy_bandwidth():.1f} GB/s; "
          f"qengine {qengine.build_info()}", flush=True)
    x16, x32 = torch.randn(1, K, generator=gen).to(torch.bfloat16), torch.randn(1, K, generator=gen)
    configs = {}  # name -> (function of one copy, copies, bytes of one copy)
    f32 = weights(rotation_count(N * K * 4))
    configs["dense f32"] = (lambda w: F.linear(x32, w), f32, N * K * 4)
    b16 = [w.to(torch.bfloat16) for w in weights(rotation_count(N * K * 2))]
    configs["dense bf16"] = (lambda w: F.linear(x16, w), b16, N * K * 2)
    nf4 = [qengine.quantize(w, "nf4", 64, double_quant=True) for w in weights(rotation_count(N * K // 2))]
    configs["nf4 bf16-x"] = (lambda q: qengine.matmul(x16, q), nf4, nf4[0].nbytes)
    configs["nf4 f32-x"] = (lambda q: qengine.matmul(x32, q), nf4, nf4[0].nbytes)
    sparse = [qengine.quantize(w, "nf4", 64, double_quant=True, sparsity="2:4")  # keeps the 2 largest of 4
              for w in weights(rotation_count(N * K * 3 // 8))]
    configs["2:4 nf4 bf16-x"] = (lambda q: qengine.matmul(x16, q), sparse, sparse[0].nbytes)

    times = {name: [] for name in configs}
    with torch.no_grad():
        for fn, copies, _ in configs.values():  # warm-up: every page touched once
            for c in copies:
                fn(c)
        names = list(configs)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                fn, copies, _ = configs[name]
                t = time.perf_counter()
                for c in copies:
                    fn(c)
                times[name].append((time.perf_counter() - t) / len(copies))

    def ratio(slow, fast):
        return statistics.median(a / b for a, b in zip(times[slow], times[fast]))

    rows = []
    for name, (_, copies, nbytes) in configs.items():
        t = statistics.median(times[name])
        rows.append({"config": name, "ms": t * 1e3, "copies": len(copies), "mb": nbytes / 1e6,
                     "gbps": nbytes / t / 1e9})
    print_table(rows, [("config", "config", "s"), ("ms", "ms/call", ".3f"), ("copies", "copies", "d"),
                       ("mb", "MB weight", ".1f"), ("gbps", "GB/s", ".1f")],
                title=f"{N}x{K}, one row of x, weights from DRAM (median over {rounds} rounds)")
    summary = {"nf4 bf16-x vs dense bf16": ratio("dense bf16", "nf4 bf16-x"),
               "nf4 f32-x vs dense f32": ratio("dense f32", "nf4 f32-x"),
               "2:4 vs dense nf4 (bf16 x)": ratio("nf4 bf16-x", "2:4 nf4 bf16-x")}
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x faster")
    write_json(args.json, rows, speedups=summary, rounds=rounds)


if __name__ == "__main__":
    main()
