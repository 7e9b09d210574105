"""A small English causal LM trained here from scratch, for judging quantization quality on
real trained weights (DESIGN.md, "Measuring quality") with nothing downloaded at run time
except one package from PyPI.

Text: the four English texts of the Canterbury compression corpus, which the Brotli sdist
ships as test data (brotli==1.2.1, MIT licence; the texts themselves are public domain):
``alice29.txt`` (Carroll, Alice's Adventures in Wonderland, prose), ``lcet10.txt`` (Library of
Congress workshop proceedings, a US government work, prose), ``asyoulik.txt`` (Shakespeare, As
You Like It) and ``plrabn12.txt`` (Milton, Paradise Lost), 1.19 MB in all. The sdist is
fetched with pip into the cache (never into the repository) and the files are checked against
their SHA-256.

Splits: every text is cut at paragraph boundaries into segments of about 1,500 characters;
segment k goes to *test* when k % 20 in (3, 13), to *calibration* when k % 20 == 8, else to
*train* (about 85 / 5 / 10 %). Deterministic; the tokenizer and the model see only train, so
calibration and test are never trained on, and test is never calibrated on.

Tokenizer: byte-level BPE (vocabulary 2048) trained with the `tokenizers` package on the train
split, saved as a transformers ``PreTrainedTokenizerFast``. Every segment is encoded on its own
and followed by ``<|endoftext|>``; a split is the concatenation of its segments.

Model: ``LlamaForCausalLM`` from a config (hidden 256, MLP 768, 4 layers, 4 heads of 64,
untied lm_head, context 256; 4.46 M parameters, 3.41 M of them in the 28 linears that get
quantized), trained from scratch with AdamW (warm-up + cosine, weight decay 0.1, bf16
autocast, which is ~1.3x faster than float32 here) for 800 steps of 16 x 256 tokens (3.3 M
tokens, ~10 passes over train): about 20 minutes on one thread of a shared 2-core AMD EPYC.
Calibration loss flattens at ~4.0 (test perplexity ~59.5). Saved with ``save_pretrained``
(safetensors, float32) with the tokenizer, ``tokens.safetensors`` (train/calib/test token
streams), the split texts and ``meta.json`` (source, hashes, configs, loss log, timings).

    python bench/real_lm.py --ensure      # build only if the cache lacks it (the default)
    python bench/real_lm.py --rebuild     # train again
    python bench/real_lm.py --info        # print the metadata

    from real_lm import load_real_lm      # with bench/ on sys.path
    lm = load_real_lm()                   # builds it first when missing
    lm.model, lm.tokenizer, lm.encode, lm.calib_tokens, lm.test_tokens, lm.meta

Cache: ``$QENGINE_BENCH_CACHE`` or ``~/.cache/qengine-bench``; the model lives in
``<cache>/real_lm/<TAG>/`` and the sdist in ``<cache>/src/``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["cache_dir", "model_dir", "ensure_real_lm", "load_real_lm", "load_texts", "RealLM",
           "SOURCE", "MODEL_CONFIG", "TRAIN_CONFIG", "TAG"]

SOURCE = {
    "package": "brotli",
    "version": "1.2.1",
    "kind": "sdist",
    "sdist_sha256": "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
    "package_license": "MIT",
    "text_license": "public domain (Project Gutenberg texts / US government work), "
                    "Canterbury corpus files as shipped in the Brotli test data",
    # path inside the sdist -> (sha256, how to normalise)
    "files": {
        "brotli-1.2.1/tests/testdata/alice29.txt":
            ("7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0", "prose"),
        "brotli-1.2.1/tests/testdata/lcet10.txt":
            ("5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f", "prose"),
        "brotli-1.2.1/tests/testdata/asyoulik.txt":
            ("eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc", "lines"),
        "brotli-1.2.1/tests/testdata/plrabn12.txt":
            ("07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c", "lines"),
    },
}

SPLIT_CONFIG = {"segment_chars": 1500, "period": 20, "test": (3, 13), "calib": (8,)}

VOCAB_SIZE = 2048
EOS = "<|endoftext|>"

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    initializer_range=0.02,
)

TRAIN_CONFIG = dict(
    seed=0, seq_len=256, batch=16, steps=800, lr=3e-3, min_lr_ratio=0.1, warmup=40,
    weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0, bf16_autocast=True,
    log_every=20, eval_every=100, eval_windows=32,
)

# Changing the text, the split, the tokenizer, the model or the training recipe changes the
# tag, so an old cache entry is never mistaken for the new one.
_FINGERPRINT = hashlib.sha256(json.dumps([SOURCE, SPLIT_CONFIG, VOCAB_SIZE, MODEL_CONFIG,
                                          TRAIN_CONFIG], sort_keys=True, default=str)
                              .encode()).hexdigest()[:10]
TAG = (f"brotli-canterbury_llama-h{MODEL_CONFIG['hidden_size']}-l{MODEL_CONFIG['num_hidden_layers']}"
       f"-v{VOCAB_SIZE}_{_FINGERPRINT}")


def cache_dir() -> str:
    """``$QENGINE_BENCH_CACHE``, else ``~/.cache/qengine-bench`` (created)."""
    d = os.environ.get("QENGINE_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "qengine-bench")
    os.makedirs(d, exist_ok=True)
    return d


def model_dir() -> str:
    """Where the trained model, tokenizer, token streams and metadata live."""
    return os.path.join(cache_dir(), "real_lm", TAG)


def _log(msg: str) -> None:
    print(f"[real_lm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------- text

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sdist_path() -> str:
    """The pinned sdist in ``<cache>/src``, downloaded with pip if missing."""
    src = os.path.join(cache_dir(), "src")
    os.makedirs(src, exist_ok=True)
    name = f"{SOURCE['package']}-{SOURCE['version']}.tar.gz"
    path = os.path.join(src, name)
    if not os.path.isfile(path):
        _log(f"downloading {SOURCE['package']}=={SOURCE['version']} (sdist) into {src}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", src, f"{SOURCE['package']}=={SOURCE['version']}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(path):
            raise RuntimeError(f"pip download failed ({' '.join(cmd)}):\n{r.stdout}\n{r.stderr}")
    with open(path, "rb") as f:
        digest = _sha256(f.read())
    if digest != SOURCE["sdist_sha256"]:
        # The texts are checked one by one below; a re-packed sdist with the same files is fine.
        _log(f"note: {name} sha256 {digest} differs from the recorded one; checking the files")
    return path


def _normalise(raw: bytes, mode: str) -> str:
    """ASCII text -> paragraphs separated by one blank line. Drops CR and the DOS EOF byte,
    expands tabs, trims every line and collapses runs of spaces, turns the `quote' backticks
    into apostrophes. "prose" joins the hard-wrapped lines of a paragraph with spaces; "lines"
    (verse, plays) keeps line breaks."""
    text = raw.decode("utf-8", errors="replace").replace("\r", "").replace("\x1a", "")
    text = text.replace("\t", " ").replace("`", "'")
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = [re.sub(r" {2,}", " ", ln.strip()) for ln in block.split("\n")]
        lines = [ln for ln in lines if ln]
        if not lines:
            continue
        paras.append(" ".join(lines) if mode == "prose" else "\n".join(lines))
    return "\n\n".join(paras)


