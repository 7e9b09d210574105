"""Schemas, fake implementations and autograd of the 2:4 sparse layout's ops (byte order in
csrc/cpu/sparse/sparse24.h; kernels per device in cpu.py and cuda.py):

  qengine::sparse24_dequantize(packed, positions, table, scales, offsets?, bits, blocksize, numel, dtype) -> [numel]
  qengine::sparse24_matmul(x, packed, positions, table, scales, scales_nested, offsets?, bits, blocksize,
                           out_features, lora_a?, lora_b?, lora_scale) -> [..., out_features]
      (and qengine::sparse24_matmul_nograd, its twin without autograd; matmul.define_nograd_twin)
  qengine::sparse24_matmul_t(g, packed, positions, table, scales, scales_nested, offsets?, bits, blocksize,
                             in_features) -> [..., in_features]
The stored values (numel / 2 of them) are quantized blockwise over their storage order, so
`packed`, `scales` and `offsets` are those of a dense quantized tensor of numel / 2 elements.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import reject_device
from .matmul import define_nograd_twin, lora_backward
from .weight import KernelWeight

# Weights per group and kept per group of the layout.
GROUP, KEPT = 4, 2


@torch.library.custom_op("qengine::sparse24_dequantize", mutates_args=())
def sparse24_dequantize(packed: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                        offsets: Optional[torch.Tensor], bits: int, blocksize: int, numel: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """The dense flat weight [numel] (dtype) of a 2:4 sparse tensor; pruned positions are 0."""
    reject_device("packed", packed)


@sparse24_dequantize.register_fake
def _(packed, positions, table, scales, offsets, bits, blocksize, numel, dtype):
    return packed.new_empty(numel, dtype=dtype)


def _sparse24_matmul(x: torch.Tensor, packed: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                     scales: torch.Tensor, scales_nested: list[torch.Tensor], offsets: Optional[torch.Tensor],
                     bits: int, blocksize: int, out_features: int, lora_a: Optional[torch.Tensor],
                     lora_b: Optional[torch.Tensor], lora_scale: float) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T (+ lora_scale * (x @ A^T) @ B^T) for the 2:4 sparse W [N, K];
    arguments as qengine::matmul plus positions uint8 [N*K/8]. Up to SMALL_BATCH_ROWS rows
    read only the compressed bytes (CPU); more rows, or CUDA tensors, dequantize W once and use a
    dense GEMM."""
    reject_device("x", x)


def _sparse24_matmul_fake(x, packed, positions, table, scales, scales_nested, offsets, bits, blocksize,
                          out_features, lora_a, lora_b, lora_scale):
    return x.new_empty(*x.shape[:-1], out_features)


sparse24_matmul = torch.library.custom_op("qengine::sparse24_matmul", _sparse24_matmul, mutates_args=())
sparse24_matmul.register_fake(_sparse24_matmul_fake)
SPARSE24_MATMUL_NOGRAD = define_nograd_twin("sparse24_matmul", _sparse24_matmul, _sparse24_matmul_fake)


@torch.library.custom_op("qengine::sparse24_matmul_t", mutates_args=())
def sparse24_matmul_t(g: torch.Tensor, packed: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                      scales: torch.Tensor, scales_nested: list[torch.Tensor], offsets: Optional[torch.Tensor],
                      bits: int, blocksize: int, in_features: int) -> torch.Tensor:
    """gx[..., K] = g[..., N] @ W for the 2:4 sparse W [N, K] (the backward of sparse24_matmul
    for x); arguments as qengine::matmul_t plus positions."""
    reject_device("g", g)


@sparse24_matmul_t.register_fake
def _(g, packed, positions, table, scales, scales_nested, offsets, bits, blocksize, in_features):
    return g.new_empty(*g.shape[:-1], in_features)


def dense_sparse_weight(packed, positions, table, scales, nested, offsets, bits, blocksize, n, k, dtype):
    """The 2:4 weight decoded to dense [n, k] in dtype (one layer's weight, freed by the caller)."""
    flat_scales = KernelWeight.decode_nested(scales, nested) if nested else scales
    return torch.ops.qengine.sparse24_dequantize(packed, positions, table, flat_scales, offsets, bits, blocksize,
                                                 n * k, dtype).reshape(n, k)


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
    if ctx.needs_input_grad[0]:  # the weight is frozen: only x's gradient goes through it
        gx = torch.ops.qengine.sparse24_matmul_t(grad, packed, positions, table, scales, nested, offsets, bits,
                                                 blocksize, k).to(x_dtype)
    if lora_a is not None:
        gx, ga, gb = lora_backward(grad, x, lora_a, lora_b, s, gx, ctx.needs_input_grad[10], ctx.needs_input_grad[11])
    return gx, None, None, None, None, [None] * len(nested), None, None, None, None, ga, gb, None


sparse24_matmul.register_autograd(_backward, setup_context=_setup_context)
