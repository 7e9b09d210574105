"""Argument checks, written once. Every native call is preceded by these: a kernel must never
see a buffer it could read past, so sizes, dtypes, devices and contiguity are verified here
and a failure raises TypeError / ValueError naming the argument. Below the generic checks:
which devices this build serves, and the arguments of the ops (quantized weights, codebook
tables, nested scales, LoRA adapters) that every kernel in ops/cpu.py and ops/cuda.py runs."""

from __future__ import annotations

from typing import Optional

import torch

from . import _C

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


# The smallest block of a stored layout (NVFP4's, and GGUF Q6_K's 16-weight sub-blocks): a
# QuantLinear skeleton for a checkpoint may hold one; quantize() starts at MIN_BLOCKSIZE.
MIN_STORED_BLOCKSIZE = 16


def check_stored_blocksize(blocksize: object) -> int:
    """Blocksize of an existing quantized layout: a power of two in [16, 4096]."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int or None, got {type(blocksize).__name__}")
    if not (MIN_STORED_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE) or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from {MIN_STORED_BLOCKSIZE} to {MAX_BLOCKSIZE} (or None "
                         f"for per-row), got {blocksize}")
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


# --------------------------------------------------------------------------- the ops' arguments
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/include/qengine/status.h
SUPPORTED_DEVICES = ("cpu", "cuda") if _C.cuda_compiled else ("cpu",)
# Ends the device errors: `qengine doctor` says which devices this build and machine serve.
DOCTOR_HINT = "run `qengine doctor` to check every kernel on the CPU and GPUs of this machine"


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled and a GPU is visible."""
    return bool(_C.cuda_compiled) and _C.cuda.device_count() > 0 and torch.cuda.is_available()


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def packed_bytes(numel: int, bits: int) -> int:
    return -(-numel * bits // 8)


def positions_bytes(numel: int) -> int:
    """Bytes of packed 2-bit positions of a 2:4 weight with `numel` elements."""
    return -(-(numel // 2) // 4)


def unsupported_device_message(name: str, t: torch.Tensor, what: str = "qengine supports") -> str:
    """The error for a tensor on a device the kernels do not serve (a CUDA tensor where the CUDA
    kernels were not compiled, or meta, mps, ...)."""
    why = " (this qengine build has no CUDA kernels)" if t.device.type == "cuda" else ""
    return f"{name} is on {t.device}; {what} {', '.join(SUPPORTED_DEVICES)} tensors{why}; {DOCTOR_HINT}"


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type not in SUPPORTED_DEVICES:
        raise ValueError(unsupported_device_message(name, t))


def reject_device(name: str, t: torch.Tensor) -> None:
    """The body every op runs on a device without a registered kernel: a ValueError naming the
    argument, the devices served and `qengine doctor` (a wrong argument type is named first)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    raise ValueError(unsupported_device_message(name, t))


def check_tables(table: torch.Tensor, midpoints: Optional[torch.Tensor], order: Optional[torch.Tensor], bits: int,
                 device: torch.device) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    size = 2**bits
    for name, t, dt in (("table", table, torch.float32), ("midpoints", midpoints, torch.float32),
                        ("sorted_to_code", order, torch.uint8)):
        if t is None:
            continue
        check_dtype(name, t, dt)
        check_contiguous(name, t)
        check_numel(name, t, size)
        check_same_device(device, **{name: t})


def check_quantize_args(x, table, midpoints, order, grid_lut, bits, blocksize, rule) -> None:
    check_float("x", x)
    check_contiguous("x", x)
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if rule not in (0, 1):
        raise ValueError(f"rule must be 0 (absmax) or 1 (minmax), got {rule}")
    check_tables(table, midpoints, order, bits, x.device)
    if grid_lut is not None:
        check_dtype("grid_lut", grid_lut, torch.uint8)
        check_contiguous("grid_lut", grid_lut)
        check_numel("grid_lut", grid_lut, 65536)
        check_same_device(x.device, grid_lut=grid_lut)
        if bits != 8 or rule != 0:
            raise ValueError("grid_lut is only supported for 8-bit absmax formats")


def check_float_dtype(dtype: torch.dtype) -> None:
    """The dtype a dequantize kernel writes: float32, float16 or bfloat16."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel) -> None:
    check_dtype("packed", packed, torch.uint8)
    check_contiguous("packed", packed)
    if blocksize < 1 or numel < 0:
        raise ValueError(f"blocksize must be >= 1 and numel >= 0, got {blocksize}, {numel}")
    check_tables(table, None, None, bits, packed.device)
    check_numel("packed", packed, packed_bytes(numel, bits))
    nb = num_blocks(numel, blocksize)
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t is None:
            continue
        check_dtype(name, t, torch.float32)
        check_contiguous(name, t)
        check_numel(name, t, nb)
        check_same_device(packed.device, **{name: t})


def check_dequantize_out_args(packed, table, scales, offsets, bits, blocksize, numel, out) -> None:
    """The arguments of dequantize_blockwise_out: those of dequantize_blockwise, and out (float,
    contiguous, numel elements, on packed's device)."""
    check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel)
    check_float("out", out)
    check_contiguous("out", out)
    check_numel("out", out, numel)
    check_same_device(packed.device, out=out)


def _tensor_ok(t, dtype: torch.dtype, numel: int, device: torch.device) -> bool:
    return (isinstance(t, torch.Tensor) and t.dtype == dtype and t.is_contiguous() and t.numel() == numel
            and t.device == device)


def weight_ok(packed, table, scales, nested, offsets, bits, blocksize, numel) -> bool:
    """Whether check_weight passes, decided by plain comparisons in one pass: a matmul runs it
    once per call, where check_weight's ~30 named checks cost more than a small product itself
    (16 of 33 us of a batch-1 64x128 call). False sends the caller to check_weight, which
    raises the error naming the problem; every condition here is one of check_weight's."""
    if not (isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8 and packed.is_contiguous()
            and bits in (4, 8) and blocksize >= 1 and numel >= 0 and packed.numel() == packed_bytes(numel, bits)):
        return False
    device = packed.device
    nb = num_blocks(numel, blocksize)
    if not _tensor_ok(table, torch.float32, 2**bits, device):
        return False
    if offsets is not None and not _tensor_ok(offsets, torch.float32, nb, device):
        return False
    if not nested:
        return _tensor_ok(scales, torch.float32, nb, device)
    if len(nested) != 4:
        return False
    ntable, absmax, mean, nbs = nested
    if not (_tensor_ok(scales, torch.uint8, nb, device) and _tensor_ok(ntable, torch.float32, 256, device)
            and _tensor_ok(mean, torch.float32, 1, device)):
        return False
    nested_bs = int(nbs)
    return nested_bs >= 1 and _tensor_ok(absmax, torch.float32, num_blocks(nb, nested_bs), device)


def check_weight(packed, table, scales, nested, offsets, bits, blocksize, numel) -> None:
    """The quantized weight of matmul / matmul_t, with plain (nested None or []) or
    double-quantized scales."""
    if weight_ok(packed, table, scales, nested, offsets, bits, blocksize, numel):
        return
    if not nested:
        check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel)
    else:
        check_dequantize_args(packed, table, None, offsets, bits, blocksize, numel)
        check_nested(scales, nested, num_blocks(numel, blocksize), packed.device)


def check_nested(codes, nested, nblocks, device) -> None:
    """nested = [table float32 [256], absmax float32 [ceil(nblocks / nbs)], mean float32 [],
    nested_blocksize int64 []] for scales stored as uint8 codes [nblocks]."""
    if len(nested) != 4:
        raise ValueError("scales_nested must be [table, absmax, mean, blocksize]")
    table, absmax, mean, nbs = nested
    check_dtype("scales", codes, torch.uint8)
    check_contiguous("scales", codes)
    check_numel("scales", codes, nblocks)
    check_dtype("nested table", table, torch.float32)
    check_numel("nested table", table, 256)
    check_dtype("nested absmax", absmax, torch.float32)
    check_contiguous("nested absmax", absmax)
    nested_bs = int(nbs)
    if nested_bs < 1:
        raise ValueError(f"nested blocksize must be >= 1, got {nested_bs}")
    check_numel("nested absmax", absmax, num_blocks(nblocks, nested_bs))
    check_dtype("nested mean", mean, torch.float32)
    check_numel("nested mean", mean, 1)
    check_contiguous("nested table", table)  # the CUDA kernels read it (and the mean) by address
    check_same_device(device, scales=codes, nested_table=table, nested_absmax=absmax, nested_mean=mean)


def check_sparse_weight(packed, positions, table, scales, nested, offsets, bits, blocksize, numel) -> None:
    """A 2:4 weight of numel elements: the numel / 2 kept values quantized as a dense tensor,
    plus positions uint8 [positions_bytes(numel)]."""
    if numel % 4:
        raise ValueError(f"a 2:4 weight needs a multiple of 4 elements, got {numel}")
    check_weight(packed, table, scales, nested, offsets, bits, blocksize, numel // 2)
    check_dtype("positions", positions, torch.uint8)
    check_contiguous("positions", positions)
    check_numel("positions", positions, positions_bytes(numel))
    check_same_device(packed.device, positions=positions)


def check_matmul_x(x, out_features: int) -> None:
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if out_features < 0:
        raise ValueError(f"out_features must be >= 0, got {out_features}")


def check_lora(a, b, k, n, device) -> None:
    if (a is None) != (b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if a is None:
        return
    for name, t in (("lora_a", a), ("lora_b", b)):
        check_float(name, t)
        check_same_device(device, **{name: t})
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape[0] != n or a.shape[0] != b.shape[1]:
        raise ValueError(f"LoRA shapes must be A [r, {k}] and B [{n}, r], got {tuple(a.shape)} and {tuple(b.shape)}")


def check_matmul_args(x, packed, table, scales, nested, offsets, bits, blocksize, out_features, lora_a, lora_b,
                      positions=None) -> tuple[int, int]:
    """The arguments of matmul, or of sparse24_matmul when positions (the 2:4 weight's) is given;
    returns (K, N) of the weight [N, K]."""
    check_matmul_x(x, out_features)
    k, n = x.shape[-1], out_features
    if positions is None:
        check_weight(packed, table, scales, nested, offsets, bits, blocksize, n * k)
    else:
        if k % 4:
            raise ValueError(f"a 2:4 weight needs in_features divisible by 4, got {k}")
        check_sparse_weight(packed, positions, table, scales, nested, offsets, bits, blocksize, n * k)
    check_same_device(x.device, packed=packed)
    check_lora(lora_a, lora_b, k, n, x.device)
    return k, n


def check_matmul_t_args(g, packed, table, scales, nested, offsets, bits, blocksize, in_features,
                        positions=None) -> tuple[int, int]:
    """The arguments of matmul_t, or of sparse24_matmul_t when positions (the 2:4 weight's) is
    given; returns (N, K) of the weight [N, K]."""
    check_float("g", g)
    n, k = g.shape[-1], in_features
    if positions is None:
        check_weight(packed, table, scales, nested, offsets, bits, blocksize, n * k)
    else:
        check_sparse_weight(packed, positions, table, scales, nested, offsets, bits, blocksize, n * k)
    check_same_device(g.device, packed=packed)
    return n, k
