"""The grouped Mixture-of-Experts op: qengine::moe_experts (forward, one native call on the CPU)
and qengine::moe_experts_backward (its autograd formula), with fake implementations.

    y [T, H] = sum_k top_k_weights[t, k] * expert_{top_k_index[t, k]}(x[t])
    expert(x) = down(act(gate(x)) * up(x))      (+ biases, + per-expert LoRA on both matrices)

Each stacked expert matrix is passed as a list [packed, table, scales] (+ [nested table,
absmax, mean, nested blocksize] when double-quantized), the layout of qengine.matmul, for a
quantized tensor of E * N rows of K (expert e is rows e*N .. e*N + N), plus optional float32
per-block offsets (minmax formats). meta = [num_experts, intermediate, up_bits, up_blocksize,
down_bits, down_blocksize, gate_layout, activation].
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C
from ._checks import check_float, check_same_device
from ._ops import (DTYPE_CODES, check_device, check_weight, dense_scales, dense_weight, weight_args)

# gate_layout codes (csrc/include/qengine/moe.h)
GATE_CONCATENATED, GATE_INTERLEAVED, NO_GATE = 0, 1, 2
# activation codes, by transformers' `hidden_act` names
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_tanh": 1, "gelu_fast": 1,
               "gelu": 2, "relu": 3}
_META_LEN = 8


def _split(state: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[list]]:
    if len(state) not in (3, 7):
        raise ValueError("an expert matrix is [packed, table, scales] plus 4 nested parts when double-quantized, "
                         f"got {len(state)} tensors")
    return state[0], state[1], state[2], (list(state[3:]) if len(state) == 7 else None)


def _unpack_meta(meta: list[int]) -> tuple[int, ...]:
    if len(meta) != _META_LEN:
        raise ValueError(f"meta must be [num_experts, intermediate, up_bits, up_blocksize, down_bits, "
                         f"down_blocksize, gate_layout, activation], got {list(meta)}")
    return tuple(int(v) for v in meta)


def _check_matrix(name, state, offsets, bias, lora_a, lora_b, E, N, K, bits, blocksize, device):
    packed, table, scales, nested = _split(state)
    if blocksize < 1 or (N * K) % blocksize:
        raise ValueError(f"{name}: the blocksize ({blocksize}) must divide one expert's {N}x{K} elements, so that "
                         "every expert starts on a block")
    if (N * K * bits) % 8:
        raise ValueError(f"{name}: one expert's {N}x{K} weight does not fill whole bytes at {bits} bits")
    check_weight(packed, table, scales, nested, offsets, bits, blocksize, E * N * K)
    check_same_device(device, **{f"{name} packed": packed})
    if bias is not None:
        check_float(f"{name} bias", bias)
        if tuple(bias.shape) != (E, N):
            raise ValueError(f"{name} bias must have shape ({E}, {N}), got {tuple(bias.shape)}")
        check_same_device(device, **{f"{name} bias": bias})
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{name}: lora_a and lora_b must be given together")
    if lora_a is not None:
        for part, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            check_float(f"{name} {part}", t)
            check_same_device(device, **{f"{name} {part}": t})
        r = lora_a.shape[1] if lora_a.dim() == 3 else -1
        if lora_a.dim() != 3 or lora_b.dim() != 3 or tuple(lora_a.shape) != (E, r, K) or \
                tuple(lora_b.shape) != (E, N, r) or r < 1:
            raise ValueError(f"{name} LoRA shapes must be A [{E}, r, {K}] and B [{E}, {N}, r], got "
                             f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")


def _check_args(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a,
                up_lora_b, down_lora_a, down_lora_b, meta):
    E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act = _unpack_meta(meta)
    check_float("hidden_states", x)
    check_device("hidden_states", x)
    if x.dim() != 2:
        raise ValueError(f"hidden_states must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    T, H = x.shape
    if top_k_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"top_k_index must be int64 or int32, got {top_k_index.dtype}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T or top_k_index.shape[1] < 1:
        raise ValueError(f"top_k_index must be [tokens={T}, top_k], got shape {tuple(top_k_index.shape)}")
    check_float("top_k_weights", top_k_weights)
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, got "
                         f"{tuple(top_k_weights.shape)}")
    check_same_device(x.device, top_k_index=top_k_index, top_k_weights=top_k_weights)
    if E < 1 or inter < 1:
        raise ValueError(f"num_experts and intermediate must be >= 1, got {E} and {inter}")
    if gate_layout not in (GATE_CONCATENATED, GATE_INTERLEAVED, NO_GATE):
        raise ValueError(f"gate_layout must be 0 (concatenated), 1 (interleaved) or 2 (no gate), got {gate_layout}")
    if act not in set(ACTIVATIONS.values()):
        raise ValueError(f"activation code {act} is not supported (activations: {sorted(ACTIVATIONS)})")
    n_up = inter if gate_layout == NO_GATE else 2 * inter
    _check_matrix("up", up, up_offsets, up_bias, up_lora_a, up_lora_b, E, n_up, H, up_bits, up_bs, x.device)
    _check_matrix("down", down, down_offsets, down_bias, down_lora_a, down_lora_b, E, H, inter, down_bits, down_bs,
                  x.device)
    return E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act, n_up


def _check_index_range(top_k_index: torch.Tensor, E: int) -> None:
    """ValueError naming the first expert index outside [0, E). (The CPU kernel checks every
    index itself before any work; this builds the message, off the hot path there.)"""
    bad = (top_k_index < 0) | (top_k_index >= E)
    if top_k_index.numel() and bool(bad.any()):
        raise ValueError(f"top_k_index holds expert index {top_k_index[bad][0].item()}, outside [0, {E}) for this "
                         f"layer's {E} experts")


def _matrix_args(state, offsets, bits, blocksize, N, K, bias, lora_a, lora_b, lora_scale, lora_dtype):
    packed, table, scales, nested = _split(state)
    args = weight_args(packed, blocksize, table, bits, scales, nested, offsets)
    bias_args = (bias.data_ptr(), DTYPE_CODES[bias.dtype]) if bias is not None else (0, 0)
    if lora_a is None:
        lora_args = (0, 0, 0, 0, 0.0)
    else:
        lora_args = (lora_a.data_ptr(), lora_b.data_ptr(), DTYPE_CODES[lora_dtype], lora_a.shape[1],
                     float(lora_scale))
    return (*args, N, K, *bias_args, *lora_args)


@torch.library.custom_op("qengine::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, up: list[torch.Tensor],
                down: list[torch.Tensor], up_offsets: Optional[torch.Tensor], down_offsets: Optional[torch.Tensor],
                up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                up_lora_a: Optional[torch.Tensor], up_lora_b: Optional[torch.Tensor],
                down_lora_a: Optional[torch.Tensor], down_lora_b: Optional[torch.Tensor], lora_scale: float,
                meta: list[int]) -> torch.Tensor:
    """The routed experts of x [T, H] (float): [T, H] in x's dtype, accumulated in float32."""
    E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act, n_up = _check_args(
        x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a, up_lora_b,
        down_lora_a, down_lora_b, meta)
    T, H = x.shape
    if x.device.type != "cpu":
        _check_index_range(top_k_index, E)
        # CUDA: the dense path (dequantize each matrix once, one product per active expert).
        return _dense_experts(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias,
                              up_lora_a, up_lora_b, down_lora_a, down_lora_b, lora_scale, meta).to(x.dtype)
    xc = x.contiguous()
    idx = top_k_index.to(torch.int64).contiguous()
    w = top_k_weights.to(torch.float32).contiguous()
    # One dtype for each matrix's two adapters (the kernel reads both with one code).
    ua, ub = _same_dtype(up_lora_a, up_lora_b)
    da, db = _same_dtype(down_lora_a, down_lora_b)
    ubias = None if up_bias is None else up_bias.contiguous()
    dbias = None if down_bias is None else down_bias.contiguous()
    y = torch.empty(T, H, dtype=torch.float32)
    if T:
        try:
            _moe_experts_cpu(xc, idx, w, E, H, inter, up, down, up_offsets, down_offsets, ubias, dbias, ua, ub, da, db,
                             lora_scale, up_bits, up_bs, down_bits, down_bs, n_up, gate_layout, act, y)
        except ValueError:
            _check_index_range(idx, E)  # the usual cause, named; anything else re-raised as is
            raise
    if xc.dtype == torch.float32:
        return y
    out = torch.empty(T, H, dtype=xc.dtype)
    if T:
        _C.cast_float_cpu(y.data_ptr(), T * H, out.data_ptr(), DTYPE_CODES[xc.dtype])
    return out


