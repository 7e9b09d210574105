"""Issue 24's "Done when" lines on the real trained LM of bench/real_lm.py: float, RTN NF4 + double
quantization (the unit: its mean held-out log-perplexity gap to float), the best calibrated
method at the same bytes, the plan at 4.25 bits per parameter over the quantized layers, the
plan + the error-correcting rank-16 side path (frozen), each with bits per parameter and time;
how well the plan's cheap sensitivity ranks (layer, candidate) pairs against the measured
calibration-loss increase (Spearman); distillation from the float model vs LM-loss QLoRA (same
steps, training-split text, rank, lr and starting model), and distillation on top of plan +
correction.

Calibration: the first --calib-windows windows of 256 tokens of the calibration split; held-out:
the test split (never seen by training or calibration), scored paired against the float model.
Prints a table and writes bench/out/plan_real_lm.json.

Training (distillation, QLoRA) reads the training split (train.txt of the model directory), or
with --train-text calib the calibration split (calib.txt: ~25k tokens, the setting of recovering a
quantized model from little data), never the held-out text; adamw, batch 4 x 256 tokens, no
activation checkpointing.

    python bench/bench_plan.py [--budget 4.25] [--no-loss-plan] [--no-correct] [--steps 200 | --no-train]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
import real_lm  # noqa: E402

import qengine  # noqa: E402
from qengine.calibrate.plan import FLOAT16  # noqa: E402
from qengine.finetune import FinetuneConfig, finetune  # noqa: E402


def spearman(a, b) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def lscpu() -> dict:
    info = {}
    try:
        import subprocess
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Flags"):
                info[k.strip()] = v.strip()
    except (OSError, ValueError):
        pass
    flags = info.get("Flags", "").split()
    info["Flags"] = " ".join(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=4.25)
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--loss-tokens", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-loss-plan", action="store_true", help="skip the plan from measured losses (slow)")
    p.add_argument("--no-correct", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=200, help="training steps of distillation and QLoRA")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--kd-mix", type=float, default=0.5,
                   help="also distil with this kd_alpha (KL share; the rest LM loss); 1 or more skips that run")
    p.add_argument("--no-train", action="store_true", help="skip distillation and QLoRA")
    p.add_argument("--train-text", choices=["train", "calib"], default="train",
                   help="what distillation and QLoRA train on: the training split (the teacher's own "
                        "pretraining text) or the small calibration split (recovery with little data)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "out", "plan_real_lm.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = real_lm.load_real_lm(build=True)
    model, ctx = lm.model.eval(), quality.DEFAULT_CTX
    calib = lm.calib_tokens[: args.calib_windows * ctx].reshape(args.calib_windows, ctx)
    base = quality.perplexity(model, lm.test_tokens, ctx, return_token_nll=True)
    base_tok = base.pop("token_nll")
    rows, out = [], {"machine": {**quality._machine(), **lscpu()}, "calib_tokens": calib.numel(), "budget": args.budget}
    print(f"machine: {out['machine']}")
    rtn_gap = None
    nll = {}  # label -> held-out token NLLs, for paired comparisons between rows

    def rows_d(label):
        return next(r["dlogppl"] for r in rows if r["config"] == label)

    def compare(label, than):
        """(mean NLL of `label` minus that of `than`, its paired standard error), recorded."""
        diff, se = quality.paired_delta(nll[label], nll[than])
        out.setdefault("paired", []).append({"row": label, "vs": than, "dlogppl": diff, "se": se})
        print(f"  {label} vs {than}: {diff:+.5f} ± {se:.5f}")
        return diff, se

    def row(label, m, seconds, extra_bytes=0):
        nonlocal rtn_gap
        r = quality.perplexity(m, lm.test_tokens, ctx, return_token_nll=True)
        tok = r.pop("token_nll")
        d, se = quality.paired_delta(tok, base_tok)
        rep = qengine.memory_report(m)
        q = rep["quantized"]
        planned_params = q["params"] + sum(mod.weight.numel() for n, mod in m.named_modules()
                                           if isinstance(mod, torch.nn.Linear) and n != "lm_head")
        float16_bytes = 2 * (planned_params - q["params"])
        bits = 8.0 * (q["bytes"] + float16_bytes) / planned_params if planned_params else 0.0
        lora = list(qengine.lora_parameters(m))
        kept = sum(t.numel() * t.element_size() for t in lora)  # A, B as the side path keeps them
        lora_bits = 8.0 * 2 * rep["lora"]["params"] / planned_params if planned_params else 0.0  # stored 16-bit
        kept_bits = 8.0 * kept / planned_params if planned_params else 0.0
        if label.startswith("rtn") and rtn_gap is None:
            rtn_gap = d
        closed = None if not rtn_gap else 1 - d / rtn_gap
        nll[label] = tok
        rows.append({"config": label, "bits_per_param": bits, "side_path_bits": lora_bits,
                     "side_path_bits_as_kept": kept_bits, "side_path_dtype": str(lora[0].dtype) if lora else None,
                     "ppl": r["ppl"], "dlogppl": d, "se": se, "gap_closed": closed, "seconds": seconds})
        print(f"{label:34s} bits {bits:6.3f}{f' +{lora_bits:.3f}' if lora_bits else '':7s} ppl {r['ppl']:8.3f} "
              f"dlogppl {d:+.5f} ± {se:.5f} closed {'' if closed is None else f'{100 * closed:6.1f}%'} "
              f"{seconds:7.1f} s", flush=True)
        return d

    rows.append({"config": "float", "bits_per_param": 32.0, "ppl": base["ppl"], "dlogppl": 0.0, "seconds": 0.0})
    print(f"float ppl {base['ppl']:.3f} on {base['tokens']} held-out tokens; calibration {calib.numel()} tokens")
    t = time.perf_counter()
    m = qengine.quantize_model(copy.deepcopy(model), "nf4", 64, True, progress=False)
    rtn_s = time.perf_counter() - t
    row("rtn nf4/64/dq", m, rtn_s)
    rtn_model = m
    best = None
    for method in ("gptq", "gptq+search"):
        t = time.perf_counter()
        m = qengine.quantize_model(copy.deepcopy(model), "nf4", 64, True, progress=False, method=method,
                                   calibration=calib)
        d = row(f"{method} nf4/64/dq", m, time.perf_counter() - t)
        if best is None or d < best[0]:
            best = (d, method)
    plans = {}
    for sens in ("proxy",) + (() if args.no_loss_plan else ("loss",)):
        t = time.perf_counter()
        pl = qengine.plan(model, calib, budget=args.budget, sensitivity=sens, loss_tokens=args.loss_tokens)
        plan_s = time.perf_counter() - t
        t = time.perf_counter()
        m = qengine.quantize_model(copy.deepcopy(model), plan=pl, calibration=calib, progress=False)
        quant_s = time.perf_counter() - t
        print(pl)
        row(f"plan@{args.budget:g} ({sens})", m, plan_s + quant_s)
        plans[sens] = (pl, m, plan_s + quant_s)
        out[f"plan_{sens}"] = {"plan": pl.to_dict(), "plan_seconds": plan_s, "quantize_seconds": quant_s,
                               "measurements": {n: [{k: (v.label if hasattr(v, "label") else v) for k, v in mm.items()}
                                                    for mm in per] for n, per in pl.measurements.items()}}
    if "loss" in plans:  # how well the cheap estimates rank what was measured
        meas = plans["loss"][0].measurements
        pts = [mm for per in meas.values() for mm in per if mm["candidate"] != FLOAT16]
        losses = [mm["loss"] for mm in pts]
        out["spearman_output_error_vs_loss"] = spearman([mm["error"] for mm in pts], losses)
        proxy = plans["proxy"][0].measurements
        gain = {n: per[0]["gain"] for n, per in proxy.items()}
        out["spearman_proxy_vs_loss"] = spearman([gain[n] * mm["error"] for n, per in meas.items() for mm in per
                                                  if mm["candidate"] != FLOAT16], losses)
        within = [spearman([mm["error"] for mm in per if mm["candidate"] != FLOAT16],
                           [mm["loss"] for mm in per if mm["candidate"] != FLOAT16]) for per in meas.values()]
        out["spearman_within_layer_mean"] = sum(within) / len(within)
        print(f"Spearman over {len(pts)} (layer, candidate) pairs vs measured loss increase: raw output error "
              f"{out['spearman_output_error_vs_loss']:.3f}, proxy (gain-scaled) {out['spearman_proxy_vs_loss']:.3f}; "
              f"within a layer (mean) {out['spearman_within_layer_mean']:.3f}")
    corrected = None
    if not args.no_correct:
        pl, m, s = plans["proxy"]
        label_plan = f"plan@{args.budget:g} (proxy)"
        t = time.perf_counter()
        qengine.add_lora(m, r=args.rank, init="correct", calibration=calib, reference=model)
        corr_s = time.perf_counter() - t
        label = f"plan + correction r{args.rank} (frozen)"
        d = row(label, m, s + corr_s)
        diff, se = compare(label, label_plan)
        out["correction_on_plan"] = {"closes_of_remaining": None if not nll or rows_d(label_plan) == 0 else
                                     -diff / rows_d(label_plan), "diff": diff, "se": se, "seconds": corr_s}
        corrected = (m, s + corr_s, label)
        gb = copy.deepcopy(model)
        t = time.perf_counter()
        qengine.quantize_model(gb, "nf4", 64, True, progress=False, method=best[1], calibration=calib)
        best_s = time.perf_counter() - t
        t = time.perf_counter()
        qengine.add_lora(gb, r=args.rank, init="correct", calibration=calib, reference=model)
        label = f"{best[1]} + correction r{args.rank}"
        row(label, gb, best_s + time.perf_counter() - t)
        diff, se = compare(label, f"{best[1]} nf4/64/dq")
        out["correction_on_best"] = {"diff": diff, "se": se, "remaining": rows_d(f"{best[1]} nf4/64/dq")}
        # the same on RTN, where there is a gap to close
        rc = copy.deepcopy(rtn_model)
        t = time.perf_counter()
        qengine.add_lora(rc, r=args.rank, init="correct", calibration=calib, reference=model)
        label = f"rtn + correction r{args.rank}"
        row(label, rc, rtn_s + time.perf_counter() - t)
        compare(label, "rtn nf4/64/dq")
    if not args.no_train:
        train_txt = os.path.join(lm.path or real_lm.model_dir(), f"{args.train_text}.txt")
        cfg = dict(steps=args.steps, lr=args.lr, rank=args.rank, batch=4, seq_len=ctx, optim="adamw",
                   checkpoint_every=10**9, log_every=max(args.steps // 4, 1), gradient_checkpointing=False,
                   kd_temperature=args.kd_temperature)
        out["training"] = {**cfg, "data": train_txt, "teacher_dtype": "bfloat16", "start": "rtn nf4/64/dq"}
        runs = [("rtn + QLoRA (LM loss)", rtn_model, None, rtn_s, 1.0),
                ("rtn + distillation", rtn_model, lm.path, rtn_s, 1.0)]
        if args.kd_mix < 1.0:
            runs.append((f"rtn + distillation (kd_alpha {args.kd_mix:g})", rtn_model, lm.path, rtn_s, args.kd_mix))
        if corrected is not None:
            runs.append((corrected[2] + " + distillation", corrected[0], lm.path, corrected[1], 1.0))
        for label, start, teacher, s0, alpha in runs:
            student = copy.deepcopy(start)
            c = FinetuneConfig(**cfg, kd_alpha=alpha)
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                res = finetune(student, lm.tokenizer, train_txt, tmp, c, teacher=teacher,
                               log=lambda msg: print("   ", msg, flush=True))
                train_s = time.perf_counter() - t
            label = f"{label} {args.steps} steps"
            row(label, student.eval(), s0 + train_s)
            rows[-1]["train_seconds"] = train_s
            rows[-1]["tokens_per_s"] = res["tokens_per_s"]
        compare(f"rtn + distillation {args.steps} steps", f"rtn + QLoRA (LM loss) {args.steps} steps")
        if args.kd_mix < 1.0:
            compare(f"rtn + distillation (kd_alpha {args.kd_mix:g}) {args.steps} steps",
                    f"rtn + QLoRA (LM loss) {args.steps} steps")
        if corrected is not None:
            compare(f"{corrected[2]} + distillation {args.steps} steps", corrected[2])
    out["rows"] = rows
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
