# Peak resident memory of AutoModelForCausalLM.from_pretrained(quantization_config=QEngineConfig)
# on a ~100M-parameter Llama saved with save_pretrained, against the float load measured in the
# same run, and the reload of the saved quantized folder.
"""Usage: python bench/bench_hf_load_memory.py [--layers 12] [--json bench/out/hf_load_memory.json]

Each load runs in a fresh Python process; its peak is the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs after the imports, read after every weight of the
loaded model has been touched, so mmapped weights count as resident) and the interpreter's baseline
is the resident size after importing torch, transformers and qengine. Reported against the
target: peak <= baseline + quantized model bytes + 1.5 x the largest float layer. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import _harness as H  # noqa: E402

CHILD = H.PROC_STATUS_KIB + r"""
import json, sys, time
import torch, transformers, qengine, qengine.hf
from transformers import AutoModelForCausalLM
path, mode, warm = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
ids = torch.randint(0, 100, (1, 8))
kw = {"quantization_config": qengine.hf.QEngineConfig(format="nf4", double_quant=True)} if mode == "quantize" else {}
# Warm-up load of a 1-layer model of the same kind: the modules and code paths from_pretrained
# imports lazily belong to the interpreter's baseline, not to the model.
AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32, **kw)
import gc
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kib("VmRSS")
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
secs = time.perf_counter() - t
for tensor in list(model.parameters()) + list(model.buffers()):  # touch every page: mmapped pages count once read
    flat = tensor.detach().reshape(-1)
    float(flat[:: max(1, 4096 // flat.element_size())].double().sum())
peak = kib("VmHWM")
rep = qengine.memory_report(model)
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"baseline_kib": base, "peak_kib": peak, "seconds": secs, "model_bytes": rep["total"]["bytes"],
                  "quantized_layers": rep["quantized"]["modules"], "logits_sum": float(logits.double().sum())}))
"""


def _child(path: str, mode: str, warm: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, mode, warm], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    H.add_llama_size_args(ap, vocab=8192)
    ap.add_argument("--json", default="bench/out/hf_load_memory.json")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=12,
                      tie_word_embeddings=False)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.json)) or None) as tmp:
        model = LlamaForCausalLM(cfg)
        small = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1, "vocab_size": 256}))
        small.save_pretrained(os.path.join(tmp, "warm"))
        n_params = sum(p.numel() for p in model.parameters())
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        largest = max(m.weight.numel() * 4 for m in linears)
        model.save_pretrained(os.path.join(tmp, "float"))
        del model
        rows = []
        warm = os.path.join(tmp, "warm")
        fl = _child(os.path.join(tmp, "float"), "float", warm)
        q = _child(os.path.join(tmp, "float"), "quantize", warm)
        # Save the quantized model and reload it (no quantization on that path).
        import qengine.hf
        from transformers import AutoModelForCausalLM
        qm = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "float"),
                                                  quantization_config=qengine.hf.QEngineConfig(format="nf4"))
        qm.save_pretrained(os.path.join(tmp, "quantized"))
        qm = AutoModelForCausalLM.from_pretrained(warm, quantization_config=qengine.hf.QEngineConfig(format="nf4"))
        qm.save_pretrained(os.path.join(tmp, "warm_quantized"))
        del qm
        rq = _child(os.path.join(tmp, "quantized"), "reload", os.path.join(tmp, "warm_quantized"))
        for name, r in (("float load", fl), ("quantize while loading", q), ("reload quantized folder", rq)):
            above = (r["peak_kib"] - r["baseline_kib"]) * 1024
            target = r["model_bytes"] + 1.5 * largest
            rows.append({"load": name, "params_M": n_params / 1e6, "model_MiB": r["model_bytes"] / H.MiB,
                         "peak_above_baseline_MiB": above / H.MiB, "baseline_MiB": r["baseline_kib"] / 1024,
                         "target_MiB": target / H.MiB, "peak_over_target": above / target,
                         "peak_vs_float_load": above / ((fl["peak_kib"] - fl["baseline_kib"]) * 1024),
                         "seconds": r["seconds"], "logits_sum": r["logits_sum"]})
    H.print_table(rows, [("load", "load", "s"), ("params_M", "params (M)", ".1f"), ("model_MiB", "model MiB", ".1f"),
                         ("baseline_MiB", "baseline MiB", ".0f"), ("peak_above_baseline_MiB", "peak-base MiB", ".1f"),
                         ("target_MiB", "target MiB", ".1f"), ("peak_over_target", "peak/target", ".2f"),
                         ("peak_vs_float_load", "vs float load", ".2f"), ("seconds", "s", ".2f")],
                  title=f"from_pretrained peak RSS (largest float layer {largest / H.MiB:.1f} MiB)")
    H.write_json(args.json, rows, largest_layer_bytes=largest)


if __name__ == "__main__":
    main()
