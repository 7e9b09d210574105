"""Schemas and fake (meta) implementations of the blockwise quantize / dequantize ops; their
kernels are registered per device in cpu.py and cuda.py (all take the kernel tables of
formats.Format.kernel_tables):

  qengine::quantize_blockwise(x, table, midpoints, sorted_to_code, grid_lut?, bits, blocksize, rule, identity_order)
      -> (packed uint8 [ceil(n*bits/8)], scales float32 [nblocks], offsets float32 [nblocks or 0])
  qengine::dequantize_blockwise(packed, table, scales, offsets?, bits, blocksize, numel, dtype) -> flat [numel]
  qengine::dequantize_blockwise_out(..., out) -> None   (writes into out)
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import num_blocks, packed_bytes, reject_device


@torch.library.custom_op("qengine::quantize_blockwise", mutates_args=())
def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, midpoints: torch.Tensor, sorted_to_code: torch.Tensor,
                       grid_lut: Optional[torch.Tensor], bits: int, blocksize: int, rule: int, identity_order: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: float, contiguous, any shape (quantized flat), blockwise; rule 0 = absmax (scale =
    block max |x|), 1 = minmax (scale = max - min, offset = min)."""
    reject_device("x", x)


@quantize_blockwise.register_fake
def _(x, table, midpoints, sorted_to_code, grid_lut, bits, blocksize, rule, identity_order):
    n = x.numel()
    nb = num_blocks(n, blocksize)
    return (x.new_empty(packed_bytes(n, bits), dtype=torch.uint8), x.new_empty(nb, dtype=torch.float32),
            x.new_empty(nb if rule == 1 else 0, dtype=torch.float32))


def quantize_outputs(x: torch.Tensor, bits: int, blocksize: int, rule: int):
    """The (packed, scales, offsets) buffers a quantize kernel fills, on x's device."""
    n, nb = x.numel(), num_blocks(x.numel(), blocksize)
    return (torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=x.device),
            torch.empty(nb, dtype=torch.float32, device=x.device),
            torch.empty(nb if rule == 1 else 0, dtype=torch.float32, device=x.device))


@torch.library.custom_op("qengine::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                         offsets: Optional[torch.Tensor], bits: int, blocksize: int, numel: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """The flat [numel] tensor in dtype: table[code] * scale (+ offset) per element."""
    reject_device("packed", packed)


@dequantize_blockwise.register_fake
def _(packed, table, scales, offsets, bits, blocksize, numel, dtype):
    return packed.new_empty(numel, dtype=dtype)


@torch.library.custom_op("qengine::dequantize_blockwise_out", mutates_args=("out",))
def dequantize_blockwise_out(packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                             offsets: Optional[torch.Tensor], bits: int, blocksize: int, numel: int,
                             out: torch.Tensor) -> None:
    """As dequantize_blockwise, written into out (float, contiguous, numel elements)."""
    reject_device("packed", packed)


@dequantize_blockwise_out.register_fake
def _(packed, table, scales, offsets, bits, blocksize, numel, out):
    return None
