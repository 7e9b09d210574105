"""Reading and writing the flat state dict of a QuantizedTensor (tensor.py), helpers that need
no QuantizedTensor class: the JSON metadata tensor, checked tensor lookups, the format a
stored codebook names, and the check that packed codes stay inside a short codebook."""

from __future__ import annotations

import json
from typing import Optional

import torch

from .formats import Format, codebook, get_format

from . import _layouts

STATE_VERSION = 1
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
LAYOUTS = ("dense", "2:4")


def json_tensor(obj: dict, device) -> torch.Tensor:
    data = json.dumps(obj, sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def read_meta(sd: dict, prefix: str) -> dict:
    t = get_tensor(sd, prefix + "quant_meta", torch.uint8)
    try:
        meta = json.loads(bytes(t.cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{prefix}quant_meta is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("version") != STATE_VERSION or not isinstance(meta.get("format"), dict):
        raise ValueError(f"{prefix}quant_meta has an unsupported version or layout: {meta!r}")
    return meta


def get_tensor(sd: dict, key: str, dtype: torch.dtype, numel: Optional[int] = None) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"state dict is missing {key!r}")
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{key} must be {dtype}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{key} must have {numel} elements, got {t.numel()}")
    return t.reshape(-1).contiguous() if t.dim() != 0 else t


def resolve_format(name: str, bits: int, rule: str, values: torch.Tensor, prefix: str) -> Format:
    vals = tuple(float(v) for v in values.cpu())
    try:
        fmt = get_format(name)
    except ValueError:
        fmt = None
    if fmt is not None and fmt.bits == bits and fmt.rule == rule and fmt.values == vals:
        return fmt
    if fmt is not None and name != "codebook":
        raise ValueError(f"{prefix}codebook does not match the built-in format {name!r} (corrupt state dict?)")
    try:
        return codebook(vals, rule=rule, bits=bits, name=name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{prefix}codebook is invalid: {e}") from None


def check_codes(packed: torch.Tensor, fmt: Format, stored: int, prefix: str) -> None:
    """Codes past the end of a short codebook (e.g. int4 has 15 values) mean corrupt data."""
    ncodes = len(fmt.values)
    if ncodes == 2**fmt.bits or stored == 0:
        return
    p = packed
    if fmt.bits == 4:
        hi, lo = p >> 4, p & 0x0F
        bad = bool((hi >= ncodes).any()) or bool((lo[: stored // 2] >= ncodes).any())
        if stored % 2 == 0:
            bad = bad or bool((lo >= ncodes).any())
    else:
        bad = bool((p >= ncodes).any())
    if bad:
        raise ValueError(f"{prefix}packed contains codes past the {ncodes}-entry codebook (corrupt data)")


def parse_meta(sd: dict, prefix: str) -> tuple:
    """(meta, shape, dtype, blocksize, format, layout) from {prefix}quant_meta and {prefix}codebook,
    each checked (ValueError naming the key)."""
    meta = read_meta(sd, prefix)
    fmt_info = meta["format"]
    try:
        shape = torch.Size(int(s) for s in meta["shape"])
        dtype = DTYPES_BY_NAME[meta["dtype"]]
        blocksize = int(meta["blocksize"])
        bits = int(fmt_info["bits"])
        rule = fmt_info["rule"]
        name = fmt_info["name"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{prefix}quant_meta is malformed: {e!r}") from None
    if any(s < 0 for s in shape) or blocksize < 1:
        raise ValueError(f"{prefix}quant_meta has an invalid shape {list(shape)} or blocksize {blocksize}")
    values = get_tensor(sd, prefix + "codebook", torch.float32)
    fmt = resolve_format(name, bits, rule, values, prefix)
    layout = meta.get("layout", "dense")
    if layout not in LAYOUTS:
        raise ValueError(f"{prefix}quant_meta has an unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    return meta, shape, dtype, blocksize, fmt, layout


def read_positions(sd: dict, prefix: str, shape: torch.Size) -> torch.Tensor:
    """The checked {prefix}positions of a 2:4 tensor of `shape` (uint8 [ceil(numel / 8)])."""
    if len(shape) == 0 or shape[-1] % 4:
        raise ValueError(f"{prefix}quant_meta: a 2:4 tensor needs a last dimension divisible by 4, "
                         f"got shape {list(shape)}")
    numel = 1
    for s in shape:
        numel *= s
    stored = numel // 2
    positions = get_tensor(sd, prefix + "positions", torch.uint8, -(-stored // 4))
    pos = _layouts.unpack_positions(positions, stored).reshape(-1, 2)
    if stored and not bool((pos[:, 0] < pos[:, 1]).all()):
        raise ValueError(f"{prefix}positions are corrupt: the 2 kept positions of a group must be "
                         "distinct and increasing")
    return positions
