# LoftQ against the standard LoRA init (B = 0) on a small Llama trained beforehand on the shipped
# demo text: relative logits error of quantized base + adapter against the float model.
"""Usage: python bench/bench_loftq.py [--steps 300] [--json bench/out/loftq.json]

Trains a 2-block byte-level Llama from a config (random init) on python/qengine/assets/
demo_text.txt for --steps AdamW steps, then for each rank and LoftQ iteration count reports
||logits(quantized + adapter) - logits(float)|| / ||logits(float)|| on held-out windows, with
the standard init (B = 0, i.e. the quantized model alone) measured in the same run. Never asserts.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _harness as H  # noqa: E402

import qengine  # noqa: E402
from qengine.text_data import ByteTokenizer, batch_for_step, read_texts, tokenize_corpus  # noqa: E402

TEXT = os.path.join(os.path.dirname(qengine.__file__), "assets", "demo_text.txt")


def trained_model(steps: int, hidden: int = 128, layers: int = 2, seed: int = 0):
    """(float model, held-out batch, final training loss): a small Llama trained on the demo text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = ByteTokenizer()
    stream = tokenize_corpus(read_texts(TEXT), tok)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = None
    for step in range(steps):
        ids = batch_for_step(stream, step, 8, 64, seed)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = batch_for_step(stream, 10**6, 8, 64, seed + 1)
    return model.eval(), held_out, float(loss)


def rel_error(model, ref_logits, ids) -> float:
    with torch.no_grad():
        out = model(ids).logits.double()
    return float((out - ref_logits).norm() / ref_logits.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--format", default="nf4")
    ap.add_argument("--json", default="bench/out/loftq.json")
    args = ap.parse_args()
    t = time.perf_counter()
    model, ids, loss = trained_model(args.steps)
    train_s = time.perf_counter() - t
    with torch.no_grad():
        ref = model(ids).logits.double()
    rows = []
    for r in (8, 16):
        std = qengine.add_lora(qengine.quantize_model(copy.deepcopy(model), args.format, progress=False), r=r)
        e_std = rel_error(std, ref, ids)
        rows.append({"rank": r, "init": "standard (B=0)", "iters": 0, "logits_rel_error": e_std, "vs_standard": 1.0})
        for iters in (1, 5):
            lq = qengine.add_lora(copy.deepcopy(model), r=r, init="loftq", iters=iters, format=args.format)
            e = rel_error(lq, ref, ids)
            rows.append({"rank": r, "init": "loftq", "iters": iters, "logits_rel_error": e, "vs_standard": e / e_std})
    H.print_table(rows, [("rank", "rank", "d"), ("init", "init", "s"), ("iters", "iters", "d"),
                         ("logits_rel_error", "logits rel. error", ".4f"), ("vs_standard", "vs standard", ".3f")],
                  title=f"{args.format}, block 64, double quant; model trained {args.steps} steps "
                        f"(final loss {loss:.3f}, {train_s:.0f} s)")
    H.write_json(args.json, rows, steps=args.steps, final_loss=loss)


if __name__ == "__main__":
    main()
