# Optimizer step time and state bytes per parameter: qengine's paged AdamW (32/8-bit, with and without a budget) against torch and bitsandbytes.
"""Usage: python bench/bench_optim.py [--numel N] [--tensors K] [--json PATH] [--threads N] [--no-bnb] [--rounds R]

One optimizer step over N parameters (default 50M, in K equal float32 tensors, gradients
set), median over repeated steps, each optimizer measured alone (created, warmed up by two
steps, timed, freed). Rows: torch.optim.AdamW with foreach=True and fused=True (and the
default single-tensor loop), qengine PagedAdamW / PagedAdamW8bit with all states resident
and with a budget of a quarter of their state bytes (cold pages spilled to a memory-mapped
file in --spill-dir), bitsandbytes AdamW8bit and PagedAdamW where they run on this machine.
'bytes/param' counts the optimizer's state tensors (qengine: every page, resident or spilled).
'x fused' = torch fused step time / this step time (> 1: faster than torch fused AdamW);
'GB/s' = bytes the step must move (parameter, gradient and states, read and written) per
second; 'busy' = cores other processes kept busy meanwhile (> ~0.1: the timing is suspect).

Then R interleaved rounds (default 15): torch fused AdamW, PagedAdamW and PagedAdamW8bit
(resident) each take one step per round, in rotating order, so a machine whose memory speed
drifts from second to second (shared hosts) slows all alike; 'x fused' there is the median
over rounds of the per-round ratio. A fourth 8-bit optimizer steps with its codes' minifloat
forms withheld ('table codec': the SIMD kernels look the codes up in their tables, with byte
permutes on AVX-512 VBMI CPUs and gathers elsewhere), the kernels' speed-up from the forms. The same rounds then run on a QLoRA adapter's shape
(224 small tensors, 3.7M parameters), where per-tensor overhead decides.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import qengine  # noqa: E402
from _harness import measure, print_table, quiet_import_bitsandbytes, write_json  # noqa: E402
from qengine.optim import PagedAdamW, PagedAdamW8bit  # noqa: E402
from qengine.ops import optim as _ops  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=50_000_000)
    p.add_argument("--tensors", type=int, default=8)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "optim.json"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--spill-dir", default=tempfile.gettempdir())
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes (its CPU steps take seconds)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (0: none)")
    return p.parse_args()


def torch_state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def make_rows(spill_dir: str, bnb) -> list[tuple]:
    """(name, factory, state-bytes function, state bytes moved per parameter per step)."""
    rows = [
        ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True), torch_state_bytes, 8),
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True), torch_state_bytes, 8),
        ("torch AdamW (single)", lambda ps: torch.optim.AdamW(ps, foreach=False), torch_state_bytes, 8),
        ("qengine PagedAdamW", lambda ps: PagedAdamW(ps), lambda o: o.state_bytes(), 8),
        ("qengine PagedAdamW 1/4 budget", lambda ps: PagedAdamW(ps, budget_bytes=quarter(ps, 32), spill_dir=spill_dir),
         lambda o: o.state_bytes(), 8),
        ("qengine PagedAdamW8bit", lambda ps: PagedAdamW8bit(ps), lambda o: o.state_bytes(), 2.03),
        ("qengine PagedAdamW8bit 1/4 budget",
         lambda ps: PagedAdamW8bit(ps, budget_bytes=quarter(ps, 8), spill_dir=spill_dir), lambda o: o.state_bytes(), 2.03),
    ]
    if bnb is not None:
        rows += [("bnb AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps), torch_state_bytes, 2.03),
                 ("bnb PagedAdamW", lambda ps: bnb.optim.PagedAdamW(ps), torch_state_bytes, 8)]
    return rows


def quarter(ps, bits) -> int:
    n = sum(p.numel() for p in ps)
    return int(n * (8 if bits == 32 else 2.04) / 4)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        qengine.set_num_threads(args.threads)
    bnb, why = (None, "skipped (--no-bnb)") if args.no_bnb else quiet_import_bitsandbytes()
    print(f"qengine {qengine.build_info()}; torch threads {torch.get_num_threads()}")
    if bnb is None:
        print(f"bitsandbytes not measured: {why}")
    torch.manual_seed(0)
    per = args.numel // args.tensors
    params = [torch.nn.Parameter(torch.randn(per) * 0.02) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(per) * 1e-3
    n = per * args.tensors
    results = []
    for name, make, state_bytes, moved in make_rows(args.spill_dir, bnb):
        try:
            opt = make(params)
            slow = name.startswith("bnb") or name.endswith("(single)")
            st = measure(opt.step, [()], reps=5 if slow else 15, warmup=1 if slow else 2, min_reps=3,
                         budget_s=20.0 if slow else 4.0)
        except Exception as e:  # a reference that does not run here is reported, not fatal
            print(f"  {name}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        r = {"optimizer": name, "ms": st.median * 1e3, "p25": st.p25 * 1e3, "p75": st.p75 * 1e3, "reps": st.reps,
             "busy": st.other, "bytes_per_param": state_bytes(opt) / n,
             "gbps": n * (3 * 4 + 2 * moved) / st.median / 1e9}  # p read+write, g read, states read+write
        if hasattr(opt, "memory_stats"):
            r["memory"] = opt.memory_stats()
        results.append(r)
        print(f"  {name}: {r['ms']:.1f} ms, {r['bytes_per_param']:.3f} B/param, busy {st.other:.2f}", flush=True)
        del opt
        gc.collect()
    fused = next((r["ms"] for r in results if r["optimizer"] == "torch AdamW fused"), None)
    for r in results:
        r["x_fused"] = fused / r["ms"] if fused else None
    print_table(results, COLUMNS, title=f"AdamW step, {n / 1e6:.0f}M float32 parameters in {args.tensors} tensors "
                                        "(ms, median; x fused > 1: faster than torch fused)")
    interleaved = interleaved_rounds(params, args.rounds) if args.rounds > 0 else []
    if interleaved:
        print_table(interleaved, INTERLEAVED_COLUMNS,
                    title=f"Interleaved rounds ({args.rounds}): one step of each per round, rotating order")
    del params
    gc.collect()
    # A QLoRA adapter's shape: r=16 A and B matrices of 112 projections (3.7M parameters in 224
    # tensors), where per-tensor overhead rather than bandwidth decides.
    lora = [torch.nn.Parameter(torch.randn(*shape) * 0.02) for _ in range(112) for shape in ((16, 1024), (1024, 16))]
    for p in lora:
        p.grad = torch.randn_like(p) * 1e-3
    lora_rows = interleaved_rounds(lora, 10 * args.rounds) if args.rounds > 0 else []
    if lora_rows:
        print_table(lora_rows, INTERLEAVED_COLUMNS,
                    title=f"LoRA-shaped: {sum(p.numel() for p in lora) / 1e6:.1f}M parameters in {len(lora)} "
                          f"tensors, interleaved rounds ({10 * args.rounds})")
    write_json(args.json, results, numel=n, tensors=args.tensors, interleaved=interleaved, lora_interleaved=lora_rows)


def interleaved_rounds(params, rounds: int) -> list[dict]:
    """Per-round step times of torch fused AdamW and qengine's resident optimizers, the
    steps of one round back to back (see the module docstring)."""
    names = ["torch AdamW fused", "qengine PagedAdamW", "qengine PagedAdamW8bit",
             "qengine PagedAdamW8bit, table codec"]
    opts = [torch.optim.AdamW(params, fused=True), PagedAdamW(params), PagedAdamW8bit(params),
            PagedAdamW8bit(params)]
    steps = [opt.step for opt in opts[:3]] + [lambda: step_with_table_codec(opts[3])]
    for step in steps:  # states allocated, caches warm
        step()
        step()
    times = [[] for _ in steps]
    for r in range(rounds):
        for k in range(len(steps)):
            i = (r + k) % len(steps)
            t0 = time.perf_counter()
            steps[i]()
            times[i].append(time.perf_counter() - t0)
    rows = []
    for name, ts in zip(names, times):
        ratios = sorted(f / t for f, t in zip(times[0], ts))
        rows.append({"optimizer": name, "ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                     "max_ms": max(ts) * 1e3, "x_fused": statistics.median(ratios),
                     "x_fused_p25": ratios[len(ratios) // 4], "x_fused_p75": ratios[(3 * len(ratios)) // 4]})
    del opts
    gc.collect()
    return rows


def step_with_table_codec(opt) -> None:
    """One 8-bit step with the CPU state codes' minifloat forms withheld, so the SIMD kernels
    take the codes' tables instead of their shift arithmetic (same bytes, tested)."""
    codes = _ops.state_codes(torch.device("cpu"))
    forms = [c.form for c in codes]
    for c in codes:
        c.form = _ops.NO_FORM
    try:
        opt.step()
    finally:
        for c, f in zip(codes, forms):
            c.form = f


INTERLEAVED_COLUMNS = [("optimizer", "optimizer", ""), ("ms", "step ms", ".1f"), ("min_ms", "min", ".1f"),
                       ("max_ms", "max", ".1f"), ("x_fused", "x fused", ".2f"), ("x_fused_p25", "p25", ".2f"),
                       ("x_fused_p75", "p75", ".2f")]

COLUMNS = [("optimizer", "optimizer", ""), ("ms", "step ms", ".1f"), ("p25", "p25", ".1f"), ("p75", "p75", ".1f"),
           ("reps", "reps", "d"), ("bytes_per_param", "bytes/param", ".3f"), ("gbps", "GB/s", ".1f"),
           ("x_fused", "x fused", ".2f"), ("busy", "busy", ".2f")]

if __name__ == "__main__":
    main()
