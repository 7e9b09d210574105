"""A float64 reference for the routed experts (per token, per top-k slot, plain torch), written
from the definition only: y[t] = sum_j w[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t]))."""

from __future__ import annotations

import math

import torch

ACTS = {
    "silu": lambda v: v * torch.sigmoid(v),
    "gelu_tanh": lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))),
    "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
    "relu": lambda v: torch.clamp(v, min=0),
}


def moe_reference(x, idx, w, w_up, w_down, inter, gate="concatenated", act="silu", up_bias=None, down_bias=None,
                  up_lora=None, down_lora=None, scale=0.0, round_to=None):
    """x [T, H], idx/w [T, k], w_up [E, N, H], w_down [E, H, I] (dequantized), lora (A [E, r, K],
    B [E, N, r]) or None -> float64 [T, H]. round_to: a dtype the intermediate act(gate) * up is
    rounded to (the op rounds it to x's dtype before the down projection). Differentiable."""
    d = (lambda t: None if t is None else t.to(torch.float64))
    xd, wd = d(x), d(w)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            a = d(w_up[e]) @ xd[t]
            if up_lora is not None:
                a = a + scale * (d(up_lora[1][e]) @ (d(up_lora[0][e]) @ xd[t]))
            if up_bias is not None:
                a = a + d(up_bias[e])
            f = ACTS[act]
            if gate == "none":
                h = f(a)
            elif gate == "interleaved":
                h = f(a[0::2]) * a[1::2]
            else:
                h = f(a[:inter]) * a[inter:]
            if round_to is not None:
                h = h.to(round_to).to(torch.float64)
            o = d(w_down[e]) @ h
            if down_lora is not None:
                o = o + scale * (d(down_lora[1][e]) @ (d(down_lora[0][e]) @ h))
            if down_bias is not None:
                o = o + d(down_bias[e])
            acc = acc + wd[t, j] * o
        rows.append(acc)
    return torch.stack(rows) if rows else torch.zeros(0, x.shape[1], dtype=torch.float64)
