"""Calibrated quantization against round-to-nearest on the real trained LM of bench/real_lm.py:
held-out perplexity, the share of the float-vs-RTN gap each method closes (in mean log-
perplexity, paired over the same tokens), bits per parameter and quantization time, per format.

Layer inputs come from the float model on the calibration split (one Hessian per linear, not
sequential); perplexity is measured on the test split, which neither training nor calibration
saw. Prints a table and writes bench/out/calibrate_real_lm.json.

    python bench/bench_calibrate.py [--formats nf4,fp4,int4,uint4] [--methods rtn,search,gptq,gptq+search]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
import real_lm  # noqa: E402

import qengine  # noqa: E402
from qengine import calibrate  # noqa: E402
from qengine.nn import QuantLinear  # noqa: E402

METHODS = ("rtn", "search", "gptq", "gptq+search", "gptq+search+act_order")


@torch.no_grad()
def hessians(model, tokens, ctx: int, n_windows: int) -> dict[str, torch.Tensor]:
    """{linear name: X^T X (float64)} over the calibration windows."""
    xs = quality.capture_linear_inputs(model, tokens, ctx=ctx, n_windows=n_windows)
    return {name: (x.double().T @ x.double()) for name, x in xs.items()}


def quantize_weight(w, H, fmt, method: str, blocksize: int, double_quant: bool):
    if method == "rtn":
        return qengine.quantize(w, fmt, blocksize=blocksize, double_quant=double_quant)
    if method == "search":
        return calibrate.search_scales(w, fmt, blocksize=blocksize, double_quant=double_quant,
                                       importance=torch.diagonal(H).float())
    if method == "codebook":
        cb = calibrate.fit_codebook(w, bits=4, blocksize=blocksize, weights=torch.diagonal(H).float())
        return qengine.quantize(w, cb, blocksize=blocksize, double_quant=double_quant)
    search = "search" in method
    act_order = "act_order" in method
    return calibrate.gptq_quantize(w, H.float(), fmt, blocksize=blocksize, double_quant=double_quant,
                                   search=search, act_order=act_order)


def quantized_model(model, Hs, fmt, method, blocksize, double_quant):
    m = copy.deepcopy(model)
    for name, H in Hs.items():
        lin = m.get_submodule(name)
        q = quantize_weight(lin.weight.detach(), H, fmt, method, blocksize, double_quant)
        parent, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, QuantLinear.from_quantized(q, lin.bias))
    return m


def corrected_row(model, qm, r, lm, ctx, args, base_tok, fmt, method, rtn_nll, qs) -> dict:
    """qm + the error-correcting side path at rank args.correct_rank (frozen), scored paired
    against float and against qm itself (the share of what the method left that it closes)."""
    calib = lm.calib_tokens[: args.calib_windows * ctx].reshape(args.calib_windows, ctx)
    cm = copy.deepcopy(qm)
    t = time.perf_counter()
    qengine.add_lora(cm, r=args.correct_rank, init="correct", calibration=calib, reference=model)
    fit_s = time.perf_counter() - t
    rc = quality.perplexity(cm.eval(), lm.test_tokens, ctx, return_token_nll=True)
    nll = rc.pop("token_nll")
    d, se = quality.paired_delta(nll, base_tok)
    gain, gain_se = quality.paired_delta(nll, r["token_nll"])
    left = quality.paired_delta(r["token_nll"], base_tok)[0]
    closed = None if rtn_nll in (None, 0) else 1 - d / rtn_nll
    row = {"format": fmt, "method": f"{method} + correction r{args.correct_rank}",
           "bits_per_param": quality.bits_per_param(qm), "ppl": rc["ppl"], "delta_nll": d, "delta_nll_se": se,
           "gap_closed_vs_rtn": closed, "vs_method": gain, "vs_method_se": gain_se,
           "share_of_remaining_closed": None if left <= 0 else -gain / left, "quantize_s": round(qs + fit_s, 2)}
    print(f"{fmt:7s} {row['method']:24s} {row['bits_per_param']:6.3f} {rc['ppl']:8.3f} {d:8.5f} {se:7.5f} "
          f"{'' if closed is None else f'{100 * closed:9.1f}%'} {qs + fit_s:8.1f}   vs {method}: {gain:+.5f} ± "
          f"{gain_se:.5f}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="nf4,fp4,int4,uint4")
    p.add_argument("--methods", default=",".join(METHODS) + ",codebook")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--double-quant", action="store_true")
    p.add_argument("--calib-windows", type=int, default=64, help="calibration windows of ctx tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--correct-rank", type=int, default=0,
                   help="also each method + add_lora(init='correct') at this rank, frozen (0: no)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "out", "calibrate_real_lm.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = real_lm.load_real_lm()
    model, ctx = lm.model.eval(), quality.DEFAULT_CTX
    t = time.perf_counter()
    Hs = hessians(model, lm.calib_tokens, ctx, args.calib_windows)
    capture_s = time.perf_counter() - t
    base = quality.perplexity(model, lm.test_tokens, ctx, return_token_nll=True)
    base_tok = base.pop("token_nll")
    print(f"machine: {quality._machine()}")
    print(f"float ppl {base['ppl']:.3f} on {base['tokens']} held-out tokens ({base['windows']} windows of {ctx}); "
          f"Hessians from {args.calib_windows * ctx} calibration tokens in {capture_s:.1f} s")
    rows = []
    print(f"{'format':7s} {'method':24s} {'bits':>6s} {'ppl':>8s} {'dlogppl':>8s} {'se':>7s} {'gap closed':>10s} {'quant s':>8s}")
    for fmt in args.formats.split(","):
        rtn_nll = None
        for method in args.methods.split(","):
            if method == "codebook" and fmt != "nf4":
                continue  # one fitted-table row, compared with NF4 at the same bytes
            t = time.perf_counter()
            qm = quantized_model(model, Hs, fmt, method, args.blocksize, args.double_quant)
            qs = time.perf_counter() - t
            r = quality.perplexity(qm, lm.test_tokens, ctx, return_token_nll=True)
            d, se = quality.paired_delta(r["token_nll"], base_tok)
            if method == "rtn":
                rtn_nll = d
            closed = None if rtn_nll in (None, 0) else 1 - d / rtn_nll
            row = {"format": fmt, "method": method, "bits_per_param": quality.bits_per_param(qm), "ppl": r["ppl"],
                   "delta_nll": d, "delta_nll_se": se, "gap_closed_vs_rtn": closed, "quantize_s": round(qs, 2)}
            rows.append(row)
            print(f"{fmt:7s} {method:24s} {row['bits_per_param']:6.3f} {r['ppl']:8.3f} {d:8.5f} {se:7.5f} "
                  f"{'' if closed is None else f'{100 * closed:9.1f}%'} {qs:8.1f}", flush=True)
            if args.correct_rank:
                rows.append(corrected_row(model, qm, r, lm, ctx, args, base_tok, fmt, method, rtn_nll, qs))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": quality._machine(), "float": base, "calib_tokens": args.calib_windows * ctx,
                   "blocksize": args.blocksize, "double_quant": args.double_quant, "rows": rows}, f, indent=1,
                  default=str)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
