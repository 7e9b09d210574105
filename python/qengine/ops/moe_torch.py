"""The Mixture-of-Experts computation in torch (float32, any device): torch_experts, the CUDA
forward of qengine::moe_experts, and qengine::moe_experts_backward (its autograd formula, with
its fake implementation). The schema of moe_experts, its checks and autograd are in moe.py."""

from __future__ import annotations

from typing import Optional

import torch

from .moe import (GATE_CONCATENATED, GATE_INTERLEAVED, GRAD_INPUTS, NO_GATE, SWIGLU_ALPHA, SWIGLU_LIMIT, SWIGLU_OAI,
                  split_matrix, unpack_meta)
from .matmul import SMALL_BATCH_ROWS
from .weight import KernelWeight


# --------------------------------------------------------------------------- expert products
def expert_weight(state, offsets, bits: int, blocksize: int, N: int, K: int, e: int) -> KernelWeight:
    """Expert e of a stacked matrix as a KernelWeight [N, K] over views of the stored codes (no
    copy of the weight; double-quantized scales of an expert not aligned to a nested block are
    decoded for that expert only, N*K/blocksize floats)."""
    packed, table, scales, nested = split_matrix(state)
    per, nb = N * K * bits // 8, N * K // blocksize
    b0 = e * nb
    s = scales[b0:b0 + nb]
    off = None if offsets is None else offsets[b0:b0 + nb]
    parts = []
    if nested:
        ntable, absmax, mean, nbs_t = nested
        nbs = int(nbs_t)
        if absmax.numel() == 1:  # one nested block over all scales (mxfp4, nvfp4): every index is 0
            parts = list(nested)
        elif b0 % nbs == 0:
            parts = [ntable, absmax[b0 // nbs:-(-(b0 + nb) // nbs)], mean, nbs_t]
        else:
            rows = torch.arange(b0, b0 + nb, device=s.device) // nbs
            s = ntable[s.long()] * absmax[rows] + mean.reshape(())
    return KernelWeight(packed[e * per:(e + 1) * per], table, bits, blocksize, s, parts, off, (N, K))


class ExpertMatrix:
    """One stacked expert matrix [E, N, K] for the torch loops: products with expert e's weight,
    v @ W_e^T (mm) and g @ W_e (mm_t), one expert at a time. Nothing is decoded for an expert
    no token chose. Up to SMALL_BATCH_ROWS rows run qengine::matmul / matmul_t on expert e's
    codes; more rows multiply a float32 copy of expert e alone, decoded once and kept until
    another expert is asked for (the backward's mm and mm_t of one expert share it), so at most
    one expert of the matrix is ever dense (the whole float32 [E, N, K] would be E times that)."""

    def __init__(self, state, offsets, bits, blocksize, N, K):
        self.state, self.offsets, self.bits, self.blocksize, self.N, self.K = state, offsets, bits, blocksize, N, K
        self._dense_expert, self._dense = None, None

    def weight(self, e: int) -> KernelWeight:
        return expert_weight(self.state, self.offsets, self.bits, self.blocksize, self.N, self.K, e)

    def dense(self, e: int) -> torch.Tensor:
        """Expert e's weight as float32 [N, K] (the one cached copy)."""
        if self._dense_expert != e:
            self._dense_expert, self._dense = None, None  # the last expert's copy goes first
            kw = self.weight(e)
            w = torch.ops.qengine.dequantize_blockwise(kw.packed, kw.table, kw.dense_scales(), kw.offsets, kw.bits,
                                                       kw.blocksize, self.N * self.K, torch.float32)
            self._dense_expert, self._dense = e, w.view(self.N, self.K)
        return self._dense

    def mm(self, e: int, v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] > SMALL_BATCH_ROWS:
            return v @ self.dense(e).t()
        return self.weight(e).matmul(v)

    def mm_t(self, e: int, g: torch.Tensor) -> torch.Tensor:
        if g.shape[0] > SMALL_BATCH_ROWS:
            return g @ self.dense(e)
        kw = self.weight(e)
        return torch.ops.qengine.matmul_t(g.contiguous(), kw.packed, kw.table, kw.scales, kw.nested, kw.offsets,
                                          kw.bits, kw.blocksize, self.K)


def swiglu_oai(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gate, the operations of transformers' GptOssExperts._apply_gate in its order."""
    g = g.clamp(min=None, max=SWIGLU_LIMIT)
    u = u.clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
    return (u + 1) * (g * torch.sigmoid(g * SWIGLU_ALPHA))


def _swiglu_oai_grads(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """swiglu_oai(g, u) and its partial derivatives in g and u (clamp passes the gradient where
    the bound holds, bounds included, as torch.clamp does)."""
    gc, uc = g.clamp(max=SWIGLU_LIMIT), u.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
    sig = torch.sigmoid(gc * SWIGLU_ALPHA)
    glu = gc * sig
    dglu = sig + SWIGLU_ALPHA * gc * sig * (1 - sig)
    dg = (uc + 1) * dglu * (g <= SWIGLU_LIMIT).to(g.dtype)
    du = glu * ((u >= -SWIGLU_LIMIT) & (u <= SWIGLU_LIMIT)).to(u.dtype)
    return (uc + 1) * glu, dg, du


# The activation of each activation code (moe.ACTIVATIONS' values).
ACTIVATION_FUNCTIONS = {0: torch.nn.functional.silu, 1: lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
                        2: torch.nn.functional.gelu, 3: torch.relu, SWIGLU_OAI: swiglu_oai}


def apply_gate(a: torch.Tensor, gate_layout: int, fn) -> torch.Tensor:
    """The down projection's input from the up projection's output a [T, n_up]: fn(a) without a
    gate, else fn(gate) * up (or fn(gate, up) for swiglu_oai), with gate and up interleaved or
    concatenated as gate_layout says."""
    if gate_layout == NO_GATE:
        return fn(a)
    g, u = (a[:, 0::2], a[:, 1::2]) if gate_layout == GATE_INTERLEAVED else a.chunk(2, dim=-1)
    return fn(g, u) if fn is swiglu_oai else fn(g) * u


def torch_experts(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a,
                  up_lora_b, down_lora_a, down_lora_b, lora_scale, meta) -> torch.Tensor:
    """The same function in torch (float32, differentiable in x, weights, biases and adapters):
    the CUDA forward, and the CPU forward of swiglu_oai (no native kernel takes it). The products
    run per active expert through ExpertMatrix (its codes, or one expert's float32 copy)."""
    E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act = unpack_meta(meta)
    T, H = x.shape
    n_up = inter if gate_layout == NO_GATE else 2 * inter
    w_up = ExpertMatrix(up, up_offsets, up_bits, up_bs, n_up, H)
    w_down = ExpertMatrix(down, down_offsets, down_bits, down_bs, H, inter)
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1).to(torch.int64)
    tokens = torch.arange(T, device=x.device).repeat_interleave(k)
    weights = top_k_weights.reshape(-1).to(torch.float32)
    xf = x.to(torch.float32)
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    f32 = (lambda t: None if t is None else t.to(torch.float32))
    for e in torch.unique(flat).tolist():  # the active experts
        sel = (flat == e).nonzero().squeeze(1)
        t = tokens[sel]
        xe = xf[t]
        a = w_up.mm(e, xe)
        if up_lora_a is not None:
            a = a + lora_scale * (xe @ f32(up_lora_a[e]).t()) @ f32(up_lora_b[e]).t()
        if up_bias is not None:
            a = a + f32(up_bias[e])
        h = apply_gate(a, gate_layout, ACTIVATION_FUNCTIONS[act])
        o = w_down.mm(e, h)
        if down_lora_a is not None:
            o = o + lora_scale * (h @ f32(down_lora_a[e]).t()) @ f32(down_lora_b[e]).t()
        if down_bias is not None:
            o = o + f32(down_bias[e])
        y = y.index_add(0, t, o * weights[sel, None])
    return y


def _activation_and_slope(v: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """act(v) and act'(v), elementwise (float32)."""
    if act == 0:  # silu
        sig = torch.sigmoid(v)
        return v * sig, sig * (1 + v * (1 - sig))
    if act == 1:  # gelu, tanh approximation
        c = 0.7978845608028654
        t = torch.tanh(c * (v + 0.044715 * v ** 3))
        return 0.5 * v * (1 + t), 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v)
    if act == 2:  # gelu (erf)
        cdf = 0.5 * (1 + torch.erf(v * 0.7071067811865476))
        return v * cdf, cdf + v * torch.exp(-0.5 * v * v) * 0.3989422804014327
    return torch.relu(v), (v > 0).to(v.dtype)


@torch.library.custom_op("qengine::moe_experts_backward", mutates_args=())
def moe_experts_backward(grad: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, up: list[torch.Tensor], down: list[torch.Tensor],
                         up_offsets: Optional[torch.Tensor], down_offsets: Optional[torch.Tensor],
                         up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                         up_lora_a: Optional[torch.Tensor], up_lora_b: Optional[torch.Tensor],
                         down_lora_a: Optional[torch.Tensor], down_lora_b: Optional[torch.Tensor], lora_scale: float,
                         meta: list[int]) -> list[torch.Tensor]:
    """Gradients of moe_experts in the order of GRAD_INPUTS (each in its input's dtype; an
    empty tensor for an absent input). Recomputes the active experts' forward in float32, each
    expert's products through ExpertMatrix (the quantized weights are frozen: no gradient), then
    applies the chain rule by hand (a custom op runs below autograd)."""
    E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act = unpack_meta(meta)
    T, H = x.shape
    n_up = inter if gate_layout == NO_GATE else 2 * inter
    w_up = ExpertMatrix(up, up_offsets, up_bits, up_bs, n_up, H)
    w_down = ExpertMatrix(down, down_offsets, down_bits, down_bs, H, inter)
    f32 = (lambda t: None if t is None else t.to(torch.float32))
    ua, ub, da, db = f32(up_lora_a), f32(up_lora_b), f32(down_lora_a), f32(down_lora_b)
    s = float(lora_scale)
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1).to(torch.int64)
    tokens = torch.arange(T, device=x.device).repeat_interleave(k)
    weights = top_k_weights.reshape(-1).to(torch.float32)
    xf, gf = x.to(torch.float32), grad.to(torch.float32)
    gx = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    gw = torch.zeros(T * k, dtype=torch.float32, device=x.device)
    zeros = (lambda t: None if t is None else torch.zeros(t.shape, dtype=torch.float32, device=t.device))
    gua, gub, gda, gdb, gubias, gdbias = (zeros(ua), zeros(ub), zeros(da), zeros(db), zeros(up_bias),
                                          zeros(down_bias))
    for e in torch.unique(flat).tolist():  # the active experts
        sel = (flat == e).nonzero().squeeze(1)
        t = tokens[sel]
        xe = xf[t]
        # forward, keeping what the chain rule needs
        a = w_up.mm(e, xe)
        xa = None
        if ua is not None:
            xa = xe @ ua[e].t()  # [m, r]
            a = a + s * xa @ ub[e].t()
        if up_bias is not None:
            a = a + f32(up_bias[e])
        if gate_layout == NO_GATE:
            h, slope = _activation_and_slope(a, act)
        else:
            g, u = (a[:, :inter], a[:, inter:]) if gate_layout == GATE_CONCATENATED else (a[:, 0::2], a[:, 1::2])
            if act == SWIGLU_OAI:
                h, slope, ag = _swiglu_oai_grads(g, u)  # ag: dh/du; slope: dh/dg
                u = torch.ones_like(u)
            else:
                ag, slope = _activation_and_slope(g, act)
                h = ag * u
        o = w_down.mm(e, h)
        ha = None
        if da is not None:
            ha = h @ da[e].t()
            o = o + s * ha @ db[e].t()
        if down_bias is not None:
            o = o + f32(down_bias[e])
        # backward
        ge = gf[t]
        gw[sel] = (ge * o).sum(1)
        do = ge * weights[sel, None]
        dh = w_down.mm_t(e, do)
        if da is not None:
            dob = do @ db[e]  # [m, r]
            gdb[e] += s * do.t() @ ha
            gda[e] += s * dob.t() @ h
            dh = dh + s * dob @ da[e]
        if gdbias is not None:
            gdbias[e] += do.sum(0)
        if gate_layout == NO_GATE:
            dpre = dh * slope
        else:
            dg, du = dh * u * slope, dh * ag
            dpre = torch.cat([dg, du], 1) if gate_layout == GATE_CONCATENATED else torch.stack([dg, du], 2).flatten(1)
        dxe = w_up.mm_t(e, dpre)
        if ua is not None:
            dpb = dpre @ ub[e]
            gub[e] += s * dpre.t() @ xa
            gua[e] += s * dpb.t() @ xe
            dxe = dxe + s * dpb @ ua[e]
        if gubias is not None:
            gubias[e] += dpre.sum(0)
        gx.index_add_(0, t, dxe)
    computed = {"x": gx, "top_k_weights": gw.view(T, k), "up_lora_a": gua, "up_lora_b": gub, "down_lora_a": gda,
                "down_lora_b": gdb, "up_bias": gubias, "down_bias": gdbias}
    inputs = {"x": x, "top_k_weights": top_k_weights, "up_lora_a": up_lora_a, "up_lora_b": up_lora_b,
              "down_lora_a": down_lora_a, "down_lora_b": down_lora_b, "up_bias": up_bias, "down_bias": down_bias}
    return [x.new_empty(0) if inputs[n] is None else computed[n].to(inputs[n].dtype) for n in GRAD_INPUTS]


@moe_experts_backward.register_fake
def _(grad, x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a,
      up_lora_b, down_lora_a, down_lora_b, lora_scale, meta):
    inputs = (x, top_k_weights, up_lora_a, up_lora_b, down_lora_a, down_lora_b, up_bias, down_bias)
    return [x.new_empty(0) if v is None else torch.empty_like(v) for v in inputs]
