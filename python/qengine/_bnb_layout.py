"""QuantizedTensor <-> the bitsandbytes 4-bit layout, as transformers + bitsandbytes save a
`Linear4bit` weight (one tensor; whole models are qengine.compat.bnb's):

    {p}                                 uint8 [(numel + 1) // 2, 1]  packed codes (same nibble order)
    {p}.absmax                          float32 [nblocks], or uint8 [nblocks] when nested
    {p}.quant_map                       float32 [16]                 the NF4/FP4 table
    {p}.nested_absmax                   float32 [ceil(nblocks / 256)]   (double quant only)
    {p}.nested_quant_map                float32 [256]                the dynamic 8-bit map
    {p}.quant_state.bitsandbytes__nf4   uint8 JSON: quant_type, blocksize, dtype, shape,
                                        nested_blocksize, nested_dtype, nested_offset

The bytes are qengine's own for nf4/fp4, so conversion copies no codes and never re-quantizes.
Here, below both nn and compat, so QuantLinear's state dict and compat.bnb's whole-model
functions share it without importing each other.
"""

from __future__ import annotations

import json
import math

import torch

from .formats import get_format
from .tensor import NESTED_BLOCKSIZE, NESTED_FORMAT, NestedScales, QuantizedTensor

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict"]

_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_bnb_state_dict(q: QuantizedTensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The bitsandbytes `Linear4bit` state-dict entries for an nf4/fp4 QuantizedTensor."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    name = q.format.name
    if q.format.scale_format:
        raise ValueError(f"{name} has no bitsandbytes layout (bitsandbytes stores nf4/fp4 with float32 or dynamic "
                         f"8-bit scales; {name}'s {q.format.scale_format[1:].upper()} block scales have no place "
                         "there): save it with qengine's state dict")
    if isinstance(q.scales, NestedScales) and q.scales.quantized.format.name != NESTED_FORMAT:
        raise ValueError(f"bitsandbytes' nested scales are {NESTED_FORMAT}, not {q.scales.quantized.format.name}")
    if name not in ("nf4", "fp4") or q.format != get_format(name):
        raise ValueError(f"only nf4 and fp4 have a bitsandbytes 4-bit layout, not {name!r}")
    if q.blocksize not in _BNB_BLOCKSIZES:
        raise ValueError(f"bitsandbytes supports block sizes {_BNB_BLOCKSIZES}, not {q.blocksize} (per-row?)")
    if q.layout != "dense" or q.mask is not None:
        raise ValueError("bitsandbytes has no 2:4 sparse layout or stored pruning mask; export the dense layout "
                         "(pruned nf4/fp4 weights are exact zeros there without a mask)")
    meta = {
        "quant_type": name,
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).replace("torch.", ""),
        "shape": list(q.shape),
    }
    sd = {
        prefix: q.packed.reshape(-1, 1),
        prefix + ".quant_map": torch.tensor(q.format.values, dtype=torch.float32, device=q.device),
    }
    if isinstance(q.scales, NestedScales):
        inner = q.scales.quantized
        sd[prefix + ".absmax"] = inner.packed
        sd[prefix + ".nested_absmax"] = inner.scales
        sd[prefix + ".nested_quant_map"] = torch.tensor(inner.format.values, dtype=torch.float32, device=q.device)
        meta.update({"nested_blocksize": inner.blocksize, "nested_dtype": "float32",
                     "nested_offset": q.scales.mean.item()})
    else:
        sd[prefix + ".absmax"] = q.scales
    data = json.dumps(meta).encode("utf-8")
    sd[f"{prefix}.quant_state.bitsandbytes__{name}"] = torch.tensor(list(data), dtype=torch.uint8)
    return sd


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
    """A QuantizedTensor from bitsandbytes `Linear4bit` state-dict entries (nf4/fp4, with or
    without double quant); every field is checked and a mismatch raises ValueError."""
    qs_keys = [k for k in sd if k.startswith(prefix + ".quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise ValueError(f"expected one '{prefix}.quant_state.bitsandbytes__<type>' entry, found {qs_keys}")
    try:
        meta = json.loads(bytes(sd[qs_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        quant_type = meta["quant_type"]
        blocksize = int(meta["blocksize"])
        dtype = _DTYPES[meta["dtype"]]
        shape = torch.Size(int(s) for s in meta["shape"])
        nested_bs = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{qs_keys[0]} is malformed: {e!r}") from None
    if quant_type not in ("nf4", "fp4") or not qs_keys[0].endswith(quant_type):
        raise ValueError(f"{qs_keys[0]}: unsupported or inconsistent quant_type {quant_type!r}")
    if blocksize not in _BNB_BLOCKSIZES:
        raise ValueError(f"{qs_keys[0]}: unsupported blocksize {blocksize}")
    if any(s < 0 for s in shape) or nested_bs < 1:
        raise ValueError(f"{qs_keys[0]}: invalid shape {list(shape)} or nested_blocksize {nested_bs}")
    fmt = get_format(quant_type)
    numel = math.prod(shape)
    nblocks = -(-numel // blocksize)

    packed = _tensor(sd, prefix)
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage: same bytes, another dtype
        packed = packed.reshape(-1).contiguous().view(torch.uint8)  # (reshape first: a 0-d tensor has no view)
    packed = packed.reshape(-1).contiguous()
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{prefix} holds {packed.numel()} bytes, expected {(numel + 1) // 2} for shape {list(shape)}")
    quant_map = _tensor(sd, prefix + ".quant_map", torch.float32)
    if tuple(quant_map.cpu().tolist()) != fmt.values:
        raise ValueError(f"{prefix}.quant_map is not bitsandbytes' {quant_type} table")

    absmax = _tensor(sd, prefix + ".absmax")
    # Nested when any sign of it is there, so a missing nested part is named as missing.
    if prefix + ".nested_absmax" in sd or "nested_offset" in meta:
        nested_fmt = get_format(NESTED_FORMAT)
        nested_map = _tensor(sd, prefix + ".nested_quant_map", torch.float32)
        if tuple(nested_map.cpu().tolist()) != nested_fmt.values:
            raise ValueError(f"{prefix}.nested_quant_map is not bitsandbytes' dynamic 8-bit map")
        if absmax.dtype != torch.uint8 or absmax.numel() != nblocks:
            raise ValueError(f"{prefix}.absmax must be uint8 [{nblocks}] when nested, got {absmax.dtype} "
                             f"[{absmax.numel()}]")
        nested_absmax = _tensor(sd, prefix + ".nested_absmax", torch.float32)
        if nested_absmax.numel() != -(-nblocks // nested_bs):
            raise ValueError(f"{prefix}.nested_absmax has {nested_absmax.numel()} values, expected "
                             f"{-(-nblocks // nested_bs)}")
        if not torch.isfinite(nested_absmax).all() or (nested_absmax < 0).any():
            raise ValueError(f"{prefix}.nested_absmax contains NaN, Inf or negative values")
        offset = meta.get("nested_offset")
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"{qs_keys[0]}: nested_offset must be a finite number, got {offset!r}")
        inner = QuantizedTensor(absmax.reshape(-1).contiguous(), nested_absmax.reshape(-1).contiguous(), None,
                                nested_fmt, torch.Size([nblocks]), torch.float32, nested_bs)
        mean = torch.tensor(float(offset), dtype=torch.float32, device=absmax.device)
        if not torch.isfinite(mean):
            raise ValueError(f"{qs_keys[0]}: nested_offset {offset!r} is outside the float32 range")
        scales = NestedScales(inner, mean)
    else:
        if absmax.dtype != torch.float32 or absmax.numel() != nblocks:
            raise ValueError(f"{prefix}.absmax must be float32 [{nblocks}], got {absmax.dtype} [{absmax.numel()}]")
        if not torch.isfinite(absmax).all() or (absmax < 0).any():
            raise ValueError(f"{prefix}.absmax contains NaN, Inf or negative values")
        scales = absmax.reshape(-1).contiguous()
    return QuantizedTensor(packed, scales, None, fmt, shape, dtype, blocksize)


def _tensor(sd: dict, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"bitsandbytes state dict is missing {key!r}")
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key} must be a tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{key} must be {dtype}, got {t.dtype}")
    return t
