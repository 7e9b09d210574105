"""The CUDA kernels of every qengine op, registered with `register_kernel("cuda")` when this
build has the CUDA kernels (otherwise a CUDA tensor reaches the op's default body, which says
so): checks (qengine/_checks.py), then launches on torch's current stream of the tensors' device."""

from __future__ import annotations

import torch

from .. import _C
from .._checks import (DTYPE_CODES, check_dequantize_args, check_dequantize_out_args, check_float_dtype,
                       check_matmul_args, check_matmul_t_args, check_quantize_args, check_sparse_weight)
from . import matmul as mm
from . import moe, optim, quantize, sparse
from .moe_torch import torch_experts
from .weight import KernelWeight, native_weight


def _register(op, nograd_twin: str | None = None):
    """Registers the decorated function as op's CUDA kernel (and its twin's, matmul.define_nograd_twin) when the
    CUDA kernels were compiled."""
    def deco(fn):
        if _C.cuda_compiled:
            op.register_kernel("cuda")(fn)
            if nograd_twin is not None:
                torch.library.register_kernel(f"qengine::{nograd_twin}", "cuda", fn)
        return fn
    return deco


def _stream(device: torch.device) -> int:
    """The handle of torch's current stream on `device`: every CUDA launch goes there."""
    return torch.cuda.current_stream(device).cuda_stream


# --------------------------------------------------------------------------- quantize / dequantize
@_register(quantize.quantize_blockwise)
def _(x, table, midpoints, sorted_to_code, grid_lut, bits, blocksize, rule, identity_order):
    check_quantize_args(x, table, midpoints, sorted_to_code, grid_lut, bits, blocksize, rule)
    packed, scales, offsets = quantize.quantize_outputs(x, bits, blocksize, rule)
    n = x.numel()
    # The CUDA kernels produce the CPU's bytes; `flags` is their error word (NaN, overflow),
    # read back once the stream has run them (quantization waits for its status).
    if n:
        flags = torch.empty(1, dtype=torch.int32, device=x.device)
        with torch.cuda.device(x.device):
            _C.cuda.quantize(x.data_ptr(), DTYPE_CODES[x.dtype], n, blocksize, table.data_ptr(), midpoints.data_ptr(),
                             sorted_to_code.data_ptr(), bits, identity_order,
                             grid_lut.data_ptr() if grid_lut is not None else 0, rule, packed.data_ptr(),
                             scales.data_ptr(), offsets.data_ptr() if rule == 1 else 0, flags.data_ptr(),
                             _stream(x.device))
    return packed, scales, offsets


def dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out) -> None:
    """Decodes into out (checked) on the current stream of packed's device."""
    if numel:
        with torch.cuda.device(packed.device):  # launches go to the current device
            _C.cuda.dequantize(native_weight(packed, table, scales, None, offsets, bits, blocksize), numel,
                               out.data_ptr(), DTYPE_CODES[out.dtype], _stream(packed.device))


@_register(quantize.dequantize_blockwise)
def _(packed, table, scales, offsets, bits, blocksize, numel, dtype):
    check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel)
    check_float_dtype(dtype)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out)
    return out


@_register(quantize.dequantize_blockwise_out)
def _(packed, table, scales, offsets, bits, blocksize, numel, out):
    check_dequantize_out_args(packed, table, scales, offsets, bits, blocksize, numel, out)
    dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out)


# --------------------------------------------------------------------------- matmul
def _dense_weight(packed, table, scales, nested, offsets, bits, blocksize, n, k, dtype):
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    dequantize_into(packed, table, KernelWeight.decode_nested(scales, nested) if nested else scales, offsets, bits,
                    blocksize, n * k, w)
    return w


def _small_batch_product(x2, n, weight, lora_a, lora_b, lora_scale):
    """x2 [M, K] @ W^T by the fused GEMV (float32 [M, N]) for W's WeightRef `weight`; the LoRA side
    path is added by torch in float32 (an epilogue before rounding to x2's dtype, as on the CPU):
    two thin products, no kernel."""
    m, k = x2.shape
    xf = x2.to(torch.float32).contiguous()
    y = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    if m and n:
        with torch.cuda.device(x2.device):
            _C.cuda.matmul(xf.data_ptr(), m, k, k, n, weight, y.data_ptr(), _stream(x2.device))
        if lora_a is not None:
            side = (xf @ lora_a.to(torch.float32).t()) @ lora_b.to(torch.float32).t()
            y.add_(side, alpha=float(lora_scale))
    return y.to(x2.dtype)


def _small_batch_product_t(g2, k, weight):
    """g2 [M, N] @ W by the fused kernel (float32 [M, K]), which sums row splits of W in a fixed
    order through a scratch buffer; rounded to g2's dtype."""
    m, n = g2.shape
    gf = g2.to(torch.float32).contiguous()
    gx = torch.empty(m, k, dtype=torch.float32, device=g2.device)
    if m and k:
        ws = torch.empty(_C.cuda.matmul_t_workspace(m, n, k), dtype=torch.float32, device=g2.device)
        with torch.cuda.device(g2.device):
            _C.cuda.matmul_t(gf.data_ptr(), m, n, k, weight, ws.data_ptr(), ws.numel(), gx.data_ptr(),
                             _stream(g2.device))
    return gx.to(g2.dtype)


