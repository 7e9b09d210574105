"""The torch.library ops of the 2:4 sparse layout (byte order in csrc/cpu/sparse24.h):
schemas, fake implementations and the kernels calling qengine._C. Device names appear here
and in _ops.py only.

Ops:
  qengine::sparse24_dequantize(packed, positions, table, scales, offsets?, bits, blocksize, numel, dtype) -> [numel]
  qengine::sparse24_matmul(x, packed, positions, table, scales, scales_nested, offsets?, bits, blocksize,
                           out_features, lora_a?, lora_b?, lora_scale) -> [..., out_features]
The stored values (numel / 2 of them) are quantized blockwise over their storage order, so
`packed`, `scales` and `offsets` are those of a dense quantized tensor of numel / 2 elements.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C, _ops
from ._checks import FLOAT_DTYPES, check_contiguous, check_dtype, check_float, check_numel, check_same_device
from ._ops import (DTYPE_CODES, SMALL_BATCH_ROWS, check_dequantize_args, check_device, check_lora, check_nested,
                   dense_scales, num_blocks)

# Weights per group and kept per group of the layout.
GROUP, KEPT = 4, 2


def positions_bytes(numel: int) -> int:
    """Bytes of packed 2-bit positions of a 2:4 weight with `numel` elements."""
    return -(-(numel // 2) // 4)


def _check_sparse_weight(packed, positions, table, scales, nested, offsets, bits, blocksize, numel):
    if numel % GROUP:
        raise ValueError(f"a 2:4 weight needs a multiple of 4 elements, got {numel}")
    stored = numel // 2
    if nested is None:
        check_dequantize_args(packed, table, scales, offsets, bits, blocksize, stored)
    else:
        check_dequantize_args(packed, table, None, offsets, bits, blocksize, stored)
        check_nested(scales, nested, num_blocks(stored, blocksize), packed.device)
    check_dtype("positions", positions, torch.uint8)
    check_contiguous("positions", positions)
    check_numel("positions", positions, positions_bytes(numel))
    check_same_device(packed.device, positions=positions)


def _dequantize_into(packed, positions, table, scales, offsets, bits, blocksize, numel, out):
    if numel == 0:
        return
    args = (packed.data_ptr(), positions.data_ptr(), numel // 2, blocksize, table.data_ptr(), bits,
            1 if offsets is not None else 0, scales.data_ptr(), offsets.data_ptr() if offsets is not None else 0,
            out.data_ptr(), DTYPE_CODES[out.dtype])
    if packed.device.type == "cuda":
        _C.cuda.sparse24_dequantize(*args, torch.cuda.current_stream(packed.device).cuda_stream)
    else:
        _C.sparse24_dequantize_cpu(*args)


@torch.library.custom_op("qengine::sparse24_dequantize", mutates_args=())
def sparse24_dequantize(packed: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                        offsets: Optional[torch.Tensor], bits: int, blocksize: int, numel: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """The dense flat weight [numel] (dtype) of a 2:4 sparse tensor; pruned positions are 0."""
    check_device("packed", packed)
    _check_sparse_weight(packed, positions, table, scales, None, offsets, bits, blocksize, numel)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    _dequantize_into(packed, positions, table, scales, offsets, bits, blocksize, numel, out)
    return out


@sparse24_dequantize.register_fake
def _(packed, positions, table, scales, offsets, bits, blocksize, numel, dtype):
    return packed.new_empty(numel, dtype=dtype)


def _weight_args(packed, positions, blocksize, table, bits, scales, nested, offsets):
    rule = 1 if offsets is not None else 0
    if nested is None:
        scale_args = (scales.data_ptr(), 0, 0, 1, 0.0)
    else:
        ntable, absmax, mean, nbs = nested
        scale_args = (scales.data_ptr(), ntable.data_ptr(), absmax.data_ptr(), int(nbs), float(mean))
    return (packed.data_ptr(), positions.data_ptr(), blocksize, table.data_ptr(), bits, rule, *scale_args,
            offsets.data_ptr() if offsets is not None else 0)


def _dense(packed, positions, table, scales, nested, offsets, bits, blocksize, n, k, dtype):
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    _dequantize_into(packed, positions, table, dense_scales(scales, nested), offsets, bits, blocksize, n * k, w)
    return w


@torch.library.custom_op("qengine::sparse24_matmul", mutates_args=())
def sparse24_matmul(x: torch.Tensor, packed: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                    scales: torch.Tensor, scales_nested: list[torch.Tensor], offsets: Optional[torch.Tensor],
                    bits: int, blocksize: int, out_features: int, lora_a: Optional[torch.Tensor],
                    lora_b: Optional[torch.Tensor], lora_scale: float) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T (+ lora_scale * (x @ A^T) @ B^T) for the 2:4 sparse W [N, K];
    arguments as qengine::matmul plus positions uint8 [N*K/8]. Up to SMALL_BATCH_ROWS rows
    read only the compressed bytes (CPU); more rows, or CUDA tensors, dequantize W once and use a
    dense GEMM."""
    scales_nested = scales_nested or None
    check_float("x", x)
    check_device("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    k, n = x.shape[-1], out_features
    if n < 0:
        raise ValueError(f"out_features must be >= 0, got {n}")
    if k % GROUP:
        raise ValueError(f"a 2:4 weight needs in_features divisible by 4, got {k}")
    _check_sparse_weight(packed, positions, table, scales, scales_nested, offsets, bits, blocksize, n * k)
    check_same_device(x.device, packed=packed)
    check_lora(lora_a, lora_b, k, n, x.device)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x.device.type == "cpu" and m <= SMALL_BATCH_ROWS:
        xc = x2.contiguous()
        y = torch.empty(m, n, dtype=torch.float32)
        if m and n:
            _C.sparse24_matmul_cpu(xc.data_ptr(), DTYPE_CODES[xc.dtype], m, k, k, n,
                                   *_weight_args(packed, positions, blocksize, table, bits, scales, scales_nested,
                                                 offsets), y.data_ptr())
        y = _ops.cpu_small_batch_epilogue(xc, y, lora_a, lora_b, lora_scale)
    else:
        w = _dense(packed, positions, table, scales, scales_nested, offsets, bits, blocksize, n, k, x.dtype)
        y = x2 @ w.t()
        del w  # the dense copy lives only for this product
        if lora_a is not None:
            side = (x2.to(torch.float32) @ lora_a.to(torch.float32).t()) @ lora_b.to(torch.float32).t()
            y = y + (lora_scale * side).to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


@sparse24_matmul.register_fake
def _(x, packed, positions, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b,
      lora_scale):
    return x.new_empty(*x.shape[:-1], out_features)


def _setup_context(ctx, inputs, output):
    x, packed, positions, table, scales, scales_nested, offsets, bits, blocksize, n, lora_a, lora_b, s = inputs
    nested = list(scales_nested)
    ctx.save_for_backward(x if lora_a is not None else None, lora_a, lora_b, packed, positions, table, scales,
                          offsets, *nested)
    ctx.meta = (bits, blocksize, x.shape[-1], n, s, x.dtype)


def _backward(ctx, grad):
    x, lora_a, lora_b, packed, positions, table, scales, offsets, *nested = ctx.saved_tensors
    bits, blocksize, k, n, s, x_dtype = ctx.meta
    gx = ga = gb = None
    if ctx.needs_input_grad[0]:
        # The weight is frozen; the transposed product runs on the dequantized layer (freed at once).
        w = torch.ops.qengine.sparse24_dequantize(packed, positions, table, dense_scales(scales, nested or None),
                                                  offsets, bits, blocksize, n * k, grad.dtype).reshape(n, k)
        gx = (grad.reshape(-1, n) @ w).reshape(*grad.shape[:-1], k).to(x_dtype)
        del w
    if lora_a is not None:
        g2 = grad.reshape(-1, n).to(torch.float32)
        x2 = x.reshape(-1, k).to(torch.float32)
        a32, b32 = lora_a.to(torch.float32), lora_b.to(torch.float32)
        gb_t = g2 @ b32
        if ctx.needs_input_grad[0]:
            gx = gx + (s * (gb_t @ a32)).reshape(gx.shape).to(gx.dtype)
        if ctx.needs_input_grad[10]:
            ga = (s * (gb_t.t() @ x2)).to(lora_a.dtype)
        if ctx.needs_input_grad[11]:
            gb = (s * (g2.t() @ (x2 @ a32.t()))).to(lora_b.dtype)
    return gx, None, None, None, None, [None] * len(nested), None, None, None, None, ga, gb, None


sparse24_matmul.register_autograd(_backward, setup_context=_setup_context)