def load_texts() -> dict[str, str]:
    """{file name: normalised text} of the four texts, from the cached sdist."""
    out = {}
    with tarfile.open(_sdist_path(), "r:gz") as tar:
        for member, (digest, mode) in SOURCE["files"].items():
            f = tar.extractfile(member)
            if f is None:
                raise RuntimeError(f"{member} is missing from the sdist")
            raw = f.read()
            if _sha256(raw) != digest:
                raise RuntimeError(f"{member}: sha256 {_sha256(raw)} != expected {digest}")
            out[os.path.basename(member)] = _normalise(raw, mode)
    return out


def split_texts(texts: dict[str, str]) -> dict[str, list[str]]:
    """{"train"|"calib"|"test": [segment, ...]}: see the module docstring."""
    cfg = SPLIT_CONFIG
    out = {"train": [], "calib": [], "test": []}
    for name in sorted(texts):
        segs, cur = [], []
        for para in texts[name].split("\n\n"):
            cur.append(para)
            if sum(len(p) for p in cur) >= cfg["segment_chars"]:
                segs.append("\n\n".join(cur))
                cur = []
        if cur:
            segs.append("\n\n".join(cur))
        for k, seg in enumerate(segs):
            r = k % cfg["period"]
            part = "test" if r in cfg["test"] else "calib" if r in cfg["calib"] else "train"
            out[part].append(seg)
    return out


# ------------------------------------------------------------------------------ tokenizer

