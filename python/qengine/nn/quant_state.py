"""QuantLinear's quantized state, declared once: every tensor it holds (name, what it holds,
whether it is saved), and how a QuantizedTensor's parts map onto it."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..tensor import NestedScales, QuantizedTensor


class StateField(NamedTuple):
    """One tensor of a QuantLinear's quantized state."""
    name: str
    holds: str  # dtype and shape
    persistent: bool = True  # False: derived from the others (not counted in weight_nbytes)


def _block_fields(part: str) -> tuple[StateField, ...]:
    return (StateField(f"weight_{part}", f"float32 [nblocks] {part}, or uint8 [nblocks] codes when double-quantized"),
            StateField(f"weight_{part}_table", "float32 [256]: the nested codebook (double quant)"),
            StateField(f"weight_{part}_absmax", "float32 [ceil(nblocks / nested blocksize)] (double quant)"),
            StateField(f"weight_{part}_mean", "float32 [1]: the nested mean (double quant)"),
            StateField(f"weight_{part}_bs", "int64 []: the nested blocksize as the ops take it (double quant)",
                       persistent=False))


# The quantized state, declared once. _set_quantized fills it from a QuantizedTensor (parts a
# weight lacks are plain None attributes, never None buffer slots); quantized() and
# kernel_weight() read it back; _apply moves it between devices and never casts it; weight_nbytes
# counts it; state dicts (qengine's and bitsandbytes') go through quantized(); copying and
# pickling carry it as the module's parameter and buffers.
STATE = (StateField("weight_packed", "uint8 [nbytes] codes, a frozen PackedParameter (viewed as quant_storage)"),
         StateField("weight_table", "float32 [2^bits]: the codebook"),
         *_block_fields("scales"), *_block_fields("offsets"),
         StateField("weight_positions", "uint8 [ceil(numel / 8)]: the 2:4 layout's kept positions"),
         StateField("weight_mask", "uint8 [ceil(numel / 8)]: a stored pruning mask"))


STATE_NAMES = tuple(f.name for f in STATE)
# What kernel_weight() reads besides the state: assigning any of these drops its cache.
CACHE_INPUTS = frozenset({f.name for f in STATE} | {"format", "blocksize", "layout", "quant_storage", "in_features",
                                                     "out_features", "offsets_nested_blocksize",
                                                     "scales_nested_blocksize", "scales_nested_format",
                                                     "offsets_nested_format", "_packed_bytes"})


def state_tensors(q: QuantizedTensor) -> dict[str, Optional[torch.Tensor]]:
    """The STATE tensors of q (weight_packed as uint8), by name; None for absent parts."""
    parts = {"weight_packed": q.packed, "weight_table": q.format.kernel_tables(q.device)[0],
             "weight_positions": q.positions, "weight_mask": q.mask}
    for part, value in (("scales", q.scales), ("offsets", q.offsets)):
        nested = isinstance(value, NestedScales)
        inner = value.quantized if nested else None
        parts.update({f"weight_{part}": inner.packed if nested else value,
                      f"weight_{part}_table": inner.format.kernel_tables(q.device)[0] if nested else None,
                      f"weight_{part}_absmax": inner.scales if nested else None,
                      f"weight_{part}_mean": value.mean.reshape(1) if nested else None,
                      f"weight_{part}_bs": torch.tensor(inner.blocksize, dtype=torch.int64) if nested else None})
    return parts
