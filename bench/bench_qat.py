# fp32 vs post-training quantization vs quantization-aware training on a small classifier.
"""Usage: python bench/bench_qat.py [--seeds S] [--json PATH]

An MLP (64-256-256-10) on scikit-learn's bundled 8x8 digits (no download): trained in fp32,
then (PTQ) its Linear weights quantized per row to a harsh format, then (QAT) fine-tuned from
the fp32 weights with qengine.qat.prepare for a few epochs and evaluated with the quantized
weights. Formats: int4 per row, a 4-entry absmax codebook per row (2 bits' worth of levels in
4-bit storage), and 2:4-pruned NF4 (pruning then PTQ vs QAT on the pruned weights with the
masks fixed). Test accuracy (%) on a held-out 30 % split; mean over seeds. 'recovered' is
(QAT - PTQ) / (fp32 - PTQ): the share of the PTQ loss that QAT wins back (for 2:4 against the
unpruned fp32 model: the loss of pruning and quantizing together).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import qengine  # noqa: E402
from _harness import print_table, write_json  # noqa: E402

CODEBOOK4 = qengine.codebook([-1.0, -0.3, 0.3, 1.0], rule="absmax", name="cb4")
SETTINGS = [("int4 per row", "int4", None), ("4-entry codebook per row", CODEBOOK4, None),
            ("2:4 pruned + nf4 (2:4 layout, block 128)", "nf4", "2:4")]


def load_digits():
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:
        return None
    d = sk_load()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(model, x, y, epochs, lr, masks=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if masks:  # pruned weights stay pruned
                with torch.no_grad():
                    for name, m in masks.items():
                        model.get_submodule(name).weight.masked_fill_(~m, 0.0)
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def quantized_copy(model, fmt, sparsity, masks):
    """The model with each Linear weight replaced by dequantize(quantize(weight))."""
    out = mlp()
    out.load_state_dict(model.state_dict())
    for name, layer in out.named_modules():
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach()
            bs = 128 if sparsity else None
            mask = masks.get(name) if masks else None
            q = qengine.quantize(w.contiguous(), fmt, bs, sparsity=sparsity, mask=mask)
            layer.weight.copy_(q.dequantize())
    return out


def run(seed, x, y, fp32_epochs=40, qat_epochs=10):
    torch.manual_seed(seed)
    perm = torch.randperm(len(x))
    n_test = int(0.3 * len(x))
    te, tr = perm[:n_test], perm[n_test:]
    base = train(mlp(), x[tr], y[tr], fp32_epochs, 1e-3)
    res = {"fp32": accuracy(base, x[te], y[te])}
    for label, fmt, sparsity in SETTINGS:
        masks = None
        start = base
        if sparsity:
            start = mlp()
            start.load_state_dict(base.state_dict())
            masks = qengine.prune(start, 0.5, "2:4")
            res[label + " fp32 pruned"] = accuracy(start, x[te], y[te])
        res[label + " PTQ"] = accuracy(quantized_copy(start, fmt, sparsity, masks), x[te], y[te])
        q_model = mlp()
        q_model.load_state_dict(start.state_dict())
        # QAT with per-row fake quantization. For 2:4 the pruned weights (masks re-applied after
        # each step) are fake-quantized in the dense layout at block 256: a block of 256 weights
        # is one chunk of 128 stored values of the 2:4 layout at block 128, with the same absmax
        # and, NF4 having an exact zero, the same decoded values.
        qengine.qat.prepare(q_model, format=fmt, blocksize=256 if sparsity else None)
        train(q_model, x[tr], y[tr], qat_epochs, 3e-4, masks)
        plain = mlp()
        plain.load_state_dict(q_model.state_dict())
        res[label + " QAT"] = accuracy(quantized_copy(plain, fmt, sparsity, masks), x[te], y[te])
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "qat.json"))
    args = p.parse_args()
    data = load_digits()
    if data is None:
        print("scikit-learn is not installed (its bundled digits data set is the benchmark's data): nothing run")
        return
    runs = [run(s, *data) for s in range(args.seeds)]
    mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
    rows = []
    for label, _fmt, sparsity in SETTINGS:
        ref = mean["fp32"]  # for 2:4 too: pruning + quantization against the original model
        ptq, qat = mean[label + " PTQ"], mean[label + " QAT"]
        rows.append({"setting": label, "fp32": mean["fp32"], "fp32_pruned": mean.get(label + " fp32 pruned"),
                     "ptq": ptq, "qat": qat, "recovered": (qat - ptq) / (ref - ptq) if ref != ptq else None})
    print_table(rows, [("setting", "setting", ""), ("fp32", "fp32 %", ".2f"), ("fp32_pruned", "fp32 pruned %", ".2f"),
                       ("ptq", "PTQ %", ".2f"), ("qat", "QAT %", ".2f"), ("recovered", "recovered", ".2f")],
                title=f"digits MLP test accuracy, mean of {args.seeds} seeds")
    write_json(args.json, rows, runs=runs)


if __name__ == "__main__":
    main()
