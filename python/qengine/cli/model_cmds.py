"""`qengine quantize`, `qengine finetune` and `qengine generate`: Hugging Face model directories
from the shell (they need the hf extra's packages: transformers, peft, ...)."""

from __future__ import annotations

import argparse
import os

import torch

from ..finetune import DEFAULT_TARGETS, OPTIMIZERS, FinetuneConfig, finetune, load_tokenizer


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..hf.checkpoint import quantize_checkpoint

    stats = quantize_checkpoint(args.model_dir, args.out_dir, args.format, args.blocksize, args.double_quant,
                                skip=args.skip, bnb=args.bnb, progress=not args.quiet)
    layout = "bitsandbytes" if args.bnb else "qengine"
    print(f"quantized {stats['layers']} linear layers to {args.format} ({layout} layout) in {args.out_dir}")
    print(f"  weights before: {_mib(stats['bytes_in'])}, after: {_mib(stats['bytes_out'])} "
          f"({100 * stats['bytes_out'] / max(stats['bytes_in'], 1):.1f}%)")
    return 0


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("out_dir", help="where to write the quantized checkpoint")
    p.add_argument("--format", default="nf4", help="qengine format (default nf4)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the block scales too (default on)")
    p.add_argument("--skip", nargs="*", default=["lm_head"], help="modules left in float (default lm_head)")
    p.add_argument("--bnb", action="store_true", help="write the transformers + bitsandbytes 4-bit layout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)


def _load(model_dir: str, fmt: str):
    from ..hf.checkpoint import load_model

    model = load_model(model_dir, format=fmt)
    return model, load_tokenizer(model_dir, model.config.vocab_size)


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, rank=args.rank, alpha=args.alpha, targets=tuple(args.targets),
                         batch=args.batch, seq_len=args.seq_len, optim=args.optim, compile=args.compile, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                         gradient_checkpointing=not args.no_gradient_checkpointing)
    cfg.validate()
    torch.manual_seed(args.seed)
    model, tok = _load(args.model, args.format)
    result = finetune(model, tok, args.data, args.out, cfg, model_dir=args.model)
    losses = result["losses"]
    if losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {result['steps']} steps, "
              f"{result['tokens_per_s']:,.0f} tokens/s")
    print(f"adapter: {result['adapter']}; loss curve: {os.path.join(args.out, 'loss.png')}")
    return 0


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (float, or quantized by `qengine quantize`)")
    p.add_argument("--data", required=True, help="training text: .txt, or .jsonl with a \"text\" field per line")
    p.add_argument("--out", required=True, help="output directory: adapter, checkpoint, losses, loss.png")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="modules that get LoRA adapters")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--optim", choices=OPTIMIZERS, default="paged_adamw_8bit")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--format", default="nf4", help="format for a float model (default nf4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.set_defaults(func=cmd_finetune)


def generate_text(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (the prompt itself excluded)."""
    from ..text_data import ByteTokenizer

    if isinstance(tok, ByteTokenizer):
        ids = torch.tensor([tok.encode(prompt)])
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=getattr(tok, "pad_token_id", None) or 0)
    new = out[0, ids.shape[1]:]
    return tok.decode(new) if isinstance(tok, ByteTokenizer) else tok.decode(new, skip_special_tokens=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..model import add_lora, load_adapter

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, tok = _load(args.model, args.format)
    if args.adapter:
        add_lora_from_adapter(model, args.adapter, add_lora, load_adapter)
    model.config.use_cache = True
    print(args.prompt + generate_text(model.eval(), tok, args.prompt, args.max_new_tokens))
    return 0


def add_lora_from_adapter(model, path: str, add_lora, load_adapter) -> None:
    """Adds LoRA layers shaped as the adapter file records, then loads it."""
    import json

    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise ValueError(f"adapter file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
    except (SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read adapter file {path!r}: {e}") from None
    if not config:
        raise ValueError(f"{path!r} is not a qengine adapter (no layer config in its metadata)")
    ranks = {int(c["r"]) for c in config.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter {path!r} mixes ranks {sorted(ranks)}")
    add_lora(model, r=ranks.pop(), target_modules=list(config))
    load_adapter(model, path)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (float or quantized)")
    p.add_argument("--adapter", help="LoRA adapter written by `qengine finetune`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--format", default="nf4", help="format for a float model (default nf4)")
    p.set_defaults(func=cmd_generate)
