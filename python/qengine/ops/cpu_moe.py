"""The CPU kernel of qengine::moe_experts (every expert's two products and the gate in one
native call, moe_experts_cpu; gpt-oss's gate through the per-expert torch computation)."""

from __future__ import annotations

import torch

from .. import _C
from .._checks import DTYPE_CODES
from . import moe
from .cpu import rounded_to
from .moe_torch import torch_experts
from .weight import native_weight


def _expert_matrix(state, offsets, bits, blocksize, N, K, bias, lora_a, lora_b, lora_scale) -> tuple:
    """One stacked expert matrix as moe_experts_cpu takes it: (WeightRef, N, K, bias, bias dtype,
    lora_a, lora_b, lora dtype, rank, scale)."""
    packed, table, scales, nested = moe.split_matrix(state)
    weight = native_weight(packed, table, scales, nested, offsets, bits, blocksize)
    bias_args = (bias.data_ptr(), DTYPE_CODES[bias.dtype]) if bias is not None else (0, 0)
    if lora_a is None:
        lora_args = (0, 0, 0, 0, 0.0)
    else:
        lora_args = (lora_a.data_ptr(), lora_b.data_ptr(), DTYPE_CODES[lora_a.dtype], lora_a.shape[1],
                     float(lora_scale))
    return (weight, N, K, *bias_args, *lora_args)


def _same_dtype(a, b):
    """One dtype for a matrix's two adapters (the kernel reads both with one code), contiguous."""
    if a is None:
        return None, None
    a = a.contiguous()
    return a, b.to(a.dtype).contiguous()


@moe.moe_experts.register_kernel("cpu")
def _(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a, up_lora_b,
      down_lora_a, down_lora_b, lora_scale, meta):
    E, inter, up_bits, up_bs, down_bits, down_bs, gate_layout, act, n_up = moe.check_moe_args(
        x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a, up_lora_b,
        down_lora_a, down_lora_b, meta)
    T, H = x.shape
    if act == moe.SWIGLU_OAI:  # gpt-oss's gate: no native kernel; per-expert small-batch products
        moe.check_index_range(top_k_index, E)
        return torch_experts(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias,
                             up_lora_a, up_lora_b, down_lora_a, down_lora_b, lora_scale, meta).to(x.dtype)
    xc = x.contiguous()
    idx = top_k_index.to(torch.int64).contiguous()
    w = top_k_weights.to(torch.float32).contiguous()
    ua, ub = _same_dtype(up_lora_a, up_lora_b)
    da, db = _same_dtype(down_lora_a, down_lora_b)
    ubias = None if up_bias is None else up_bias.contiguous()
    dbias = None if down_bias is None else down_bias.contiguous()
    y = torch.empty(T, H, dtype=torch.float32)
    if T:
        try:
            _C.moe_experts_cpu(xc.data_ptr(), DTYPE_CODES[xc.dtype], T, H, idx.data_ptr(), w.data_ptr(), idx.shape[1],
                               E, _expert_matrix(up, up_offsets, up_bits, up_bs, n_up, H, ubias, ua, ub, lora_scale),
                               _expert_matrix(down, down_offsets, down_bits, down_bs, H, inter, dbias, da, db,
                                              lora_scale), gate_layout, act, y.data_ptr())
        except ValueError:
            moe.check_index_range(idx, E)  # the usual cause, named; anything else re-raised as is
            raise
    return rounded_to(y, xc.dtype)
