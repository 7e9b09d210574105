# Dequantize-matmul of qengine (NF4) against dense F.linear, torch's int4 CPU kernel and bitsandbytes.
"""Usage: python bench/bench_matmul.py [--quick] [--json PATH] [--threads N] [--device cuda] [--microscaling]
                                     [--odd-k] [--eight-bit]

For each weight shape and batch: qengine.matmul on an NF4 weight (block 64, with and without
double quant) with bfloat16 activations, against, in the same run: dense F.linear in bfloat16
and float32, torch's int4 CPU kernel (_weight_int4pack_mm_for_cpu, group 64) and
bitsandbytes' Linear4bit (nf4, compress_statistics=True) in eval and train mode. 'GB/s' is the
packed NF4 weight bytes per second (the memory-bound figure of merit at small batch); 'lora'
is the time with a LoRA r=16 side path. Ratios > 1 mean qengine is faster.

With --device cuda: the same shapes and batches on the GPU, timed with CUDA events, rotating
over 4 copies of each weight (more than the L2 cache) against dense F.linear in bfloat16 and
float32 and bitsandbytes' CUDA Linear4bit (when installed), with the measured device copy
bandwidth ('% copy': weight bytes per second over copy bytes per second).

With --odd-k: gpt-oss's projection shapes, whose K = 2880 is not a multiple of the fused GEMV's
128-code chunk, against a 3072-column weight (K % 128 == 0) of the same rows, NF4 + double quant
and MXFP4, bfloat16 x at batch 1 and 8, interleaved rounds; 'G w/s' is weights per second, whose
ratio to the 3072-column weight's is the cost of the last K % 128 codes of each row.

With --eight-bit: 11008x4096 at batch 1 and 8 with 8-bit codes (int8, uint8, GGUF Q8_0) against
NF4 + double quant and dense bfloat16, interleaved rounds; run once more with QENGINE_NO_VBMI=1
for the decode-then-dot path they take on CPUs without AVX-512 VBMI.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qengine  # noqa: E402
from _harness import (bench_parser, copy_bandwidth, measure, print_table, quiet_import_bitsandbytes,  # noqa: E402
                      write_json)

SHAPES = [(4096, 4096), (11008, 4096)]
BATCHES = [1, 4, 8, 16, 64, 512]


def parse_args():
    p = bench_parser(__doc__, "matmul", "11008x4096 only, batches 1, 16, 512")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--microscaling", action="store_true",
                   help="only batch-1 11008x4096: mxfp4, nvfp4, uint4 and nf4 block 32 against nf4 + double quant, "
                        "bfloat16 and float32 x, interleaved (issue 26's Done-when: within 1.15x of nf4)")
    p.add_argument("--eight-bit", action="store_true",
                   help="only 11008x4096 at batch 1 and 8: the 8-bit codes (int8, uint8, GGUF Q8_0) against nf4 + "
                        "double quant and dense bf16, interleaved (QENGINE_NO_VBMI=1 gives their decode-then-dot path)")
    p.add_argument("--odd-k", action="store_true",
                   help="only gpt-oss's shapes (K = 2880, not whole 128-code chunks) against K = 3072, batch 1 and 8")
    return p.parse_args()


def microscaling_main(args):
    """Batch-1 matmul, 11008x4096: nf4 (block 64 and 32, double quant), mxfp4, nvfp4, uint4 (the
    minmax rule: GGUF Q4_1 / Q4_K load to it); each round times
    every (format, x dtype) for a short budget in turn, and the figure is the median over rounds."""
    torch.manual_seed(0)
    n, k = 11008, 4096
    w = torch.randn(n, k) * 0.02
    # nf4/32+dq: mxfp4's block size with nf4 codes, to tell the cost of block 32 from the format's
    qs = {"nf4+dq": qengine.quantize(w, "nf4", 64, double_quant=True),
          "nf4/32+dq": qengine.quantize(w, "nf4", 32, double_quant=True), "mxfp4": qengine.quantize(w, "mxfp4"),
          "nvfp4": qengine.quantize(w, "nvfp4"), "uint4/64": qengine.quantize(w, "uint4", 64)}
    xs = {dt: [(torch.randn(1, k).to(dt),) for _ in range(3)] for dt in (torch.bfloat16, torch.float32)}
    times: dict = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, q in qs.items():
                for dt, x in xs.items():
                    t = measure(lambda x, q=q: qengine.matmul(x, q), x, budget_s=0.3).median
                    times.setdefault((name, dt), []).append(t)
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    rows = []
    for name, q in qs.items():
        r = {"format": name, "bits": q.bits_per_param}
        for dt, tag in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
            r[tag] = med[(name, dt)] * 1e3
            r["x_" + tag] = med[(name, dt)] / med[("nf4+dq", dt)]
        rows.append(r)
    print_table(rows, [("format", "format", ""), ("bits", "bits/param", ".3f"), ("bf16", "bf16 x ms", ".3f"),
                       ("x_bf16", "/ nf4", ".2f"), ("f32", "f32 x ms", ".3f"), ("x_f32", "/ nf4", ".2f")],
                title=f"batch-1 matmul 11008x4096, median of {args.rounds} interleaved rounds (ms; / nf4: time "
                      "over nf4+dq's)")
    write_json(args.json, rows)


def eight_bit_main(args):
    """Batch 1 and 8, bfloat16 x, 11008x4096: int8 (block 64, with and without double quant), uint8
    (the minmax rule; GGUF Q5_K loads to it) and GGUF Q8_0 (when the gguf package is installed; Q6_K
    loads to the same kind of table) against nf4 + double quant and dense bfloat16 F.linear; each
    round times every case for a short budget in turn, the figure is the median over rounds."""
    torch.manual_seed(0)
    n, k = 11008, 4096
    w = torch.randn(n, k) * 0.02
    qs = {"nf4+dq": qengine.quantize(w, "nf4", 64, double_quant=True), "int8/64": qengine.quantize(w, "int8", 64),
          "int8/64+dq": qengine.quantize(w, "int8", 64, double_quant=True), "uint8/64": qengine.quantize(w, "uint8", 64)}
    try:
        import gguf

        from qengine.hf.gguf import decode_blocks
        raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
        qs["gguf q8_0"] = decode_blocks(torch.from_numpy(raw.copy()).reshape(-1), "Q8_0", (n, k))
    except ImportError:
        print("gguf is not installed: no Q8_0 row")
    runs = {name: (lambda x, q=q: qengine.matmul(x, q)) for name, q in qs.items()}
    wb = w.to(torch.bfloat16)
    runs["dense bf16"] = lambda x: F.linear(x, wb)
    times: dict = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for m in (1, 8):
                xs = [(torch.randn(m, k, dtype=torch.bfloat16),) for _ in range(3)]
                for name, fn in runs.items():
                    times.setdefault((m, name), []).append(measure(fn, xs, budget_s=0.3).median)
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    rows = [{"batch": m, "impl": name, "ms": t * 1e3, "x_nf4": t / med[(m, "nf4+dq")],
             "x_dense": med[(m, "dense bf16")] / t} for (m, name), t in med.items()]
    print(f"fused 8-bit GEMV (AVX-512 VBMI): {'on' if qengine._C.vbmi_scales() else 'off'}")
    print_table(rows, [("batch", "M", "d"), ("impl", "impl", ""), ("ms", "ms", ".3f"), ("x_nf4", "/ nf4+dq", ".2f"),
                       ("x_dense", "x dense bf16", ".2f")],
                title=f"8-bit codes, 11008x4096, bfloat16 x, median of {args.rounds} interleaved rounds (ms; / nf4+dq: "
                      "time over nf4+dq's; x dense bf16: > 1 = faster)")
    write_json(args.json, rows)


def odd_k_main(args):
    """Batch 1 and 8, bfloat16 x: N x 2880 (K % 128 = 64) against 5760 x 3072, nf4+dq and mxfp4,
    with dense bfloat16 F.linear and bitsandbytes' Linear4bit (nf4) on the same weights."""
    torch.manual_seed(0)
    bnb, _ = quiet_import_bitsandbytes()
    cases = []
    for n, k in ((5760, 2880), (2880, 2880), (5760, 3072)):
        w = torch.randn(n, k) * 0.02
        layers = {"nf4+dq": qengine.quantize(w, "nf4", 64, double_quant=True), "mxfp4": qengine.quantize(w, "mxfp4")}
        cases.append((n, k, w.to(torch.bfloat16), layers, bnb_layer(bnb, w)))
    times: dict = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for n, k, wb, layers, bl in cases:
                for m in (1, 8):
                    xs = [(torch.randn(m, k, dtype=torch.bfloat16),) for _ in range(3)]
                    runs = {name: (lambda x, q=q: qengine.matmul(x, q)) for name, q in layers.items()}
                    runs["dense bf16"] = lambda x, wb=wb: F.linear(x, wb)
                    if bl is not None:
                        runs["bnb nf4"] = lambda x, bl=bl: bl(x)
                    for name, fn in runs.items():
                        times.setdefault((n, k, m, name), []).append(measure(fn, xs, budget_s=0.2).median)
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    rows = []
    for (n, k, m, name), t in med.items():
        rate = n * k / t / 1e9
        base = 5760 * 3072 / med[(5760, 3072, m, name)] / 1e9
        rows.append({"shape": f"{n}x{k}", "batch": m, "impl": name, "ms": t * 1e3, "gws": rate,
                     "vs3072": rate / base})
    print_table(rows, [("shape", "shape", ""), ("batch", "M", "d"), ("impl", "impl", ""), ("ms", "ms", ".3f"),
                       ("gws", "G w/s", ".1f"), ("vs3072", "rate / 5760x3072's", ".2f")],
                title=f"K not a multiple of 128 (gpt-oss shapes), bfloat16 x, median of {args.rounds} "
                      "interleaved rounds")
    write_json(args.json, rows)


