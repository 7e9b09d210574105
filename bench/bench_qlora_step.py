# One QLoRA training step of a ~110M-parameter Llama (random init: a speed figure, not a quality
# one) against a bfloat16 PEFT LoRA step and bitsandbytes' 4-bit QLoRA step on the same model,
# interleaved, plus where qengine's step spends its time (torch.profiler).
"""Usage: python bench/bench_qlora_step.py [--rounds 5] [--seq 512] [--rank 16] [--threads N]
                                      [--no-bnb] [--with-peft-on-qengine] [--json PATH]

Each config: the model in bfloat16, LoRA rank r (alpha 2r, no dropout) on every projection
(q/k/v/o/gate/up/down), float32 adapters (PEFT's default), AdamW on the adapters, batch 1 of
`seq` tokens; qengine: quantize_model (NF4 + double quant) + add_lora; bitsandbytes:
Linear4bit (NF4 + double quant, bfloat16 compute) under PEFT. A round times one step of each
config in turn (after one warm-up step each); the table gives each config's median step and
the median of its per-round ratio to qengine's."""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _harness as H  # noqa: E402

import qengine  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq))
    return LlamaForCausalLM(config).to(torch.bfloat16).train()


def qengine_model(base, r):
    model = copy.deepcopy(base)
    qengine.quantize_model(model, "nf4", double_quant=True, progress=False)
    qengine.add_lora(model, r=r, alpha=2 * r)
    return model, qengine.lora_parameters(model)


def qengine_peft_model(base, r):
    """qengine's quantized model under PEFT's own LoRA (what TRL's trainers build from a
    LoraConfig): one active adapter, so LoraQuantLinear fuses its side path into the kernel."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    qengine.quantize_model(model, "nf4", double_quant=True, progress=False)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=PROJECTIONS))
    return model, [p for p in model.parameters() if p.requires_grad]


def peft_model(base, r):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                           target_modules=PROJECTIONS))
    return model, [p for p in model.parameters() if p.requires_grad]


def bnb_model(base, r):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in PROJECTIONS and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.float32), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                q = q.to("cpu")  # quantizes
                setattr(module, child_name, q)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=PROJECTIONS))
    return model, [p for p in model.parameters() if p.requires_grad]


def make_step(model, params, ids):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def breakdown(step) -> dict:
    """Self CPU time of one step by category (fractions), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    cats = {"quantized matmul forward": 0.0, "quantized matmul backward (x)": 0.0, "LoRA backward": 0.0,
            "attention": 0.0, "other matmuls (lm_head, torch LoRA)": 0.0, "optimizer": 0.0, "rest": 0.0}
    for e in prof.key_averages():
        name, t = e.key, e.self_cpu_time_total
        # custom_op's autograd wrapper (GeneratedBackwardFor_qengine_<op>_default) holds the
        # forward kernel's time as its own; its ...Backward node calls matmul_t.
        forward_wrapper = name.startswith("GeneratedBackwardFor_qengine_") and not name.endswith("Backward")
        if name in ("qengine::matmul", "qengine::sparse24_matmul") or forward_wrapper:
            cats["quantized matmul forward"] += t
        elif name == "qengine::matmul_t":
            cats["quantized matmul backward (x)"] += t
        elif name == "qengine::lora_backward":
            cats["LoRA backward"] += t
        elif "scaled_dot_product" in name or "flash_attention" in name:
            cats["attention"] += t
        elif name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            cats["other matmuls (lm_head, torch LoRA)"] += t
        elif "adamw" in name.lower() or "_foreach" in name:
            cats["optimizer"] += t
        else:
            cats["rest"] += t
    total = sum(cats.values()) or 1.0
    return {k: v / total for k, v in cats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_llama_size_args(ap, vocab=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    ap.add_argument("--with-peft-on-qengine", action="store_true",
                    help="also time PEFT's LoRA (LoraConfig) on the qengine-quantized model")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                    "qlora_step.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        qengine.set_num_threads(args.threads)
    base = build_base(args)
    n_params = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
    builders = {"qengine nf4+dq": qengine_model, "bf16 PEFT LoRA": peft_model}
    if args.with_peft_on_qengine:
        builders["qengine nf4+dq, PEFT LoRA"] = qengine_peft_model
    if not args.no_bnb:
        try:
            import bitsandbytes  # noqa: F401

            builders["bitsandbytes nf4+dq"] = bnb_model
        except ImportError:
            print("bitsandbytes is not installed: its column is left out")
    steps = {}
    for name, build in builders.items():
        model, params = build(base, args.rank)
        steps[name] = make_step(model, params, ids)
        steps[name]()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    ref = "qengine nf4+dq"
    print(f"{H.machine_info()['cpu_model']}, {os.cpu_count()} CPUs")
    print(f"Llama {n_params / 1e6:.0f}M parameters ({args.layers} layers, hidden {args.hidden}), seq {args.seq}, "
          f"LoRA r={args.rank} on {', '.join(PROJECTIONS)}; {args.rounds} interleaved rounds, threads "
          f"{torch.get_num_threads()}")
    print(f"{'config':<22} {'step s (median)':>16} {'qengine / config':>17}")
    result = {"params": n_params, "seq": args.seq, "rank": args.rank, "configs": {}}
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(times[ref], ts))
        print(f"{name:<22} {statistics.median(ts):>16.3f} {ratio:>17.3f}")
        result["configs"][name] = {"step_s": ts, "qengine_over_config": ratio}
    share = breakdown(steps[ref])
    print("\nqengine step, self CPU time by category (torch.profiler, one step):")
    for k, v in share.items():
        print(f"  {k:<32} {100 * v:5.1f} %")
    H.write_json(args.json, [{"config": name, **r} for name, r in result.pop("configs").items()], **result,
                 breakdown=share)


if __name__ == "__main__":
    main()
