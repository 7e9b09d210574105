# Quantize / dequantize throughput of qengine per format, against memory copy and bitsandbytes NF4.
"""Usage: python bench/bench_quantize.py [--quick] [--json PATH] [--formats nf4,nf4+dq,...] [--threads N]

GB/s counts: quantize = input bytes; dequantize = bytes read (packed codes + scales, i.e.
q.nbytes) + bytes written (the dense output). '%copy' relates that to dst.copy_(src) on
256 MiB float32 buffers (bytes read + written), measured in this run just before each
shape/dtype group ('copy' column). 'dq->out' writes into a preallocated, already touched
output; 'dq alloc' is the allocating call. Every allocation >= 4 MiB gets fresh pages, faulted
in on first touch (glibc's mmap threshold is pinned), so 'dq alloc' pays the page faults of
its output and 'quant' those of its packed output (e.g. 22 MiB for 11008x4096 4-bit) on every
call, as when a model's weights are quantized once and kept.
The bitsandbytes row: quant = functional.quantize_4bit, dq->out = its native CPU kernel
called through ctypes into a preallocated output, dq alloc = functional.dequantize_4bit.
'busy' = cores other processes kept busy during the row's timings (should be ~0; timings
taken while the machine was busy are retried a few times).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness  # noqa: E402
import qengine  # noqa: E402
from _harness import (copy_bandwidth, fresh_pages_malloc, measure, other_load, print_table,  # noqa: E402
                      quiet_import_bitsandbytes, rotation_count, source_info, write_json)

FORMATS = ["nf4", "nf4+dq", "fp4", "int4", "int8", "uint4", "uint8"]
SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCKSIZE = 64
OPS = (("q", "quant"), ("dqo", "dq->out"), ("dqa", "dq alloc"))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, 4096x4096 only")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "quantize.json"))
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    p.add_argument("--threads", type=int, default=None, help="threads for qengine and torch (default: all cores)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    a = p.parse_args()
    a.formats = [f.strip().lower() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in a.formats if f not in FORMATS]
    if bad:
        p.error(f"unknown formats {bad}; choose from {FORMATS}")
    return a


class Group:
    """One shape/dtype: rotating inputs and preallocated (touched) outputs, the copy bandwidth
    measured for it, and the timing settings."""

    def __init__(self, shape, dtype, device, quick):
        esz = torch.empty((), dtype=dtype).element_size()
        self.n = rotation_count(shape[0] * shape[1] * esz)
        g = torch.Generator().manual_seed(0)
        self.xs = [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(self.n)]
        self.outs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n)]
        self.in_bytes = self.out_bytes = shape[0] * shape[1] * esz
        self.device, self.quick = device, quick
        self.reps, self.budget = (5, 0.3) if quick else (30, 1.0)
        self.copy_gbps = copy_bandwidth(device=device, reps=5 if quick else 10)

    def time(self, fn, nbytes, warmup=2, min_reps=5, retries=2):
        """{ms, gbps, pct, bytes, stats} of fn(i), rotating i over the n sets."""
        st = measure(fn, [(i,) for i in range(self.n)], reps=self.reps, warmup=warmup,
                     min_reps=min(min_reps, self.reps), budget_s=self.budget, device=self.device, retries=retries)
        gbps = st.gbps(nbytes)
        return {"ms": st.median * 1e3, "gbps": gbps, "pct": 100 * gbps / self.copy_gbps, "bytes": nbytes, "stats": st}


def qengine_sets(g: Group, fmt: str):
    """Quantize timing of `fmt` and the quantized set (one QuantizedTensor per input)."""
    base, dq = fmt.split("+")[0], fmt.endswith("+dq")
    qs = [None] * g.n

    def quant(i):
        qs[i] = qengine.quantize(g.xs[i], base, blocksize=BLOCKSIZE, double_quant=dq)

    q = g.time(quant, g.in_bytes)
    for i in range(g.n):  # sets the timed loop did not reach
        if qs[i] is None:
            quant(i)
    return q, qs


def bnb_sets(g: Group, bnb):
    """bitsandbytes quantize_4bit timing and the sets it produced (its dequantize rotates over
    these; the outputs rotate over all n). It is a chain of torch ops, seconds per call here."""
    bq = [None] * g.n

    def quant(i):
        bq[i] = bnb.functional.quantize_4bit(g.xs[i], blocksize=BLOCKSIZE, quant_type="nf4")

    q = g.time(quant, g.in_bytes, warmup=1, min_reps=3 if g.quick else 5, retries=0)
    return q, [b for b in bq if b is not None]


def bnb_native(g: Group, bnb, bq):
    """bitsandbytes' native CPU NF4 kernel into g.outs[i], called as backends/cpu/ops.py does."""
    fn = getattr(bnb.cextension.lib, {torch.float32: "cdequantize_blockwise_cpu_nf4_fp32",
                                      torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16"}[g.xs[0].dtype])
    m, k = g.xs[0].shape
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    args = [(ptr(p.reshape(m, k // 2)), ptr(s.absmax)) for p, s in bq]
    dims = (ctypes.c_longlong(BLOCKSIZE), ctypes.c_longlong(m), ctypes.c_longlong(k))

    def run(i):
        a, s = args[i % len(args)]
        fn(a, s, ptr(g.outs[i]), *dims)  # g.outs keeps the output alive

    return run


def bench_bnb(g: Group, bnb, q0, notes, label) -> dict:
    """The bitsandbytes NF4 row; checks its bytes against qengine's (q0) and its ctypes output."""
    F, tag = bnb.functional, f"{label['shape']} {label['dtype']}"
    q, bq = bnb_sets(g, bnb)
    rw = bq[0][0].numel() + bq[0][1].absmax.numel() * 4 + g.out_bytes
    row = {**label, "format": "nf4", "impl": "bitsandbytes", "q": q, "out_bytes": g.out_bytes}
    same = torch.equal(bq[0][0].reshape(-1).cpu(), q0.packed.cpu()) and torch.equal(bq[0][1].absmax.cpu(),
                                                                                   q0.scales.cpu())
    notes.append(f"{tag}: qengine nf4 packed+absmax {'==' if same else 'DIFFER from'} bitsandbytes'")
    if g.device == "cpu":
        native = bnb_native(g, bnb, bq)
        native(0)
        if not torch.equal(g.outs[0], F.dequantize_4bit(*bq[0])):
            notes.append(f"WARNING {tag}: bnb ctypes output differs from dequantize_4bit; its timing is suspect")
        row["dqo"] = g.time(native, rw)
    t0 = time.perf_counter()
    F.dequantize_4bit(*bq[0])  # the default backend compiles on a first call per shape: 3 warm-up calls below
    first_ms = (time.perf_counter() - t0) * 1e3
    row["dqa"] = g.time(lambda i: F.dequantize_4bit(*bq[i % len(bq)]), rw, warmup=3)
    notes.append(f"{tag}: bnb dequantize_4bit first call {first_ms:.1f} ms, steady {row['dqa']['ms']:.1f} ms")
    return row


def bench_group(g: Group, formats, bnb, notes, label) -> list[dict]:
    rows = []
    for fmt in formats:
        q, qs = qengine_sets(g, fmt)
        rw = qs[0].nbytes + g.out_bytes
        rows.append({**label, "format": fmt, "impl": "qengine", "q": q, "bits_per_param": qs[0].bits_per_param,
                     "out_bytes": g.out_bytes, "dqo": g.time(lambda i: qs[i].dequantize(out=g.outs[i]), rw),
                     "dqa": g.time(lambda i: qs[i].dequantize(), rw)})
        if fmt == "nf4" and bnb is not None:
            rows.append(bench_bnb(g, bnb, qs[0], notes, label))
        print(f"  done {label['shape']} {label['dtype']} {fmt}", file=sys.stderr, flush=True)
    return rows


def bnb_dequant_backend() -> str:
    has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::dequantize_4bit", "CPU")
    return "native CPU kernel (cpu backend)" if has_cpu else "default backend (torch.compile)"


def main():
    a = parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if a.threads:
        qengine.set_num_threads(a.threads)
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not qengine.cuda_available():
        print("CUDA requested but qengine has no usable GPU; running on cpu")
        a.device = "cpu"
    _harness.retry_budget_s = 15.0 if a.quick else 45.0  # for timings retried because the machine was busy
    fresh_pages = fresh_pages_malloc()  # every allocation >= 4 MiB is faulted in anew, whatever ran before
    load0 = other_load()
    bnb, why = quiet_import_bitsandbytes()
    print(f"qengine {qengine.build_info()}, source {source_info()}")
    if bnb is None:
        print(f"bitsandbytes not importable ({why}); no reference rows")
    else:
        print(f"bitsandbytes {bnb.__version__}; dequantize_4bit on {a.device} uses: "
              f"{bnb_dequant_backend() if a.device == 'cpu' else 'its cuda backend'}")

    rows, notes, copies = [], [], []
    for shape in SHAPES[:1] if a.quick else SHAPES:
        for dname, dtype in DTYPES.items():
            g = Group(shape, dtype, a.device, a.quick)
            copies.append(g.copy_gbps)
            label = {"shape": f"{shape[0]}x{shape[1]}", "dtype": dname, "sets": g.n, "copy": g.copy_gbps}
            rows += bench_group(g, a.formats, bnb, notes, label)
            del g
            gc.collect()
    load1 = other_load()

    for rw in rows:
        rw["busy"] = max(rw[op]["stats"].other for op, _ in OPS if op in rw)
    flat = [{**{k: v for k, v in rw.items() if k not in dict(OPS)},
             **{f"{op}_{k}": rw[op][k] for op, _ in OPS if op in rw for k in ("ms", "gbps", "pct")}} for rw in rows]
    cols = [("shape", "shape", ""), ("dtype", "dtype", ""), ("format", "format", ""), ("impl", "impl", "")]
    for op, name in OPS:
        cols += [(f"{op}_ms", f"{name} ms", ".2f"), (f"{op}_gbps", "GB/s", ".2f"), (f"{op}_pct", "%copy", ".0f")]
    cols += [("copy", "copy GB/s", ".1f"), ("busy", "busy", ".2f")]
    print_table(flat, cols, title=f"blocksize {BLOCKSIZE}, device {a.device}; medians; %copy = % of the copy "
                                  f"bandwidth (read+write) measured for the group")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"copy bandwidth per group: {', '.join(f'{c:.2f}' for c in copies)} GB/s; peak RSS {peak_gib:.2f} GiB")
    if max(load0, load1, *(rw["busy"] for rw in rows)) > 0.2:
        notes.append(f"WARNING: other processes kept up to {max(load0, load1, *(rw['busy'] for rw in rows)):.1f} "
                     "cores busy during the run (see 'busy'): those timings are unreliable")
    summarize(rows, notes)
    write_json(a.json, rows, copy_gbps=copies, args=vars(a), notes=notes, other_load=[load0, load1],
               fresh_pages_malloc=fresh_pages, peak_rss_gib=peak_gib,
               bnb=None if bnb is None else {"version": bnb.__version__, "dequantize_4bit": bnb_dequant_backend()})


def summarize(rows: list[dict], notes: list[str]) -> None:
    """Page-fault cost (allocating vs preallocated dequantize) and the NF4 targets; no asserts."""
    pf = [{"case": f"{rw['shape']} {rw['dtype']} {rw['format']} {rw['impl']}",
           "extra_ms": rw["dqa"]["ms"] - rw["dqo"]["ms"], "ratio": rw["dqa"]["ms"] / rw["dqo"]["ms"],
           "us_page": (rw["dqa"]["ms"] - rw["dqo"]["ms"]) * 1e3 / (rw["out_bytes"] / 4096)}
          for rw in rows if "dqa" in rw and "dqo" in rw]
    if pf:
        print_table(pf, [("case", "allocating vs preallocated dequantize", ""), ("extra_ms", "extra ms", ".2f"),
                         ("ratio", "alloc/out", ".2f"), ("us_page", "us per 4 KiB output page", ".2f")])
    by = {(rw["shape"], rw["dtype"], rw["format"], rw["impl"]): rw for rw in rows}
    checks = []
    for (shape, dt, fmt, impl), rw in by.items():
        if fmt != "nf4" or impl != "qengine":
            continue
        b, c = by.get((shape, dt, "nf4", "bitsandbytes")), f"{shape} {dt}"
        checks.append((f"(a) {c} quantize >= 25% copy", f"{rw['q']['pct']:.0f}%", rw["q"]["pct"] >= 25))
        checks.append((f"(b) {c} dq->out >= 75% copy", f"{rw['dqo']['pct']:.0f}%", rw["dqo"]["pct"] >= 75))
        if b and "dqo" in b:
            checks.append((f"(b) {c} dq->out >= bnb ctypes", f"{rw['dqo']['ms']:.2f} vs {b['dqo']['ms']:.2f} ms",
                           rw["dqo"]["ms"] <= b["dqo"]["ms"]))
        if b:
            checks.append((f"(c) {c} dq alloc <= bnb alloc", f"{rw['dqa']['ms']:.2f} vs {b['dqa']['ms']:.2f} ms",
                           rw["dqa"]["ms"] <= b["dqa"]["ms"]))
    if checks:
        print_table([{"check": c, "value": v, "ok": "yes" if ok else "NO"} for c, v, ok in checks],
                    [("check", "NF4 target", ""), ("value", "measured", ""), ("ok", "met", "")])
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
