"""The grouped Mixture-of-Experts op: the schema of qengine::moe_experts (forward; kernels per
device in cpu.py and cuda.py), its checks, fake implementation and autograd (through
qengine::moe_experts_backward, in moe_torch.py).

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

from .._checks import check_float, check_same_device, check_weight, reject_device

# gate_layout codes (csrc/include/qengine/moe.h)
GATE_CONCATENATED, GATE_INTERLEAVED, NO_GATE = 0, 1, 2
# activation codes, by transformers' `hidden_act` names
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_tanh": 1, "gelu_fast": 1,
               "gelu": 2, "relu": 3, "swiglu_oai": 4}
# gpt-oss's gate (transformers' GptOssExperts._apply_gate), activation code 4: with gate g and up u,
# (clamp(u, -L, L) + 1) * g' * sigmoid(ALPHA * g'), g' = clamp(g, max=L). No native kernel takes it:
# the CPU path runs it in Python around the per-expert small-batch products (moe_torch.py).
SWIGLU_OAI, SWIGLU_ALPHA, SWIGLU_LIMIT = 4, 1.702, 7.0
_META_LEN = 8


def split_matrix(state: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[list]]:
    if len(state) not in (3, 7):
        raise ValueError("an expert matrix is [packed, table, scales] plus 4 nested parts when double-quantized, "
                         f"got {len(state)} tensors")
    return state[0], state[1], state[2], (list(state[3:]) if len(state) == 7 else None)


def unpack_meta(meta: list[int]) -> tuple[int, ...]:
    if len(meta) != _META_LEN:
        raise ValueError(f"meta must be [num_experts, intermediate, up_bits, up_blocksize, down_bits, "
                         f"down_blocksize, gate_layout, activation], got {list(meta)}")
    return tuple(int(v) for v in meta)


def _check_matrix(name, state, offsets, bias, lora_a, lora_b, E, N, K, bits, blocksize, device):
    packed, table, scales, nested = split_matrix(state)
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


def check_moe_args(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a,
                up_lora_b, down_lora_a, down_lora_b, meta):
    E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act = unpack_meta(meta)
    check_float("hidden_states", x)
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
    if act == SWIGLU_OAI and gate_layout == NO_GATE:
        raise ValueError("activation swiglu_oai (code 4) needs a gate (gate_layout 0 or 1)")
    n_up = inter if gate_layout == NO_GATE else 2 * inter
    _check_matrix("up", up, up_offsets, up_bias, up_lora_a, up_lora_b, E, n_up, H, up_bits, up_bs, x.device)
    _check_matrix("down", down, down_offsets, down_bias, down_lora_a, down_lora_b, E, H, inter, down_bits, down_bs,
                  x.device)
    return E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act, n_up


def check_index_range(top_k_index: torch.Tensor, E: int) -> None:
    """ValueError naming the first expert index outside [0, E). (The CPU kernel checks every
    index itself before any work; this builds the message, off the hot path there.)"""
    bad = (top_k_index < 0) | (top_k_index >= E)
    if top_k_index.numel() and bool(bad.any()):
        raise ValueError(f"top_k_index holds expert index {top_k_index[bad][0].item()}, outside [0, {E}) for this "
                         f"layer's {E} experts")


@torch.library.custom_op("qengine::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, up: list[torch.Tensor],
                down: list[torch.Tensor], up_offsets: Optional[torch.Tensor], down_offsets: Optional[torch.Tensor],
                up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                up_lora_a: Optional[torch.Tensor], up_lora_b: Optional[torch.Tensor],
                down_lora_a: Optional[torch.Tensor], down_lora_b: Optional[torch.Tensor], lora_scale: float,
                meta: list[int]) -> torch.Tensor:
    """The routed experts of x [T, H] (float): [T, H] in x's dtype, accumulated in float32."""
    reject_device("hidden_states", x)


@moe_experts.register_fake
def _(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a, up_lora_b,
      down_lora_a, down_lora_b, lora_scale, meta):
    return x.new_empty(x.shape)


# --------------------------------------------------------------------------- autograd
GRAD_INPUTS = ("x", "top_k_weights", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b", "up_bias", "down_bias")


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