def int4_reference(w: torch.Tensor):
    """torch's int4 CPU GEMM (group 64, asymmetric), or None where this torch lacks it."""
    try:
        n, k = w.shape
        g = w.reshape(n, k // 64, 64)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz)
    except Exception:
        return None


def bnb_layer(bnb, w: torch.Tensor):
    if bnb is None:
        return None
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")
    layer.load_state_dict({"weight": w})
    return layer.to("cpu")


def cuda_main(args):
    """The GPU run: qengine's fused kernel (<= 16 rows) or dequantize + cuBLAS, against dense
    cuBLAS and bitsandbytes, all timed with CUDA events in this run."""
    if not qengine.cuda_available():
        raise SystemExit("--device cuda: no CUDA GPU (or qengine built without CUDA kernels)")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bnb, why = quiet_import_bitsandbytes()
    copy_gbps = copy_bandwidth(device=dev)
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s (read + write); {torch.cuda.get_device_name()}")
    if bnb is None:
        print(f"bitsandbytes not measured: {why}")
    copies = 4  # weights rotated per measurement, together larger than the L2 cache
    rows = []
    for n, k in (SHAPES[1:] if args.quick else SHAPES):
        ws = [torch.randn(n, k, device=dev) * 0.02 for _ in range(copies)]
        qs = {dq: [qengine.quantize(w, "nf4", 64, double_quant=dq) for w in ws] for dq in (False, True)}
        dense = {dt: [w.to(dt) for w in ws] for dt in (torch.bfloat16, torch.float32)}
        layers = []
        if bnb is not None:
            for w in ws:
                layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type="nf4")
                layer.load_state_dict({"weight": w.cpu()})
                layers.append(layer.to(dev).eval())
        lora = (torch.randn(16, k, dtype=torch.bfloat16, device=dev) * 0.01,
                torch.randn(n, 16, dtype=torch.bfloat16, device=dev) * 0.01, 2.0)
        nbytes = qs[False][0].packed.numel()
        for m in (BATCHES if not args.quick else [1, 16, 512]):
            xs = [torch.randn(m, k, dtype=torch.bfloat16, device=dev) for _ in range(copies)]
            r = {"shape": f"{n}x{k}", "batch": m}
            with torch.no_grad():
                for dq in (False, True):
                    sets = list(zip(xs, qs[dq]))
                    r["dq" if dq else "nodq"] = measure(qengine.matmul, sets, reps=50, device=dev).median
                r["lora"] = measure(lambda x, q: qengine.matmul(x, q, lora=lora), list(zip(xs, qs[True])), reps=50,
                                    device=dev).median
                r["bf16"] = measure(F.linear, list(zip(xs, dense[torch.bfloat16])), reps=50, device=dev).median
                xf = [x.float() for x in xs]
                r["f32"] = measure(F.linear, list(zip(xf, dense[torch.float32])), reps=50, device=dev).median
                r["f32_q"] = measure(qengine.matmul, list(zip(xf, qs[True])), reps=50, device=dev).median
                if layers:
                    r["bnb_eval"] = measure(lambda x, layer: layer(x), list(zip(xs, layers)), reps=50,
                                            device=dev).median
            r["gbps"] = nbytes / r["dq"] / 1e9
            r["pct_copy"] = 100 * r["gbps"] / copy_gbps
            r["x_bf16"] = r["bf16"] / r["dq"]
            r["x_f32"] = r["f32"] / r["f32_q"]
            r["x_bnb"] = r["bnb_eval"] / r["dq"] if r.get("bnb_eval") else None
            r["lora_pct"] = 100 * (r["lora"] / r["dq"] - 1)
            rows.append(r)
            print(f"  {n}x{k} M={m}: nf4+dq {r['dq'] * 1e6:.1f} us, dense bf16 {r['bf16'] * 1e6:.1f} us", flush=True)
    cols = [("shape", "shape", ""), ("batch", "M", "d"), ("nodq", "nf4 us", ".1f"), ("dq", "nf4+dq us", ".1f"),
            ("gbps", "GB/s", ".0f"), ("pct_copy", "% copy", ".0f"), ("lora_pct", "lora %", ".0f"),
            ("bf16", "bf16 dense us", ".1f"), ("x_bf16", "x bf16", ".2f"), ("bnb_eval", "bnb us", ".1f"),
            ("x_bnb", "x bnb", ".2f"), ("f32_q", "nf4 f32-x us", ".1f"), ("f32", "f32 dense us", ".1f"),
            ("x_f32", "x f32", ".2f")]
    us_keys = ("nodq", "dq", "lora", "bf16", "f32", "f32_q", "bnb_eval")
    print_table([{kk: (v * 1e6 if isinstance(v, float) and kk in us_keys else v) for kk, v in r.items()} for r in rows],
                cols, title=f"NF4 dequantize-matmul on {torch.cuda.get_device_name()}, bf16 activations "
                            "(us; ratios: >1 = qengine faster)")
    write_json(args.json.replace("matmul.json", "matmul_cuda.json"), rows, copy_gbps=copy_gbps)


