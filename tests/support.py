"""Helpers shared by several test modules (no test module imports another): a small language
model and its LoRA training loop, the training loop of a transformers causal LM, and the matmul
tests' quantized weight with its float64 reference and error bound, and the native entry points'
WeightRef and large-batch products called directly."""

from __future__ import annotations

import math

import torch
from torch import nn

import qengine
import reference as R
from cases import fmt_of
from qengine import _C
from qengine._checks import DTYPE_CODES
from qengine.ops.weight import native_weight


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


def train_causal_lm(model, ids, params, steps, optimizer=torch.optim.AdamW, lr=1e-2):
    """`steps` steps of `optimizer` on params, the loss of a transformers causal LM (or a PEFT model
    around one, or its compiled forward) with labels = ids [B, T]; the losses."""
    opt = optimizer(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------- matmul references
def random_quantized(n, k, fmt, bs, dq):
    """A random weight [n, k] quantized (fmt: a cases.FORMATS key or a format name), and its
    reference dequantization (float64), as the matmul tests compare against."""
    w = torch.randn(n, k)
    w64 = R.dequantize(R.quantize(w, fmt_of(fmt), bs, dq), torch.float32).to(torch.float64)
    return qengine.quantize(w, fmt_of(fmt), bs, double_quant=dq), w64


def check_bias_lora_and_gradients(m, layer, device):
    """qengine.matmul with bias and LoRA (x, bias and adapters on `device`): the output and the
    gradients of x, bias and both adapters against float64 on the CPU; returns (x, bias, a, b)."""
    n, k, bs = layer
    r, s = 8, 0.75
    q = qengine.quantize(torch.randn(n, k), "nf4", bs, double_quant=True)
    w64 = q.dequantize().to(torch.float64)  # the frozen weight as the layer sees it
    qd = q.to(device)
    x = torch.randn(m, k, device=device, requires_grad=True)
    bias = torch.randn(n, device=device, requires_grad=True)
    a = (torch.randn(r, k, device=device) * 0.1).requires_grad_()
    b = (torch.randn(n, r, device=device) * 0.1).requires_grad_()
    y = qengine.matmul(x, qd, bias, (a, b, s))
    g = torch.randn_like(y)
    y.backward(g)

    x64, bias64, a64, b64 = (t.detach().cpu().to(torch.float64).requires_grad_() for t in (x, bias, a, b))
    ref = x64 @ w64.t() + bias64 + s * (x64 @ a64.t()) @ b64.t()
    ref.backward(g.cpu().to(torch.float64))
    tol = 1e-4 * math.sqrt(k)
    assert torch.allclose(y.detach().cpu().to(torch.float64), ref, rtol=1e-5, atol=tol)
    for got, want in ((x.grad, x64.grad), (bias.grad, bias64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert torch.allclose(got.cpu().to(torch.float64), want, rtol=1e-5, atol=tol * math.sqrt(max(m, n)))
    return x, bias, a, b


def matmul_bound(x64, w64, dtype, extra=0.0):
    """|error| bound: float32 accumulation over K (grows like sqrt(K) * eps) plus the rounding
    of the output to `dtype`."""
    k = x64.shape[-1]
    mag = x64.abs() @ w64.abs().t() + extra
    eps_out = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    return 8 * math.sqrt(k) * 2.0**-24 * mag + eps_out * mag


def check_matmul_every_isa(q, w64, x):
    """qengine.matmul(x, q) on every CPU ISA within matmul_bound of the float64 product x @ w64.T."""
    x64 = x.to(torch.float64)
    ref = x64 @ w64.t()
    bound = matmul_bound(x64, w64, x.dtype)
    original = qengine.build_info()["cpu_isa"]
    try:
        for isa in qengine.build_info()["supported_cpu_isas"]:
            qengine.set_cpu_isa(isa)
            y = qengine.matmul(x, q).to(torch.float64)
            assert ((y - ref).abs() <= bound).all(), (isa, float((y - ref).abs().max()))
    finally:
        qengine.set_cpu_isa(original)


# ---------------------------------------------------------------------------- a tiny transformers Llama
def tiny_llama(hidden=256, inter=384, layers=2, heads=4, kv=2, vocab=320, seed=0):
    """A float transformers LlamaForCausalLM with random weights (its own init, seeded), untied head;
    built from a config, no download. inter=384 gives down_proj rows of 384 weights, which no
    256-weight super-block divides (the GGUF export writes those F16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def native_ref(q):
    """(kw, weight): q's KernelWeight and the WeightRef tuple the native entry points take, its
    scales as stored (double-quantized codes included). The tuple holds only addresses: keep kw
    alive while it is used (a minmax weight's offsets are decoded into a tensor only kw owns)."""
    kw = q.kernel_weight()
    return kw, native_weight(kw.packed, kw.table, kw.scales, kw.nested, kw.offsets, kw.bits, kw.blocksize,
                             kw.positions)


# The native large-batch products (csrc/cpu/gemm) called directly, for test_gemm*.py.
def large_product(x, q, out_dtype=torch.float32, lora=None):
    """(done, y) of _C.matmul_large_cpu for x [M, K] and the QuantizedTensor q [N, K]: y float32,
    or out_dtype; lora = (a, b, scale) or None."""
    kw, weight = native_ref(q)
    m, k = x.shape
    n = q.shape[0]
    y = torch.full((m, n), float("nan"), dtype=out_dtype)
    a, b, scale = lora if lora is not None else (None, None, 0.0)
    done = _C.matmul_large_cpu(x.data_ptr(), DTYPE_CODES[x.dtype], m, k, k, n, weight,
                               a.data_ptr() if a is not None else 0, b.data_ptr() if b is not None else 0,
                               DTYPE_CODES[a.dtype] if a is not None else 0, a.shape[0] if a is not None else 0,
                               float(scale), y.data_ptr(), DTYPE_CODES[y.dtype])
    return done, y


def large_product_t(g, q, out_dtype=torch.float32):
    """(done, gx) of _C.matmul_t_large_cpu for g [M, N] and the QuantizedTensor q [N, K]: gx
    float32, or out_dtype."""
    kw, weight = native_ref(q)
    m, n = g.shape
    k = q.shape[1]
    gx = torch.full((m, k), float("nan"), dtype=out_dtype)
    done = _C.matmul_t_large_cpu(g.data_ptr(), DTYPE_CODES[g.dtype], m, n, k, weight, gx.data_ptr(),
                                 DTYPE_CODES[gx.dtype])
    return done, gx


def assert_model_bound(y, x, q, transposed=False, rounded=False, weight_dtype=torch.bfloat16):
    """Within float32 accumulation error of x @ W^T (or x @ W), W the weight dequantize() writes
    for weight_dtype (the tiles': bfloat16); plus half a bfloat16 unit where y was rounded to it."""
    x64 = x.to(torch.float64)
    w = q.dequantize(weight_dtype).to(torch.float64)
    w = w if transposed else w.t()
    ref, mag = x64 @ w, x64.abs() @ w.abs()
    bound = 8 * x.shape[1] ** 0.5 * 2.0**-24 * mag + (2.0**-8 * ref.abs() if rounded else 0)
    assert ((y.to(torch.float64) - ref).abs() <= bound).all()