def _train_tokenizer(train_segments: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(train_segments, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=None, pad_token=EOS, model_max_length=10**9)


def _encode_segments(tokenizer, segments: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for seg in segments:
        ids.extend(tokenizer(seg, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


# ---------------------------------------------------------------------------------- train

def _lr_at(step: int, cfg: dict) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    lo = cfg["lr"] * cfg["min_lr_ratio"]
    return lo + (cfg["lr"] - lo) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def _window_loss(model, stream: torch.Tensor, seq_len: int, n_windows: int, bf16: bool) -> float:
    n = min(n_windows, stream.numel() // seq_len)
    x = stream[: n * seq_len].view(n, seq_len)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=x, labels=x).loss.item()
    model.train()
    return loss


def _train(train_ids: torch.Tensor, calib_ids: torch.Tensor, cfg: dict, log: list) -> "torch.nn.Module":
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=cfg["betas"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    T, B = cfg["seq_len"], cfg["batch"]
    hi = train_ids.numel() - T
    t0 = time.time()
    run = None
    for step in range(cfg["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        starts = torch.randint(0, hi, (B,), generator=gen)
        x = torch.stack([train_ids[s: s + T] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["bf16_autocast"]):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"]).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        li = loss.item()
        run = li if run is None else 0.9 * run + 0.1 * li
        last = step == cfg["steps"] - 1
        if step % cfg["log_every"] == 0 or last:
            el = time.time() - t0
            entry = {"step": step, "loss": round(li, 4), "loss_ema": round(run, 4),
                     "lr": round(_lr_at(step, cfg), 6), "grad_norm": round(gn, 3),
                     "elapsed_s": round(el, 1), "tok_per_s": round((step + 1) * B * T / el, 1)}
            if step % cfg["eval_every"] == 0 or last:
                entry["calib_loss"] = round(_window_loss(model, calib_ids, T, cfg["eval_windows"],
                                                         cfg["bf16_autocast"]), 4)
            log.append(entry)
            _log(json.dumps(entry))
    return model


@contextlib.contextmanager
def _build_lock():
    import fcntl

    path = os.path.join(cache_dir(), "real_lm", f".{TAG}.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_built(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "DONE"))


def ensure_real_lm(rebuild: bool = False, threads: Optional[int] = None) -> str:
    """Builds the model into ``model_dir()`` unless it is there already (or `rebuild`), and
    returns that directory. Safe to call from several processes at once (a file lock)."""
    d = model_dir()
    if _is_built(d) and not rebuild:
        return d
    with _build_lock():
        if _is_built(d) and not rebuild:
            return d
        if threads:
            torch.set_num_threads(threads)
        _log(f"building {d} with {torch.get_num_threads()} thread(s)")
        t_all = time.time()
        texts = load_texts()
        parts = split_texts(texts)
        tokenizer = _train_tokenizer(parts["train"])
        ids = {k: _encode_segments(tokenizer, v) for k, v in parts.items()}
        for k in ids:
            _log(f"{k}: {len(parts[k])} segments, {sum(map(len, parts[k]))} chars, "
                 f"{ids[k].numel()} tokens")
        log: list = []
        t_train = time.time()
        model = _train(ids["train"], ids["calib"], TRAIN_CONFIG, log)
        train_s = time.time() - t_train
        model.eval()

        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        from safetensors.torch import save_file
        save_file({f"{k}_tokens": v.contiguous() for k, v in ids.items()},
                  os.path.join(tmp, "tokens.safetensors"))
        for k, v in parts.items():
            with open(os.path.join(tmp, f"{k}.txt"), "w", encoding="utf-8") as f:
                f.write("\n\n".join(v))
        meta = {
            "tag": TAG, "source": SOURCE, "split": SPLIT_CONFIG,
            "splits": {k: {"segments": len(parts[k]), "chars": sum(map(len, parts[k])),
                           "tokens": int(ids[k].numel())} for k in parts},
            "tokenizer": {"type": "byte-level BPE (tokenizers), trained on train only",
                          "vocab_size": len(tokenizer), "eos": EOS},
            "model_config": MODEL_CONFIG, "train_config": TRAIN_CONFIG,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(train_s, 1), "build_seconds": round(time.time() - t_all, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": _cpu_name(), "log": log,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        with open(os.path.join(tmp, "DONE"), "w") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        _log(f"saved {d} (train {train_s:.0f} s)")
        return d


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------- load

@dataclass
class RealLM:
    """What load_real_lm returns. Unpacks as (model, tokenizer, calib_tokens, test_tokens)."""
    model: "torch.nn.Module"            # LlamaForCausalLM, float32, eval mode
    tokenizer: object                   # transformers PreTrainedTokenizerFast
    calib_tokens: torch.Tensor          # int64 [N], calibration split (never the test text)
    test_tokens: torch.Tensor           # int64 [N], held-out test split
    meta: dict = field(default_factory=dict)
    path: str = ""

    def encode(self, text: str) -> torch.Tensor:
        """Text -> int64 token ids (no special tokens)."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"],
                            dtype=torch.int64)

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.calib_tokens, self.test_tokens))


def load_real_lm(build: bool = True, dtype: torch.dtype = torch.float32) -> RealLM:
    """The trained model (built first when missing and `build`), its tokenizer and the
    calibration / test token streams. ``model, tok, calib, test = load_real_lm()`` works too."""
    d = model_dir()
    if not _is_built(d):
        if not build:
            raise FileNotFoundError(f"{d} is not built; run python bench/real_lm.py --ensure")
        ensure_real_lm()
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(d, dtype=dtype)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(d)
    toks = load_file(os.path.join(d, "tokens.safetensors"))
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    return RealLM(model, tokenizer, toks["calib_tokens"], toks["test_tokens"], meta, d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--ensure", action="store_true", help="build only if missing (default)")
    g.add_argument("--rebuild", action="store_true", help="train again even if cached")
    g.add_argument("--info", action="store_true", help="print the cached metadata")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for training (default: torch's; use 1 on a shared box)")
    a = ap.parse_args(argv)
    if a.info:
        with open(os.path.join(model_dir(), "meta.json")) as f:
            meta = json.load(f)
        meta.pop("log", None)
        print(json.dumps(meta, indent=1))
        return 0
    d = ensure_real_lm(rebuild=a.rebuild, threads=a.threads)
    print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
