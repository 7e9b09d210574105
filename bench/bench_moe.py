# One Mixture-of-Experts layer: qengine's grouped kernel on NF4 experts against transformers'
# experts implementations on bfloat16 weights, same run, with bytes read.
"""Usage: python bench/bench_moe.py [--quick] [--json PATH] [--threads N]

A Qwen3-MoE experts layer (hidden 2048, intermediate 1024 per expert, SiLU gate) with 8 and
64 experts, top-2 and top-8 routing (fixed random routing, distinct experts per token), at 1, 8
and 128 tokens, bfloat16 activations. Timed: qengine.nn.QuantExperts (NF4, block 64, double
quantization; one qengine::moe_experts call), and transformers' Qwen3MoeExperts on the same
weights in bfloat16 with experts_implementation "eager" (a Python loop over the hit experts),
"batched_mm" (gathers one weight copy per (token, expert) pair: skipped where that copy would
exceed 2 GB) and "grouped_mm". 'MB read' is the expert weight bytes a call must read (the
active experts' weights as stored) plus x and y; 'GB/s' is that over the median time.
'vs best bf16' is the fastest transformers implementation's time over qengine's (> 1: qengine
faster). Each implementation is timed on its own (bench/_harness.measure).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import qengine  # noqa: E402
from _harness import bench_parser, copy_bandwidth, measure, print_table, write_json  # noqa: E402

HIDDEN, INTER = 2048, 1024
LAYERS = [(8, 2), (8, 8), (64, 2), (64, 8)]  # (experts, top-k)
TOKENS = [1, 8, 128]
BATCHED_LIMIT = 2 << 30  # bytes batched_mm may gather


def parse_args():
    return bench_parser(__doc__, "moe", "8 experts only, half the time budget").parse_args()


def routing(tokens: int, experts: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1).to(torch.bfloat16)
    return index, weights


def build(experts: int):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=experts, num_experts_per_tok=2)
    dense = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        dense.gate_up_proj.normal_(0, 0.02)
        dense.down_proj.normal_(0, 0.02)
    quant = qengine.nn.QuantExperts.from_weights(dense.gate_up_proj.detach(), dense.down_proj.detach())
    dense = dense.to(torch.bfloat16).eval()
    return cfg, dense, quant


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        qengine._C.set_num_threads(args.threads)
    budget = 0.5 if args.quick else 1.0
    layers = [c for c in LAYERS if c[0] == 8] if args.quick else LAYERS
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw:.1f} GB/s (read + write), threads: torch {torch.get_num_threads()}, "
          f"qengine {qengine._C.num_threads()}")
    rows = []
    for experts, k in layers:
        cfg, dense, quant = build(experts)
        per_expert_q = (quant.gate_up_proj.weight_nbytes + quant.down_proj.weight_nbytes) / experts
        per_expert_bf16 = 2 * 3 * HIDDEN * INTER
        for tokens in TOKENS:
            sets = [routing(tokens, experts, k, seed) for seed in range(3)]
            xs = [(torch.randn(tokens, HIDDEN, dtype=torch.bfloat16), i, w) for i, w in sets]
            active = sum(int(torch.unique(i).numel()) for i, _ in sets) / len(sets)
            io = 2 * 2 * tokens * HIDDEN
            row = {"experts": experts, "top_k": k, "tokens": tokens, "active": active}
            with torch.no_grad():
                st = measure(lambda x, i, w: quant(x, i, w), xs, budget_s=budget)
                row["qengine_ms"] = st.median * 1e3
                row["qengine_mb"] = (active * per_expert_q + io) / 1e6
                row["qengine_gbps"] = st.gbps(int(active * per_expert_q + io))
                for impl in ("eager", "batched_mm", "grouped_mm"):
                    if impl == "batched_mm" and tokens * k * per_expert_bf16 > BATCHED_LIMIT:
                        continue
                    cfg._experts_implementation = impl
                    st = measure(lambda x, i, w: dense(x, i, w), xs, budget_s=budget)
                    row[f"{impl}_ms"] = st.median * 1e3
            row["bf16_mb"] = (active * per_expert_bf16 + io) / 1e6
            best = min(row[f"{i}_ms"] for i in ("eager", "batched_mm", "grouped_mm") if f"{i}_ms" in row)
            row["speedup"] = best / row["qengine_ms"]
            rows.append(row)
            print_table([row], COLUMNS)
        del dense, quant
    print_table(rows, COLUMNS, title="MoE layer, hidden 2048, intermediate 1024, bfloat16 activations")
    write_json(args.json, rows, copy_bandwidth_gbps=bw)


COLUMNS = [("experts", "E", "d"), ("top_k", "k", "d"), ("tokens", "tokens", "d"), ("active", "active", ".1f"),
           ("qengine_ms", "qengine ms", ".3f"), ("qengine_mb", "MB read", ".1f"), ("qengine_gbps", "GB/s", ".1f"),
           ("eager_ms", "eager ms", ".3f"), ("batched_mm_ms", "batched_mm ms", ".3f"),
           ("grouped_mm_ms", "grouped_mm ms", ".3f"), ("bf16_mb", "bf16 MB read", ".1f"),
           ("speedup", "vs best bf16", ".2f")]


if __name__ == "__main__":
    main()
