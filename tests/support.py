"""Helpers shared by several test modules (no test module imports another): a small language
model and its LoRA training loop, and the matmul tests' float64 weight and error bound."""

from __future__ import annotations

import math

import torch
from torch import nn

import qengine
import reference as R
from cases import fmt_of


# ---------------------------------------------------------------------------- a small model
class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down_proj(torch.relu(self.up_proj(self.norm(x))))


class Tiny(nn.Module):
    """Embedding, two blocks and an output head: the shape of a small language model."""

    def __init__(self, vocab=64, d=128, h=256, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, h), Block(d, h)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def train_lora(model, ids, steps, step_fn=None):
    """`steps` AdamW steps on the LoRA parameters of `model`, next-token loss on ids [B, T] (through
    step_fn, e.g. a compiled model, when given); the losses."""
    opt = torch.optim.AdamW(qengine.lora_parameters(model), lr=1e-2)
    fn = step_fn if step_fn is not None else model
    losses = []
    for _ in range(steps):
        logits = fn(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------- matmul references
def reference_weight(w, fmt, bs, dq):
    """The reference dequantization of w (float64), as the matmul tests compare against."""
    return R.dequantize(R.quantize(w, fmt_of(fmt), bs, dq), torch.float32).to(torch.float64)


def matmul_bound(x64, w64, dtype, extra=0.0):
    """|error| bound: float32 accumulation over K (grows like sqrt(K) * eps) plus the rounding
    of the output to `dtype`."""
    k = x64.shape[-1]
    mag = x64.abs() @ w64.abs().t() + extra
    eps_out = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    return 8 * math.sqrt(k) * 2.0**-24 * mag + eps_out * mag