def _moe_experts_cpu(xc, idx, w, E, H, inter, up, down, up_offsets, down_offsets, ubias, dbias, ua, ub, da, db,
                     lora_scale, up_bits, up_bs, down_bits, down_bs, n_up, gate_layout, act, y):
    """One native call; the kernel fills y (float32 [T, H])."""
    _C.moe_experts_cpu(xc.data_ptr(), DTYPE_CODES[xc.dtype], xc.shape[0], H, idx.data_ptr(), w.data_ptr(),
                       idx.shape[1], E,
                       _matrix_args(up, up_offsets, up_bits, up_bs, n_up, H, ubias, ua, ub, lora_scale,
                                    None if ua is None else ua.dtype),
                       _matrix_args(down, down_offsets, down_bits, down_bs, H, inter, dbias, da, db, lora_scale,
                                    None if da is None else da.dtype),
                       gate_layout, act, y.data_ptr())


def _same_dtype(a, b):
    if a is None:
        return None, None
    a = a.contiguous()
    return a, b.to(a.dtype).contiguous()


@moe_experts.register_fake
def _(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a, up_lora_b,
      down_lora_a, down_lora_b, lora_scale, meta):
    return x.new_empty(x.shape)


# --------------------------------------------------------------------------- dense path
def _dense_matrix(state, offsets, bits, blocksize, E, N, K) -> torch.Tensor:
    """All experts of one matrix as float32 [E, N, K] (one layer's weight at a time)."""
    packed, table, scales, nested = _split(state)
    w = dense_weight(packed, table, dense_scales(scales, nested), offsets, bits, blocksize, E * N, K, torch.float32)
    return w.view(E, N, K)


