"""Argument checks, written once. Every native call is preceded by these: a kernel must never
see a buffer it could read past, so sizes, dtypes, devices and contiguity are verified here
and a failure raises TypeError / ValueError naming the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    check_tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())}); call .contiguous() first")


def check_numel(name: str, t: torch.Tensor, numel: int) -> None:
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")


def check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the data is on {device}; move them to one device")


def check_blocksize(blocksize: object) -> int:
    """Blocksize for quantize(): a power of two in [32, 4096] (None, per row, is resolved by the caller)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int or None, got {type(blocksize).__name__}")
    if not (MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE) or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from {MIN_BLOCKSIZE} to {MAX_BLOCKSIZE} (or None for per-row), got {blocksize}")
    return blocksize


def check_positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def check_codebook_fit(weight: object, bits: object, rule: object, iters: object) -> None:
    """The arguments of a codebook fit (qengine.fit_codebook, calibrate.fit_codebook)."""
    check_float("weight", weight)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if rule not in ("absmax", "minmax"):
        raise ValueError(f"rule must be 'absmax' or 'minmax', got {rule!r}")
    check_positive_int("iters", iters)
    if weight.numel() == 0:
        raise ValueError("cannot fit a codebook to an empty tensor")