@_register(mm.matmul, mm.MATMUL_NOGRAD)
def _(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b, lora_scale):
    k, n = check_matmul_args(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a,
                             lora_b)
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= mm.SMALL_BATCH_ROWS:
        weight = native_weight(packed, table, scales, scales_nested, offsets, bits, blocksize, device_mean=True)
        y = _small_batch_product(x2, n, weight, lora_a, lora_b, lora_scale)
    else:
        w = _dense_weight(packed, table, scales, scales_nested, offsets, bits, blocksize, n, k, x.dtype)
        y = mm.add_lora_side(x2 @ w.t(), x2, lora_a, lora_b, lora_scale)
        del w  # the dense copy lives only for this product
    return y.reshape(*x.shape[:-1], n)


@_register(mm.matmul_t)
def _(g, packed, table, scales, scales_nested, offsets, bits, blocksize, in_features):
    n, k = check_matmul_t_args(g, packed, table, scales, scales_nested, offsets, bits, blocksize, in_features)
    g2 = g.reshape(-1, n)
    if g2.shape[0] <= mm.SMALL_BATCH_ROWS:
        weight = native_weight(packed, table, scales, scales_nested, offsets, bits, blocksize, device_mean=True)
        gx = _small_batch_product_t(g2, k, weight)
    else:
        w = _dense_weight(packed, table, scales, scales_nested, offsets, bits, blocksize, n, k, g.dtype)
        gx = g2 @ w
        del w
    return gx.reshape(*g.shape[:-1], k)


# --------------------------------------------------------------------------- 2:4 sparse
@_register(sparse.sparse24_dequantize)
def _(packed, positions, table, scales, offsets, bits, blocksize, numel, dtype):
    check_sparse_weight(packed, positions, table, scales, None, offsets, bits, blocksize, numel)
    check_float_dtype(dtype)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel:
        with torch.cuda.device(packed.device):
            _C.cuda.sparse24_dequantize(native_weight(packed, table, scales, None, offsets, bits, blocksize,
                                                      positions), numel // 2, out.data_ptr(), DTYPE_CODES[dtype],
                                        _stream(packed.device))
    return out


@_register(sparse.sparse24_matmul, sparse.SPARSE24_MATMUL_NOGRAD)
def _(x, packed, positions, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b,
      lora_scale):
    """The dense path at every batch size: W decoded once, one GEMM."""
    k, n = check_matmul_args(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a,
                             lora_b, positions)
    x2 = x.reshape(-1, k)
    w = sparse.dense_sparse_weight(packed, positions, table, scales, scales_nested, offsets, bits, blocksize, n, k,
                                   x.dtype)
    y = mm.add_lora_side(x2 @ w.t(), x2, lora_a, lora_b, lora_scale)
    del w
    return y.reshape(*x.shape[:-1], n)


@_register(sparse.sparse24_matmul_t)
def _(g, packed, positions, table, scales, scales_nested, offsets, bits, blocksize, in_features):
    """The dense path: W decoded once, one GEMM."""
    n, k = check_matmul_t_args(g, packed, table, scales, scales_nested, offsets, bits, blocksize, in_features,
                               positions)
    w = sparse.dense_sparse_weight(packed, positions, table, scales, scales_nested, offsets, bits, blocksize, n, k,
                                   g.dtype)
    gx = g.reshape(-1, n) @ w
    del w
    return gx.reshape(*g.shape[:-1], k)


# --------------------------------------------------------------------------- Mixture of Experts
@_register(moe.moe_experts)
def _(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias, up_lora_a, up_lora_b,
      down_lora_a, down_lora_b, lora_scale, meta):
    """The dense path: each matrix dequantized once, one product per active expert."""
    E = moe.check_moe_args(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias,
                           up_lora_a, up_lora_b, down_lora_a, down_lora_b, meta)[0]
    moe.check_index_range(top_k_index, E)
    return torch_experts(x, top_k_index, top_k_weights, up, down, up_offsets, down_offsets, up_bias, down_bias,
                         up_lora_a, up_lora_b, down_lora_a, down_lora_b, lora_scale, meta).to(x.dtype)


# --------------------------------------------------------------------------- AdamW
def _run_adamw_tasks(tasks, hyper, state_bits, device, codes) -> None:
    code_args = (*codes[0].args(), *codes[1].args()) if codes else (0, 0, 0, 0) * 2
    _C.cuda.adamw(tasks.data_ptr(), tasks.shape[0], hyper.data_ptr(), hyper.shape[0], state_bits, *code_args,
                  _stream(device))


if _C.cuda_compiled:
    optim.TASK_RUNNERS["cuda"] = _run_adamw_tasks
    optim.adamw_update.register_kernel("cuda")(optim.adamw_update_kernel)