def _gate(a: torch.Tensor, gate_layout: int, act: int) -> torch.Tensor:
    fn = {0: torch.nn.functional.silu, 1: lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
          2: torch.nn.functional.gelu, 3: torch.relu}[act]
    if gate_layout == NO_GATE:
        return fn(a)
    if gate_layout == GATE_INTERLEAVED:
        return fn(a[:, 0::2]) * a[:, 1::2]
    g, u = a.chunk(2, dim=-1)
    return fn(g) * u


def _dense_experts(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a,
                   up_lora_b, down_lora_a, down_lora_b, lora_scale, meta, w_up=None, w_down=None) -> torch.Tensor:
    """The same function in torch (float32, differentiable in x, weights, biases and adapters):
    the CUDA forward and the recomputation in the backward."""
    E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act = _unpack_meta(meta)
    T, H = x.shape
    n_up = inter if gate_layout == NO_GATE else 2 * inter
    if w_up is None:
        w_up = _dense_matrix(up, up_offsets, up_bits, up_bs, E, n_up, H)
        w_down = _dense_matrix(down, down_offsets, down_bits, down_bs, E, H, inter)
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
        a = xe @ w_up[e].t()
        if up_lora_a is not None:
            a = a + lora_scale * (xe @ f32(up_lora_a[e]).t()) @ f32(up_lora_b[e]).t()
        if up_bias is not None:
            a = a + f32(up_bias[e])
        h = _gate(a, gate_layout, act)
        o = h @ w_down[e].t()
        if down_lora_a is not None:
            o = o + lora_scale * (h @ f32(down_lora_a[e]).t()) @ f32(down_lora_b[e]).t()
        if down_bias is not None:
            o = o + f32(down_bias[e])
        y = y.index_add(0, t, o * weights[sel, None])
    return y


# --------------------------------------------------------------------------- autograd
_GRAD_INPUTS = ("x", "top_k_weights", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b", "up_bias", "down_bias")


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
    """Gradients of moe_experts in the order of _GRAD_INPUTS (each in its input's dtype; an
    empty tensor for an absent input). Recomputes the active experts' forward in float32 with
    the quantized weights dequantized once per matrix (frozen: they get no gradient), then
    applies the chain rule by hand (a custom op runs below autograd)."""
    E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act = _unpack_meta(meta)
    T, H = x.shape
    n_up = inter if gate_layout == NO_GATE else 2 * inter
    w_up = _dense_matrix(up, up_offsets, up_bits, up_bs, E, n_up, H)
    w_down = _dense_matrix(down, down_offsets, down_bits, down_bs, E, H, inter)
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
        a = xe @ w_up[e].t()
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
            ag, slope = _activation_and_slope(g, act)
            h = ag * u
        o = h @ w_down[e].t()
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
        dh = do @ w_down[e]
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
        dxe = dpre @ w_up[e]
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
    return [x.new_empty(0) if inputs[n] is None else computed[n].to(inputs[n].dtype) for n in _GRAD_INPUTS]


@moe_experts_backward.register_fake
def _(grad, x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a,
      up_lora_b, down_lora_a, down_lora_b, lora_scale, meta):
    inputs = (x, top_k_weights, up_lora_a, up_lora_b, down_lora_a, down_lora_b, up_bias, down_bias)
    return [x.new_empty(0) if v is None else torch.empty_like(v) for v in inputs]


def _setup_context(ctx, inputs, output):
    (x, idx, w, up, down, up_off, down_off, up_bias, down_bias, ua, ub, da, db, scale, meta) = inputs
    ctx.n_up, ctx.n_down = len(up), len(down)
    ctx.save_for_backward(x, idx, w, up_off, down_off, up_bias, down_bias, ua, ub, da, db, *up, *down)
    ctx.scale, ctx.meta = scale, list(meta)


def _backward(ctx, grad):
    x, idx, w, up_off, down_off, up_bias, down_bias, ua, ub, da, db, *rest = ctx.saved_tensors
    up, down = rest[:ctx.n_up], rest[ctx.n_up:]
    g = torch.ops.qengine.moe_experts_backward(grad, x, idx, w, up, down, up_off, down_off, up_bias, down_bias, ua,
                                               ub, da, db, ctx.scale, ctx.meta)
    gx, gw, gua, gub, gda, gdb, gubias, gdbias = g
    need = ctx.needs_input_grad

    def pick(i, t, present):
        return t if need[i] and present is not None else None

    return (pick(0, gx, x), None, pick(2, gw, w), [None] * ctx.n_up, [None] * ctx.n_down, None, None,
            pick(7, gubias, up_bias), pick(8, gdbias, down_bias), pick(9, gua, ua), pick(10, gub, ub),
            pick(11, gda, da), pick(12, gdb, db), None, None)


moe_experts.register_autograd(_backward, setup_context=_setup_context)
