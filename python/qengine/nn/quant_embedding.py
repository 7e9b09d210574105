"""QuantEmbedding: an nn.Embedding whose table stays blockwise-quantized (packed codes plus
per-block scales, e.g. a GGUF token_embd); a lookup decodes only the requested rows."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import FLOAT_DTYPES
from ..tensor import NestedScales, QuantizedTensor

__all__ = ["QuantEmbedding"]

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# The quantized state: buffers moved between devices, never cast (see _apply).
_STATE = ("weight_packed", "weight_table", "weight_scales", "weight_offsets")


class QuantEmbedding(nn.Module):
    """``out = table[input]`` with the table [num_embeddings, embedding_dim] stored quantized.

    Each row is whole blocks (embedding_dim a multiple of the block size, which GGUF
    guarantees), so a lookup gathers the packed bytes and block scales (and offsets) of the
    requested rows only and decodes them with qengine's dequantize op: the result equals
    decoding the whole table and indexing it, bit for bit. The output dtype is ``dtype`` (the
    table's original dtype; ``module.to(torch.bfloat16)`` changes it, the stored codes and
    scales keep theirs). The table is frozen: it holds no parameters, so no gradient reaches
    it. The state dict is the QuantizedTensor layout under ``weight.`` (as QuantLinear's).

    ``QuantEmbedding(num_embeddings, embedding_dim)`` is an empty skeleton for load_state_dict;
    ``QuantEmbedding.from_quantized(q)`` wraps an existing QuantizedTensor (not copied).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None):
        super().__init__()
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.format, self.blocksize, self.dtype = None, 0, torch.float32
        for name in _STATE:
            self.register_buffer(name, None)

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, padding_idx: Optional[int] = None) -> "QuantEmbedding":
        """A lookup table around q (2-D [num_embeddings, embedding_dim], dense layout, plain
        float32 block scales, rows of whole blocks)."""
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
        if len(q.shape) != 2:
            raise ValueError(f"q must be 2-D [num_embeddings, embedding_dim], got shape {tuple(q.shape)}")
        self = cls(int(q.shape[0]), int(q.shape[1]), padding_idx)
        self._set_quantized(q)
        return self

    def _set_quantized(self, q: QuantizedTensor) -> None:
        rows, dim = q.shape
        if (rows, dim) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"the quantized table has shape {tuple(q.shape)}, this embedding expects "
                             f"({self.num_embeddings}, {self.embedding_dim})")
        # A row must be whole blocks of whole bytes, so that gathering rows gathers their blocks.
        if q.layout != "dense" or q.mask is not None or q.per_row:
            raise ValueError("QuantEmbedding takes a dense, unmasked, blockwise QuantizedTensor, got "
                             f"layout={q.layout!r}, masked={q.mask is not None}, per_row={q.per_row}")
        if isinstance(q.scales, NestedScales) or isinstance(q.offsets, NestedScales):
            raise ValueError("QuantEmbedding needs plain float32 block scales (double_quant=False): nested "
                             "scales would be decoded whole for every lookup")
        if dim % q.blocksize or (dim * q.format.bits) % 8:
            raise ValueError(f"embedding_dim {dim} must be a multiple of the block size ({q.blocksize}) and a row "
                             f"whole bytes of {q.format.bits}-bit codes")
        if q.dtype not in FLOAT_DTYPES:
            raise ValueError(f"the table's dtype must be float32, float16 or bfloat16, got {q.dtype}")
        self.format, self.blocksize, self.dtype = q.format, q.blocksize, q.dtype
        self.weight_packed = q.packed
        self.weight_table = q.format.kernel_tables(q.device)[0]
        self.weight_scales = q.scales
        self.weight_offsets = q.offsets

    def quantized(self) -> QuantizedTensor:
        """The table as a QuantizedTensor sharing this module's storage (no copy)."""
        self._check_loaded()
        return QuantizedTensor(self.weight_packed, self.weight_scales, self.weight_offsets, self.format,
                               torch.Size([self.num_embeddings, self.embedding_dim]), self.dtype, self.blocksize)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense table [num_embeddings, embedding_dim] (default dtype: self.dtype)."""
        return self.quantized().dequantize(dtype)

    def _check_loaded(self) -> None:
        if self.weight_packed is None:
            raise RuntimeError("QuantEmbedding holds no table yet: load a state dict into it, or build it with "
                               "QuantEmbedding.from_quantized")

    @property
    def weight_nbytes(self) -> int:
        """Bytes held by the quantized table: codes, scales, offsets, codebook."""
        return sum(t.numel() * t.element_size() for name in _STATE if (t := getattr(self, name)) is not None)

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: integer indices [...] -> [..., embedding_dim] in self.dtype."""
        self._check_loaded()
        if not isinstance(input, torch.Tensor) or input.dtype not in _INDEX_DTYPES:
            got = input.dtype if isinstance(input, torch.Tensor) else type(input).__name__
            raise TypeError(f"QuantEmbedding takes integer indices (torch.long or torch.int), got {got}")
        idx = input.reshape(-1).to(device=self.weight_packed.device, dtype=torch.long)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_embeddings:
                bad = lo if lo < 0 else hi
                raise IndexError(f"index {bad} is out of range for an embedding of {self.num_embeddings} rows "
                                 f"(indices must be 0..{self.num_embeddings - 1})")
        packed = self.weight_packed.view(self.num_embeddings, -1).index_select(0, idx)
        scales = self.weight_scales.view(self.num_embeddings, -1).index_select(0, idx)
        offsets = None
        if self.weight_offsets is not None:
            offsets = self.weight_offsets.view(self.num_embeddings, -1).index_select(0, idx).reshape(-1)
        flat = torch.ops.qengine.dequantize_blockwise(packed.reshape(-1), self.weight_table, scales.reshape(-1),
                                                      offsets, self.format.bits, self.blocksize,
                                                      idx.numel() * self.embedding_dim, self.dtype)
        return flat.reshape(*input.shape, self.embedding_dim)

    # ------------------------------------------------------------------ device moves
    def _apply(self, fn, recurse=True):
        # Float casts (model.half()) change the output dtype only; the codes, scales and table
        # move between devices but keep their dtypes (a cast would round the exact scales).
        state = {id(t) for name in _STATE if (t := getattr(self, name)) is not None}
        cast = []

        def guarded(t):
            out = fn(t)
            if id(t) in state and out.dtype != t.dtype:
                cast.append(out.dtype)
                out = t.to(out.device)
            return out

        out = super()._apply(guarded, recurse)
        if cast:
            self.dtype = cast[0]
        return out

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.weight_packed is None:
            return
        for key, t in self.quantized().state_dict(prefix + "weight.").items():
            destination[key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight.quant_meta" not in state_dict:
            if prefix + "weight" in state_dict:
                raise ValueError(f"{prefix}weight is a float table, not a quantized one (no {prefix}weight.quant_meta):"
                                 " build the QuantEmbedding with from_quantized(qengine.quantize(weight, ...))")
            missing_keys.append(prefix + "weight.quant_meta")
            return
        q = QuantizedTensor.from_state_dict(state_dict, prefix + "weight.")
        device = self.weight_packed.device if self.weight_packed is not None else q.device
        q = q.to(device) if q.device != device else _cloned(q)  # never alias the caller's state dict
        self._set_quantized(q)

    def extra_repr(self) -> str:
        fmt = self.format.name if self.format is not None else None
        bits = 8 * self.weight_nbytes / (self.num_embeddings * self.embedding_dim)
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, format={fmt}, "
                f"blocksize={self.blocksize}, dtype={self.dtype}, bytes={self.weight_nbytes}, "
                f"bits_per_param={bits:.3f}")


def _cloned(q: QuantizedTensor) -> QuantizedTensor:
    def c(t):
        return None if t is None else t.clone()

    return QuantizedTensor(c(q.packed), c(q.scales), c(q.offsets), q.format, q.shape, q.dtype, q.blocksize)
