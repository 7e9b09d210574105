"""KernelWeight: the one object that turns a quantized weight into kernel arguments, and
native_weight, the one tuple (a WeightRef, csrc/bind_args.h) that carries it into qengine._C.

QuantizedTensor.kernel_weight() and QuantLinear.kernel_weight() (and the experts built on it)
build a KernelWeight; the ops take its parts as their (fixed) schema arguments; the kernels
(cpu.py, cuda.py) turn those parts back into one native_weight tuple per call."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# Field order of the WeightRef tuple, as csrc/bind_args.h `weight_ref` reads it.
WEIGHT_REF_FIELDS = ("packed", "packed_bytes", "table", "bits", "blocksize", "rule", "scales", "nscales",
                     "nested_table", "nested_absmax", "nested_nabsmax", "nested_blocksize", "mean", "mean_address",
                     "offsets", "noffsets", "positions", "positions_bytes")

_INT64_SCALARS: dict[int, torch.Tensor] = {}


def int64_scalar(value: int) -> torch.Tensor:
    """A shared int64 scalar tensor (the nested blocksize argument of the matmul ops), built once
    per value, outside inference mode so that autograd may save it (a new one when traced)."""
    if torch.compiler.is_compiling():
        return torch.tensor(value, dtype=torch.int64)
    t = _INT64_SCALARS.get(value)
    if t is None:
        with torch.inference_mode(False):
            t = _INT64_SCALARS[value] = torch.tensor(value, dtype=torch.int64)
    return t


def native_weight(packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, nested, offsets, bits: int,
                  blocksize: int, positions: Optional[torch.Tensor] = None, device_mean: bool = False) -> tuple:
    """The WeightRef tuple (WEIGHT_REF_FIELDS) of checked weight parts: addresses and element
    counts only. nested: [] / None, or [table, absmax, mean, nested_blocksize]. The nested mean
    goes as a value (CPU kernels) or, device_mean=True, as the address of its float32 (CUDA:
    read in the kernel, no host synchronisation)."""
    if nested:
        ntable, absmax, mean, nbs = nested
        nested_part = (ntable.data_ptr(), absmax.data_ptr(), absmax.numel(), int(nbs),
                       0.0 if device_mean else float(mean), mean.data_ptr() if device_mean else 0)
    else:
        nested_part = (0, 0, 0, 1, 0.0, 0)
    return (packed.data_ptr(), packed.numel(), table.data_ptr(), bits, blocksize, 1 if offsets is not None else 0,
            scales.data_ptr(), scales.numel(), *nested_part,
            offsets.data_ptr() if offsets is not None else 0, offsets.numel() if offsets is not None else 0,
            positions.data_ptr() if positions is not None else 0, positions.numel() if positions is not None else 0)


class KernelWeight(NamedTuple):
    """A quantized weight [N, K] as the kernels take it (a NamedTuple: torch.compile traces it).

    packed: uint8 [ceil(stored * bits / 8)] codes (stored = N*K, or N*K/2 in the 2:4 layout);
    table: float32 [2^bits] codebook; scales: float32 [nblocks], or uint8 codes [nblocks] with
    nested = [table float32 [256], absmax float32 [ceil(nblocks / nbs)], mean float32 [1],
    nested blocksize int64 []] when double-quantized (decoded in the kernels), else nested = [];
    offsets: float32 [nblocks] (minmax formats, already decoded) or None; layout: "dense" or
    "2:4" (then positions: uint8 [ceil(N*K / 8)])."""

    packed: torch.Tensor
    table: torch.Tensor
    bits: int
    blocksize: int
    scales: torch.Tensor
    nested: list
    offsets: Optional[torch.Tensor]
    shape: tuple
    layout: str = "dense"
    positions: Optional[torch.Tensor] = None

    @staticmethod
    def nested_parts(table: torch.Tensor, absmax: torch.Tensor, mean: torch.Tensor, blocksize) -> list:
        """The nested list the ops take: blocksize as a tensor (an int becomes a shared int64 scalar)."""
        nbs = blocksize if isinstance(blocksize, torch.Tensor) else int64_scalar(int(blocksize))
        return [table, absmax, mean.reshape(1), nbs]

    @staticmethod
    def decode_nested(codes: torch.Tensor, nested: list, blocksize: Optional[int] = None) -> torch.Tensor:
        """float32 values [n] of double-quantized per-block values (uint8 codes [n]); blocksize:
        the nested block size as an int when known (traced code: no read of the tensor)."""
        table, absmax, mean, nbs = nested
        nbs = int(nbs) if blocksize is None else blocksize
        return torch.ops.qengine.dequantize_blockwise(codes, table, absmax, None, 8, nbs, codes.numel(),
                                                      torch.float32) + mean.reshape(())

    def dense_scales(self) -> torch.Tensor:
        """The float32 per-block scales (double-quantized ones decoded)."""
        return self.decode_nested(self.scales, self.nested) if self.nested else self.scales

    def matmul(self, x: torch.Tensor, lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
               lora_scale: float = 0.0) -> torch.Tensor:
        """x [..., K] @ W^T (+ lora_scale * (x @ A^T) @ B^T) through the layout's op."""
        n = self.shape[0]
        ops = torch.ops.qengine
        grad = torch.is_grad_enabled()  # off: the ops' twins without autograd (matmul.define_nograd_twin)
        if self.layout == "2:4":
            op = ops.sparse24_matmul if grad else ops.sparse24_matmul_nograd
            return op(x, self.packed, self.positions, self.table, self.scales, self.nested, self.offsets, self.bits,
                      self.blocksize, n, lora_a, lora_b, lora_scale)
        op = ops.matmul if grad else ops.matmul_nograd
        return op(x, self.packed, self.table, self.scales, self.nested, self.offsets, self.bits, self.blocksize, n,
                  lora_a, lora_b, lora_scale)

    def expert_state(self) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """([packed, table, scales (+ the 4 nested parts)], offsets) as qengine::moe_experts takes
        one stacked expert matrix."""
        return [self.packed, self.table, self.scales, *self.nested], self.offsets
