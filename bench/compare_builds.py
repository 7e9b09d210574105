"""Usage: python bench/compare_builds.py --before /path/to/python --after /path/to/python
                                     [--rounds 3] [--threads N] [--json PATH]

Before/after timings of two qengine builds on one machine, interleaved (before, after, before,
after, ...) so drift of a shared or throttling machine hits both alike. Each round starts a fresh
interpreter of each build that times, through the public API only (so any two versions run the
same code): quantize and dequantize (NF4 + double quant, 4096x4096), the matmul of an 11008x4096
NF4 + double-quant QuantLinear at batch 1, 16 and 512 with bfloat16 and float32 activations, and
one PagedAdamW8bit step over 16M parameters. Reports the median over rounds of each build's
per-round median, and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

# Runs inside each build's interpreter; prints one JSON line {case: milliseconds}.
_PROBE = r"""
import json, sys, time, torch, qengine
threads = int(sys.argv[1])
torch.set_num_threads(threads); qengine.set_num_threads(threads)
torch.manual_seed(0)

def ms(fn, reps, warm=2):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]

out = {}
w = torch.randn(4096, 4096)
q = qengine.quantize(w, "nf4", 64, double_quant=True)
out["quantize nf4+dq 4096^2"] = ms(lambda: qengine.quantize(w, "nf4", 64, double_quant=True), 7)
out["dequantize nf4+dq 4096^2"] = ms(lambda: q.dequantize(torch.bfloat16), 11)
lin = torch.nn.Linear(4096, 11008, bias=False)
layer = qengine.nn.QuantLinear.from_linear(lin, "nf4", 64, double_quant=True)
with torch.inference_mode():
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for m, reps in ((1, 41), (16, 15), (512, 5)):
            x = torch.randn(m, 4096, dtype=dtype)
            out[f"matmul 11008x4096 b{m} {name}"] = ms(lambda: layer(x), reps)
params = [torch.nn.Parameter(torch.randn(4096, 4096)) for _ in range(1)]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
opt = qengine.optim.PagedAdamW8bit(params, lr=1e-3)
out["PagedAdamW8bit step 16M"] = ms(opt.step, 9)
print(json.dumps(out))
"""


def _run(python: str, threads: int) -> dict:
    res = subprocess.run([python, "-c", _PROBE, str(threads)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{python} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="python of the build to compare against")
    ap.add_argument("--after", default=sys.executable, help="python of the new build (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.rounds < 1 or a.threads < 1:
        raise SystemExit("--rounds and --threads must be positive")
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(a.rounds):
        for which in ("before", "after"):
            runs[which].append(_run(getattr(a, which), a.threads))
            print(f"round {r + 1}/{a.rounds} {which} done", file=sys.stderr)
    cases = list(runs["before"][0])
    med = {w: {c: statistics.median(run[c] for run in runs[w]) for c in cases} for w in runs}
    print(f"CPU: {_cpu_model()}, {a.threads} threads, {a.rounds} interleaved rounds (median of medians, ms)")
    print(f"| case | before | after | after/before |\n|---|---|---|---|")
    for c in cases:
        b, f = med["before"][c], med["after"][c]
        print(f"| {c} | {b:.3f} | {f:.3f} | {f / b:.3f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"cpu": _cpu_model(), "threads": a.threads, "rounds": runs, "median": med}, fh, indent=1)


if __name__ == "__main__":
    main()