def main():
    args = parse_args()
    if args.microscaling or args.odd_k or args.eight_bit:
        args.rounds = 3 if args.quick else 7
        if args.threads:
            torch.set_num_threads(args.threads)
            qengine.set_num_threads(args.threads)
        mode = microscaling_main if args.microscaling else odd_k_main if args.odd_k else eight_bit_main
        return mode(args)
    if args.device == "cuda":
        return cuda_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        qengine.set_num_threads(args.threads)
    torch.manual_seed(0)
    bnb, why = quiet_import_bitsandbytes()
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write); qengine {qengine.build_info()}")
    if bnb is None:
        print(f"bitsandbytes not measured: {why}")
    shapes = SHAPES[1:] if args.quick else SHAPES
    batches = [1, 16, 512] if args.quick else BATCHES
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        qs = {dq: qengine.quantize(w, "nf4", 64, double_quant=dq) for dq in (False, True)}
        w_bf16, w_f32 = w.to(torch.bfloat16), w
        int4 = int4_reference(w)
        layer = bnb_layer(bnb, w)
        lora = (torch.randn(16, k, dtype=torch.bfloat16) * 0.01, torch.randn(n, 16, dtype=torch.bfloat16) * 0.01, 2.0)
        nbytes = qs[False].packed.numel()
        for m in batches:
            xs = [(torch.randn(m, k, dtype=torch.bfloat16),) for _ in range(3)]
            budget = 2.0 if m >= 64 else 1.0
            r = {"shape": f"{n}x{k}", "batch": m}
            with torch.no_grad():
                for dq, q in qs.items():
                    key = "dq" if dq else "nodq"
                    r[key] = measure(lambda x, q=q: qengine.matmul(x, q), xs, budget_s=budget).median
                r["lora"] = measure(lambda x: qengine.matmul(x, qs[True], lora=lora), xs, budget_s=budget).median
                r["bf16"] = measure(lambda x: F.linear(x, w_bf16), xs, budget_s=budget).median
                if m == 1:
                    xf = [(x.float(),) for (x,) in xs]
                    r["f32_q"] = measure(lambda x: qengine.matmul(x, qs[True]), xf).median
                    r["f32"] = measure(lambda x: F.linear(x, w_f32), xf).median
                if int4 is not None:
                    r["int4"] = measure(int4, xs, budget_s=budget).median
                if layer is not None and m <= 64:
                    layer.eval()
                    r["bnb_eval"] = measure(layer, xs, budget_s=budget).median
                    if m <= 16:
                        layer.train()
                        r["bnb_train"] = measure(layer, xs, reps=5, min_reps=3, budget_s=budget).median
                        layer.eval()
            r["gbps"] = nbytes / r["dq"] / 1e9
            r["x_bf16"] = r["bf16"] / r["dq"]
            r["x_bnb"] = r["bnb_eval"] / r["dq"] if r.get("bnb_eval") else None
            r["lora_pct"] = 100 * (r["lora"] / r["dq"] - 1)
            r["x_f32"] = r["f32"] / r["f32_q"] if r.get("f32") else None
            rows.append(r)
            print(f"  {n}x{k} M={m}: nf4+dq {r['dq'] * 1e3:.3f} ms, dense bf16 {r['bf16'] * 1e3:.3f} ms", flush=True)
    print_table([{kk: (v * 1e3 if isinstance(v, float) and kk in TIME_KEYS else v) for kk, v in r.items()}
                 for r in rows], COLUMNS, title="NF4 dequantize-matmul, bf16 activations (ms; ratios: >1 = qengine faster)")
    write_json(args.json, rows, copy_gbps=copy_gbps)


TIME_KEYS = ("nodq", "dq", "lora", "bf16", "f32_q", "f32", "int4", "bnb_eval", "bnb_train")
COLUMNS = [("shape", "shape", ""), ("batch", "M", "d"), ("nodq", "nf4", ".3f"), ("dq", "nf4+dq", ".3f"),
           ("gbps", "GB/s", ".1f"), ("lora", "+lora16", ".3f"), ("lora_pct", "lora %", ".0f"),
           ("bf16", "bf16 dense", ".3f"), ("x_bf16", "x bf16", ".2f"), ("int4", "torch int4", ".3f"),
           ("bnb_eval", "bnb eval", ".3f"), ("x_bnb", "x bnb", ".2f"), ("bnb_train", "bnb train", ".2f"),
           ("f32_q", "nf4 f32-x", ".3f"), ("f32", "f32 dense", ".3f"), ("x_f32", "x f32", ".1f")]

if __name__ == "__main__":
    main()
