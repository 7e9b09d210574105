# The cost of one batch-1 layer call where the product itself is small: QuantLinear against
# nn.Linear and bitsandbytes' Linear4bit.
"""Usage: python bench/bench_call.py [--quick] [--rounds R] [--json PATH] [--threads N]

A generated token calls every linear layer once with one row of x, so below a few million
weights the time of a call is mostly the Python and dispatcher work around the kernel. For
square layers of 64 to 4096 features and float32 / bfloat16 x of one row: qengine's
QuantLinear (NF4, block 64, double quant), torch's nn.Linear on the dense weight and
bitsandbytes' Linear4bit (nf4, compress_statistics=True; when installed), under torch.no_grad
(what `generate` uses) and torch.inference_mode. Each round times every configuration for a few
thousand calls in turn, and the figure is the median over rounds of the per-call time, in
microseconds. One thread for every library, so the figure is the work per call, not a thread
pool's wake-up.
"""
from __future__ import annotations

import os
import statistics
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import qengine  # noqa: E402
from _harness import bench_parser, print_table, quiet_import_bitsandbytes, write_json  # noqa: E402
from qengine.nn import QuantLinear  # noqa: E402

SIZES = [64, 256, 1024, 4096]
CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def layers(n: int, bnb) -> dict:
    torch.manual_seed(0)
    dense = torch.nn.Linear(n, n, bias=False).requires_grad_(False)
    out = {"qengine": QuantLinear.from_linear(dense, "nf4", 64, double_quant=True), "dense": dense}
    if bnb is not None:
        b = bnb.nn.Linear4bit(n, n, bias=False, quant_type="nf4", compress_statistics=True,
                              compute_dtype=torch.bfloat16)
        b.load_state_dict({"weight": dense.weight.detach().clone()})
        out["bitsandbytes"] = b.to("cpu").eval()
    return out


def per_call_us(layer, x, ctx, calls: int) -> float:
    with ctx():
        layer(x)
        return min(timeit.repeat(lambda: layer(x), number=calls, repeat=3)) / calls * 1e6


def main():
    p = bench_parser(__doc__, "call", "sizes 64 and 4096, 3 rounds")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    threads = args.threads or 1
    torch.set_num_threads(threads)
    qengine.set_num_threads(threads)
    bnb, why = quiet_import_bitsandbytes()
    if bnb is None:
        print(f"bitsandbytes not measured: {why}")
    sizes = [64, 4096] if args.quick else SIZES
    rounds = 3 if args.quick else args.rounds
    rows = []
    for n in sizes:
        libs = layers(n, bnb)
        calls = max(20, int(2e8 // (n * n + 4e6)))  # ~0.1-0.5 s a configuration
        times: dict = {}
        for _ in range(rounds):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(1, n).to(dtype)
                for lib, layer in libs.items():
                    layer = layer if lib != "dense" else layer.to(dtype)
                    for ctx_name, ctx in CONTEXTS.items():
                        times.setdefault((dtype, lib, ctx_name), []).append(per_call_us(layer, x, ctx, calls))
        for (dtype, lib, ctx_name), ts in times.items():
            rows.append({"features": n, "x": str(dtype).removeprefix("torch."), "library": lib, "mode": ctx_name,
                         "us": statistics.median(ts)})
    print_table(rows, [("features", "n x n", "d"), ("x", "x", "s"), ("library", "library", "s"), ("mode", "mode", "s"),
                       ("us", "us/call", ".1f")],
                title=f"batch-1 layer calls, {threads} thread(s), median of {rounds} rounds")
    write_json(args.json, rows, threads=threads)


if __name__ == "__main__":
    main()
