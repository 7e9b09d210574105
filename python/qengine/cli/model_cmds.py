"""`qengine quantize`, `qengine finetune` and `qengine generate`: Hugging Face model directories
from the shell (they need the hf extra's packages: transformers, peft, ...)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .._io import check_writable_dir
from ..finetune import DEFAULT_TARGETS, OPTIMIZERS, TEACHER_DTYPES, FinetuneConfig, finetune, load_tokenizer


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


# Kept in float unless --no-default-skip: quantizing the output projection costs the most quality
# per byte saved (QLoRA and bitsandbytes keep it in float too).
DEFAULT_SKIP = ("lm_head",)


def quantize_skip(args: argparse.Namespace) -> list[str]:
    """The modules `qengine quantize` keeps in float: DEFAULT_SKIP (unless --no-default-skip)
    plus every --skip pattern, in order, without repeats."""
    return list(dict.fromkeys((() if args.no_default_skip else DEFAULT_SKIP) + tuple(args.skip)))


def _warn_unmatched_skip(model_dir: str, patterns: list[str]) -> None:
    """One stderr warning per --skip pattern that names no linear layer of the model (a typo
    would otherwise quantize the layer it meant to keep, silently). A warning, not an error, so
    one script can pass the same --skip to models of several architectures."""
    from torch import nn

    from ..hf.checkpoint import build_model, load_config
    from .._targets import matches

    config = load_config(model_dir)
    if getattr(config, "quantization_config", None) is not None:
        return  # quantize_checkpoint refuses it, with its own message
    skeleton = build_model(config, empty=True)  # meta device: no memory, no weights read
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    for pattern in patterns:
        if not any(matches(name, [pattern]) for name in linears):
            print(f"qengine: warning: --skip {pattern!r} matches no linear layer of {model_dir} (a pattern is a "
                  "full module name, a last component such as down_proj, or a parent such as model.layers.0)",
                  file=sys.stderr)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..hf.checkpoint import quantize_checkpoint

    if args.method != "rtn" or args.plan:
        return _quantize_calibrated(args)
    given = [flag for flag, on in (("--calib", args.calib), ("--act-order", args.act_order),
                                   ("--damp", args.damp != 0.01)) if on]
    if given:
        raise ValueError(f"{given[0]} applies to --method gptq, search or gptq+search, not to --method rtn")
    check_writable_dir(args.out_dir, "out_dir")
    if args.skip:
        _warn_unmatched_skip(args.model_dir, args.skip)
    stats = quantize_checkpoint(args.model_dir, args.out_dir, args.format, args.blocksize, args.double_quant,
                                skip=quantize_skip(args), bnb=args.bnb, progress=not args.quiet)
    layout = "bitsandbytes" if args.bnb else "qengine"
    print(f"quantized {stats['layers']} linear layers to {args.format} ({layout} layout) in {args.out_dir}")
    print(f"  weights before: {_mib(stats['bytes_in'])}, after: {_mib(stats['bytes_out'])} "
          f"({100 * stats['bytes_out'] / max(stats['bytes_in'], 1):.1f}%)")
    return 0


def token_stream(model_dir: str, vocab_size: int, path: str):
    """(int64 token stream of the text file, tokenizer name): the model directory's tokenizer,
    else the byte tokenizer (as `qengine finetune` reads its data)."""
    from ..finetune import load_tokenizer
    from ..text_data import ByteTokenizer, read_texts, tokenize_corpus

    texts = read_texts(path)  # ValueError naming the file when missing, not UTF-8, empty
    tok = load_tokenizer(model_dir, vocab_size)
    stream = tokenize_corpus(texts, tok)
    if int(stream.max()) >= vocab_size:
        raise ValueError(f"the tokenizer of {model_dir} produces ids up to {int(stream.max())}, outside the model's "
                         f"vocabulary of {vocab_size}")
    return stream, "bytes" if isinstance(tok, ByteTokenizer) else type(tok).__name__


def _quantize_calibrated(args: argparse.Namespace) -> int:
    """--method gptq / search / gptq+search: the float model loaded whole (not streamed), then
    quantize_model on calibration windows of the --calib text, then save_quantized."""
    import time

    import transformers

    from ..formats import get_format
    from ..hf.checkpoint import saved_quantization_config, copy_side_files, load_config, save_quantized
    from ..model import quantize_model

    plan = None
    if args.plan:
        from ..calibrate.plan import Plan

        plan = Plan.load(args.plan)  # ValueError naming the file
        if args.method != "rtn":
            raise ValueError("--plan gives every layer its method; drop --method")
        if args.bnb:
            raise ValueError("--bnb writes one format; drop it for --plan")
        gptq = any(c.method in ("gptq", "gptq+search") for c in plan.quantized().values())
        if gptq and args.calib is None:
            raise ValueError(f"{args.plan} has GPTQ layers, which need calibration text: --calib FILE")
    if args.bnb:
        raise ValueError("--bnb writes round-to-nearest checkpoints only; drop it for --method " + args.method)
    if args.calib is None and args.method != "search" and plan is None:
        raise ValueError(f"--method {args.method} needs calibration text: --calib FILE (.txt or .jsonl)")
    if args.calib is None and (args.calib_tokens is not None or args.calib_seq_len != 512):
        raise ValueError("--calib-tokens and --calib-seq-len need --calib FILE")
    if args.method == "search" and (args.act_order or args.damp != 0.01):
        raise ValueError("--act-order and --damp apply to --method gptq or gptq+search, not to search")
    tokens = 32768 if args.calib_tokens is None else args.calib_tokens
    if args.calib_seq_len < 2 or tokens < args.calib_seq_len:
        raise ValueError(f"--calib-tokens ({tokens}) must hold at least one window of --calib-seq-len "
                         f"({args.calib_seq_len} >= 2)")
    get_format(args.format)
    check_writable_dir(args.out_dir, "out_dir")
    if os.path.abspath(args.model_dir) == os.path.abspath(args.out_dir):
        raise ValueError("the output directory must differ from the model directory")
    check_model_dir(args.model_dir)
    config = load_config(args.model_dir)
    if saved_quantization_config(config) is not None:
        raise ValueError(f"{args.model_dir!r} is already quantized ({saved_quantization_config(config).get('quant_method')})")
    if args.skip:
        _warn_unmatched_skip(args.model_dir, args.skip)
    calib, note = None, "no calibration data (data-free search)"
    if args.calib is not None:
        stream, tok_name = token_stream(args.model_dir, config.vocab_size, args.calib)
        n = min(tokens, stream.numel()) // args.calib_seq_len
        if n < 1:
            raise ValueError(f"{args.calib} has {stream.numel()} tokens, fewer than one window of --calib-seq-len "
                             f"{args.calib_seq_len}")
        calib = stream[: n * args.calib_seq_len].reshape(n, args.calib_seq_len)
        short = n < tokens // args.calib_seq_len
        note = (f"{calib.numel():,} calibration tokens ({n} windows of {args.calib_seq_len}, {tok_name} tokenizer) "
                f"from {args.calib}" + (f", which holds fewer than the {tokens:,} asked" if short else ""))
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    bytes_in = sum(p.numel() * p.element_size() for p in model.parameters())
    kw = {"damp": args.damp, "act_order": args.act_order} if args.method in ("gptq", "gptq+search") else {}
    t0 = time.perf_counter()
    quantize_model(model, args.format, args.blocksize, args.double_quant, skip=quantize_skip(args),
                   progress=not args.quiet, method=args.method, calibration=calib, plan=plan, **kw)
    seconds = time.perf_counter() - t0
    save_quantized(model, args.out_dir)
    copy_side_files(args.model_dir, args.out_dir)
    layers = sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear")
    bytes_out = os.path.getsize(os.path.join(args.out_dir, "model.safetensors"))
    what = f"by the plan {args.plan}" if plan is not None else f"to {args.format} with {args.method}"
    print(f"quantized {layers} linear layers {what} ({note}) in {seconds:.1f} s, "
          f"written to {args.out_dir}")
    print(f"  weights before (float32 in memory): {_mib(bytes_in)}, after: {_mib(bytes_out)} "
          f"({100 * bytes_out / max(bytes_in, 1):.1f}%)")
    return 0


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("out_dir", help="where to write the quantized checkpoint")
    p.add_argument("--format", default="nf4", help="qengine format (default nf4)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the block scales too (default on)")
    p.add_argument("--skip", nargs="+", action="extend", default=[], metavar="MODULE",
                   help="also keep these modules in float, in addition to lm_head: a full module name, a last "
                        "component (down_proj) or a parent (model.layers.0); may be repeated; a pattern that "
                        "matches no linear layer gets a warning")
    p.add_argument("--no-default-skip", action="store_true",
                   help="do not keep lm_head in float by default: only the --skip modules stay in float")
    p.add_argument("--bnb", action="store_true", help="write the transformers + bitsandbytes 4-bit layout")
    p.add_argument("--method", choices=("rtn", "gptq", "search", "gptq+search"), default="rtn",
                   help="how codes are chosen: rtn (round-to-nearest, streamed tensor by tensor; default), gptq "
                        "(needs --calib), search (searched block scales; weighted by --calib's activations when "
                        "given), gptq+search. Non-rtn methods load the whole float model")
    p.add_argument("--calib", metavar="FILE", help="calibration text (.txt or .jsonl), tokenized with the model's "
                   "tokenizer (or bytes when it has none); its first --calib-tokens tokens are used")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 32768)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (fraction of H's mean diagonal)")
    p.add_argument("--act-order", action="store_true", help="GPTQ columns in decreasing activation energy")
    p.add_argument("--plan", metavar="PLAN_JSON", help="per-layer settings written by `qengine plan` (replaces "
                   "--format, --blocksize, --double-quant and --method)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def check_model_dir(model_dir: str) -> None:
    """Fails fast, with a ValueError naming the file, on a model directory that cannot load:
    no or malformed config.json, no weights file, a safetensors file whose header or size is
    wrong (e.g. truncated). Reads configs and headers only."""
    from safetensors import SafetensorError, safe_open

    from ..hf.checkpoint import load_config

    load_config(model_dir)
    present = [f for f in _WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, f))]
    if not present:
        raise ValueError(f"{model_dir!r} has no weights file ({', '.join(_WEIGHT_FILES)})")
    shards = []
    if present[0] == "model.safetensors":
        shards = [present[0]]
    elif present[0] == "model.safetensors.index.json":
        index = os.path.join(model_dir, present[0])
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is malformed: {e}") from None
    for name in shards:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise ValueError(f"{model_dir!r}: weights file {name} is missing")
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _load_gguf(path: str):
    """A GGUF file's model as qengine.hf.load_model places it (already quantized: --format does
    not apply), with the tokenizer the file carries, or the byte tokenizer when it has none."""
    from ..hf import load_model

    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    model = load_model(path)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer in the file's metadata
        tok = load_tokenizer(None, model.config.vocab_size)
    return model, tok


def _load(model_dir: str, fmt: str):
    from safetensors import SafetensorError

    from ..hf.checkpoint import load_model

    if model_dir.endswith(".gguf"):
        return _load_gguf(model_dir)
    check_model_dir(model_dir)
    try:
        model = load_model(model_dir, format=fmt)
    except (OSError, SafetensorError) as e:  # what the checks above cannot see (e.g. a damaged .bin)
        raise ValueError(f"cannot load the model in {model_dir!r}: {e}") from None
    return model, load_tokenizer(model_dir, model.config.vocab_size)


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, rank=args.rank, alpha=args.alpha, targets=tuple(args.targets),
                         batch=args.batch, seq_len=args.seq_len, optim=args.optim, compile=args.compile, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                         gradient_checkpointing=not args.no_gradient_checkpointing,
                         kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha, teacher_dtype=args.teacher_dtype)
    cfg.validate()
    if args.teacher is None and cfg.distills():
        raise ValueError("--kd-temperature, --kd-alpha and --teacher-dtype apply to distillation: give --teacher DIR")
    if args.teacher is not None and not os.path.isdir(args.teacher):
        raise ValueError(f"teacher directory {args.teacher!r} does not exist")
    check_writable_dir(args.out, "--out")
    if not os.path.isfile(args.data):
        raise ValueError(f"data file {args.data!r} does not exist")
    torch.manual_seed(args.seed)
    model, tok = _load(args.model, args.format)
    result = finetune(model, tok, args.data, args.out, cfg, model_dir=args.model, teacher=args.teacher)
    losses = result["losses"]
    if losses:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {result['steps']} steps, "
              f"{result['tokens_per_s']:,.0f} tokens/s")
    print(f"wrote {', '.join(result['files'])}")
    return 0


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (float, or quantized by `qengine quantize`) or a .gguf file")
    p.add_argument("--data", required=True, help="training text: .txt, or .jsonl with a \"text\" field per line")
    p.add_argument("--out", required=True, help="output directory: adapter.safetensors, losses.json, loss.png (with "
                   "matplotlib), checkpoint/")
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
    p.add_argument("--teacher", metavar="MODEL_DIR", help="distill: train on the KL to this float model's logits "
                   "(same tokenizer and vocabulary; typically the float model --model was quantized from)")
    p.add_argument("--kd-temperature", type=float, default=2.0, help="distillation temperature T > 0 (the KL is "
                   "scaled by T^2; default 2)")
    p.add_argument("--kd-alpha", type=float, default=1.0, help="weight of the KL in [0, 1]; 1 - alpha goes to the "
                   "LM loss (default 1: KL only)")
    p.add_argument("--teacher-dtype", choices=tuple(TEACHER_DTYPES), default="bfloat16",
                   help="dtype the teacher runs in (default bfloat16)")
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
    if args.adapter and not os.path.isfile(args.adapter):
        raise ValueError(f"adapter file {args.adapter!r} does not exist")
    model, tok = _load(args.model, args.format)
    if args.adapter:
        add_lora_from_adapter(model, args.adapter, add_lora, load_adapter)
    model.config.use_cache = True
    print(args.prompt + generate_text(model.eval(), tok, args.prompt, args.max_new_tokens))
    return 0


def add_lora_from_adapter(model, path: str, add_lora, load_adapter) -> None:
    """Adds LoRA layers shaped as the adapter file records, then loads it."""
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
    p.add_argument("--model", required=True, help="model directory (float or quantized) or a .gguf file")
    p.add_argument("--adapter", help="LoRA adapter written by `qengine finetune`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--format", default="nf4", help="format for a float model (default nf4)")
    p.set_defaults(func=cmd_generate)
