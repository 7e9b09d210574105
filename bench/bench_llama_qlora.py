# Whole-model figures on a ~100M-parameter LlamaForCausalLM built from a config (random init, no
# download): quantize_model's bits per parameter, model bytes against float32, conversion peak
# memory, a QLoRA loop eager and under torch.compile(fullgraph=True), and the adapter's size.
"""Usage: python bench/bench_llama_qlora.py [--steps 6] [--layers 12] [--json bench/out/llama_qlora.json]

Never asserts: prints the figures and the ratios the project's targets are stated in.
Peak memory is the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the conversion) above its size before the model was built."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _harness as H  # noqa: E402

import qengine  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = (b"The quick brown fox jumps over the lazy dog. Quantization stores each weight in four bits, "
        b"and a low-rank adapter learns what the four bits lost. ") * 4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _loss(model, ids):
    return model(ids, labels=ids).loss


def _train(model, fn, ids, steps):
    opt = torch.optim.AdamW(qengine.lora_parameters(model), lr=2e-3)
    losses, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss = fn(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return losses, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    H.add_llama_size_args(ap, vocab=32000)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--json", default="bench/out/llama_qlora.json")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=512, use_cache=False,
                      tie_word_embeddings=True)
    rss0 = _status_kib("VmRSS") * 1024
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fp32_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    built = _status_kib("VmRSS") * 1024 - rss0
    peak_ok = _reset_peak()
    t = time.perf_counter()
    qengine.quantize_model(model, "nf4", 64, True, progress=False)
    convert_s = time.perf_counter() - t
    peak = _status_kib("VmHWM") * 1024 - rss0
    rep = qengine.memory_report(model)
    rep_bf16 = qengine.memory_report(copy.deepcopy(model).to(torch.bfloat16))

    ids = torch.tensor(list(TEXT[: 2 * args.seq]), dtype=torch.long).reshape(2, args.seq)
    qengine.add_lora(model, r=16, alpha=32, target_modules=PROJECTIONS)
    model.train()
    start = {k: v.clone() for k, v in qengine.adapter_state_dict(model).items()}
    eager_losses, eager_t = _train(model, lambda x: _loss(model, x), ids, args.steps)
    qengine.load_adapter_state_dict(model, start)
    compiled = torch.compile(model, fullgraph=True, backend=args.backend)
    t = time.perf_counter()
    comp_losses, comp_t = _train(model, lambda x: _loss(compiled, x), ids, args.steps)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "adapter.safetensors")
        qengine.save_adapter(model, path)
        adapter_bytes = os.path.getsize(path)
    lora_params = qengine.memory_report(model)["lora"]["params"]

    rows = [
        {"figure": "parameters (float model)", "value": f"{n_params / 1e6:.1f} M"},
        {"figure": "quantized layers: bits per parameter", "value": f"{rep['quantized']['bits_per_param']:.4f}"},
        {"figure": "quantized share of parameters", "value": f"{rep['quantized']['params'] / n_params:.3f}"},
        {"figure": "model bytes / float32 (rest float32)", "value": f"{rep['total']['bytes'] / fp32_bytes:.3f}"},
        {"figure": "model bytes / float32 (rest bfloat16)", "value": f"{rep_bf16['total']['bytes'] / fp32_bytes:.3f}"},
        {"figure": "conversion peak / float32 model" + ("" if peak_ok else " (no HWM reset)"),
         "value": f"{peak / fp32_bytes:.3f}"},
        {"figure": "resident growth from building the model / float32 model", "value": f"{built / fp32_bytes:.3f}"},
        {"figure": "conversion time (s)", "value": f"{convert_s:.1f}"},
        {"figure": "eager losses", "value": " ".join(f"{v:.4f}" for v in eager_losses)},
        {"figure": f"compiled ({args.backend}, fullgraph) losses", "value": " ".join(f"{v:.4f}" for v in comp_losses)},
        {"figure": "max |eager - compiled| loss", "value": f"{max(abs(a - b) for a, b in zip(eager_losses, comp_losses)):.2e}"},
        {"figure": "step time eager / compiled (s, median after first)",
         "value": f"{sorted(eager_t[1:])[len(eager_t[1:]) // 2]:.2f} / {sorted(comp_t[1:])[len(comp_t[1:]) // 2]:.2f}"},
        {"figure": "compile + first step (s)", "value": f"{comp_t[0]:.1f}"},
        {"figure": "LoRA parameters (r=16, all projections)", "value": f"{lora_params / 1e6:.2f} M"},
        {"figure": "adapter file / quantized model bytes", "value": f"{adapter_bytes / rep['total']['bytes']:.4f}"},
        {"figure": "adapter file / float32 model bytes", "value": f"{adapter_bytes / fp32_bytes:.4f}"},
    ]
    H.print_table(rows, [("figure", "figure", ""), ("value", "value", "")], title="LlamaForCausalLM QLoRA")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    H.write_json(args.json, rows, config=vars(args), memory_report=rep, memory_report_bf16=rep_bf16,
                 fp32_bytes=fp32_bytes, peak_bytes=peak, built_bytes=built, adapter_bytes=adapter_bytes, eager_losses=eager_losses,
                 compiled_losses=comp_losses)


if __name__ == "__main__":
    main()
