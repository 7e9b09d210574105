# Quantize / dequantize throughput of qengine per format, against memory copy and bitsandbytes NF4.
"""Usage: python bench/bench_quantize.py [--quick] [--json PATH] [--formats nf4,nf4+dq,...] [--threads N]

GB/s counts: quantize = input bytes; dequantize = bytes read (packed codes + scales, i.e.
q.nbytes) + bytes written (the dense output). '% copy' relates that to dst.copy_(src)
measured in this run (bytes read + written). 'dq->out' writes into a preallocated, already
touched output; 'dq alloc' is the allocating call (its output pages are faulted in on every
call). The bitsandbytes row: quantize = functional.quantize_4bit, dq->out = its native CPU
kernel called through ctypes into a preallocated output, dq alloc = functional.dequantize_4bit.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import qengine  # noqa: E402
from _harness import (copy_bandwidth, measure, other_load, print_table, quiet_import_bitsandbytes,  # noqa: E402
                      rotation_count, write_json)

FORMATS = ["nf4", "nf4+dq", "fp4", "int4", "int8", "uint4", "uint8"]
SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCKSIZE = 64
OPS = ("q", "dqo", "dqa")  # quantize, dequantize into out=, allocating dequantize


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


class Runner:
    """Holds the timing settings and the measured copy bandwidth; turns timings into rows."""

    def __init__(self, quick: bool, device: str, copy_gbps: float):
        self.reps, self.budget = (5, 0.3) if quick else (30, 1.0)
        self.device, self.copy_gbps = device, copy_gbps

    def time(self, fn, nsets: int, nbytes: int, warmup: int = 2, min_reps: int = 5, reps: int | None = None) -> dict:
        st = measure(fn, [(i,) for i in range(nsets)], reps=reps or self.reps, warmup=warmup,
                     min_reps=min(min_reps, reps or self.reps), budget_s=self.budget, device=self.device)
        gbps = st.gbps(nbytes)
        return {"ms": st.median * 1e3, "gbps": gbps, "pct": 100 * gbps / self.copy_gbps, "bytes": nbytes,
                "stats": st}


def bench_qengine(r: Runner, xs, outs, fmt: str) -> dict:
    base, dq = fmt.split("+")[0], fmt.endswith("+dq")
    n, x0 = len(xs), xs[0]
    qs = [None] * n

    def quant(i):
        qs[i] = qengine.quantize(xs[i], base, blocksize=BLOCKSIZE, double_quant=dq)

    row = {"q": r.time(quant, n, x0.numel() * x0.element_size())}
    for i in range(n):  # sets the timed loop did not reach
        if qs[i] is None:
            quant(i)
    rw = qs[0].nbytes + outs[0].numel() * outs[0].element_size()
    row["dqo"] = r.time(lambda i: qs[i].dequantize(out=outs[i]), n, rw)
    row["dqa"] = r.time(lambda i: qs[i].dequantize(), n, rw)
    row["bits_per_param"] = qs[0].bits_per_param
    row["out_bytes"] = outs[0].numel() * outs[0].element_size()
    row["qs0"] = qs[0]
    return row


def bench_bnb(r: Runner, bnb, xs, outs, quick: bool, notes: list[str], tag: str) -> dict:
    F = bnb.functional
    n, x0 = len(xs), xs[0]
    bq = [None] * n

    def quant(i):
        bq[i] = F.quantize_4bit(xs[i], blocksize=BLOCKSIZE, quant_type="nf4")

    # quantize_4bit runs as a chain of torch ops (seconds per call here): fewer repetitions.
    row = {"q": r.time(quant, n, x0.numel() * x0.element_size(), warmup=1, min_reps=3 if quick else 5)}
    done = [b for b in bq if b is not None]  # dequantize rotates over these (outputs rotate over all n)
    rw = done[0][0].numel() + done[0][1].absmax.numel() * 4 + outs[0].numel() * outs[0].element_size()

    # The allocating call: the first one may compile (default backend) -> several warm-up calls.
    t0 = time.perf_counter()
    F.dequantize_4bit(*done[0])
    row["first_dqa_ms"] = (time.perf_counter() - t0) * 1e3
    row["dqa"] = r.time(lambda i: F.dequantize_4bit(*done[i % len(done)]), n, rw, warmup=3)

    if r.device == "cpu":
        lib = bnb.cextension.lib
        fn = getattr(lib, {torch.float32: "cdequantize_blockwise_cpu_nf4_fp32",
                           torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16"}[x0.dtype])
        m, k = x0.shape
        ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
        args = [(ptr(p.reshape(m, k // 2)), ptr(s.absmax), ctypes.c_longlong(BLOCKSIZE), ctypes.c_longlong(m),
                 ctypes.c_longlong(k)) for p, s in done]

        def native(i):
            a, s, bs, mm, kk = args[i % len(args)]
            fn(a, s, ptr(outs[i]), bs, mm, kk)

        native(0)
        if not torch.equal(outs[0], F.dequantize_4bit(*done[0])):
            notes.append(f"WARNING {tag}: bnb ctypes output differs from dequantize_4bit; its timing is suspect")
        row["dqo"] = r.time(native, n, rw)
    row["bq0"] = done[0]
    row["out_bytes"] = outs[0].numel() * outs[0].element_size()
    return row


def bnb_dequant_backend() -> str:
    has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::dequantize_4bit", "CPU")
    return "native CPU kernel (cpu backend)" if has_cpu else "default backend (torch.compile)"


def main():
    a = parse_args()
    if a.threads:
        qengine.set_num_threads(a.threads)
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not qengine.cuda_available():
        print("CUDA requested but qengine has no usable GPU; running on cpu")
        a.device = "cpu"
    load0 = other_load()
    bnb, why = quiet_import_bitsandbytes()
    copy_gbps = copy_bandwidth(device=a.device, reps=5 if a.quick else 10)
    r = Runner(a.quick, a.device, copy_gbps)
    print(f"qengine {qengine.build_info()}")
    print(f"copy bandwidth (dst.copy_(src), 256 MiB float32, read+write): {copy_gbps:.2f} GB/s")
    if bnb is None:
        print(f"bitsandbytes not importable ({why}); no reference rows")
    else:
        print(f"bitsandbytes {bnb.__version__}; dequantize_4bit on {a.device} uses: "
              f"{bnb_dequant_backend() if a.device == 'cpu' else 'its cuda backend'}")

    rows, notes = [], []
    for shape in SHAPES[:1] if a.quick else SHAPES:
        for dname, dtype in DTYPES.items():
            esz = torch.tensor([], dtype=dtype).element_size()
            nsets = rotation_count(shape[0] * shape[1] * esz)
            g = torch.Generator().manual_seed(0)
            xs = [torch.randn(shape, generator=g).to(dtype).to(a.device) for _ in range(nsets)]
            outs = [torch.zeros(shape, dtype=dtype, device=a.device) for _ in range(nsets)]  # touched now
            tag = f"{shape[0]}x{shape[1]} {dname}"
            label = {"shape": f"{shape[0]}x{shape[1]}", "dtype": dname, "sets": nsets}
            for fmt in a.formats:
                row = bench_qengine(r, xs, outs, fmt)
                q0 = row.pop("qs0")
                rows.append({**label, "format": fmt, "impl": "qengine", **row})
                if fmt == "nf4" and bnb is not None:
                    brow = bench_bnb(r, bnb, xs, outs, a.quick, notes, tag)
                    p, s = brow.pop("bq0")
                    same = torch.equal(p.reshape(-1).cpu(), q0.packed.cpu()) and torch.equal(s.absmax.cpu(),
                                                                                          q0.scales.cpu())
                    notes.append(f"{tag}: qengine nf4 packed+absmax {'==' if same else 'DIFFER from'} bitsandbytes'")
                    notes.append(f"{tag}: bnb dequantize_4bit first call {brow['first_dqa_ms']:.1f} ms "
                                 f"(steady state {brow['dqa']['ms']:.1f} ms)")
                    rows.append({**label, "format": "nf4", "impl": "bitsandbytes", **brow})
                print(f"  done {tag} {fmt}", file=sys.stderr, flush=True)
            del xs, outs
            gc.collect()

    flat = [{k: v for k, v in rw.items() if k not in OPS} | {f"{op}_{k}": rw[op][k] for op in OPS if op in rw
                                                             for k in ("ms", "gbps", "pct")} for rw in rows]
    cols = [("shape", "shape", ""), ("dtype", "dtype", ""), ("format", "format", ""), ("impl", "impl", "")]
    for op, name in (("q", "quant"), ("dqo", "dq->out"), ("dqa", "dq alloc")):
        cols += [(f"{op}_ms", f"{name} ms", ".2f"), (f"{op}_gbps", "GB/s", ".2f"), (f"{op}_pct", "%copy", ".0f")]
    print_table(flat, cols, title=f"blocksize {BLOCKSIZE}, device {a.device}, copy bandwidth {copy_gbps:.2f} GB/s "
                                  f"(medians; % of copy bandwidth)")
    load1 = other_load()
    if max(load0, load1) > 0.2:
        notes.append(f"WARNING: other processes kept {load0:.1f} / {load1:.1f} cores busy at start / end: "
                     "the machine is shared and these timings are unreliable")
    summarize(rows, notes)
    write_json(a.json, rows, copy_gbps=copy_gbps, args=vars(a), notes=notes, other_load=[load0, load1],
               bnb=None if bnb is None else {"version": bnb.__version__, "dequantize_4bit": bnb_dequant_backend()})


def summarize(rows: list[dict], notes: list[str]) -> None:
    """Page-fault cost (allocating vs preallocated dequantize) and the NF4 comparisons; no asserts."""
    pf = []
    for rw in rows:
        if "dqa" in rw and "dqo" in rw:
            extra = rw["dqa"]["ms"] - rw["dqo"]["ms"]
            pages = rw["out_bytes"] / 4096
            pf.append({"case": f"{rw['shape']} {rw['dtype']} {rw['format']} {rw['impl']}", "extra_ms": extra,
                       "ratio": rw["dqa"]["ms"] / rw["dqo"]["ms"], "us_page": extra * 1e3 / pages})
    if pf:
        print_table(pf, [("case", "allocating vs preallocated dequantize", ""), ("extra_ms", "extra ms", ".2f"),
                         ("ratio", "alloc/out", ".2f"), ("us_page", "us per 4 KiB page (approx.)", ".2f")])
    checks = []
    by = {(rw["shape"], rw["dtype"], rw["format"], rw["impl"]): rw for rw in rows}
    for (shape, dt, fmt, impl), rw in by.items():
        if fmt != "nf4" or impl != "qengine":
            continue
        b = by.get((shape, dt, "nf4", "bitsandbytes"))
        c = f"{shape} {dt}"
        checks.append({"check": f"(a) {c} quantize >= 25% copy", "value": f"{rw['q']['pct']:.0f}%",
                       "ok": rw["q"]["pct"] >= 25})
        checks.append({"check": f"(b) {c} dq->out >= 75% copy", "value": f"{rw['dqo']['pct']:.0f}%",
                       "ok": rw["dqo"]["pct"] >= 75})
        if b and "dqo" in b:
            checks.append({"check": f"(b) {c} dq->out >= bnb ctypes", "ok": rw["dqo"]["ms"] <= b["dqo"]["ms"],
                           "value": f"{rw['dqo']['ms']:.2f} vs {b['dqo']['ms']:.2f} ms"})
        if b:
            checks.append({"check": f"(c) {c} dq alloc <= bnb alloc", "ok": rw["dqa"]["ms"] <= b["dqa"]["ms"],
                           "value": f"{rw['dqa']['ms']:.2f} vs {b['dqa']['ms']:.2f} ms"})
    for ck in checks:
        ck["ok"] = "yes" if ck["ok"] else "NO"
    if checks:
        print_table(checks, [("check", "NF4 target", ""), ("value", "measured", ""), ("ok", "met", "")])
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
