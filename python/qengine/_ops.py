"""The torch.library ops of qengine: schemas, fake (meta) implementations and the per-device
kernels that call qengine._C. Device names appear here and nowhere else.

Ops (all take the kernel tables from formats.Format.kernel_tables):
  qengine::quantize_blockwise(x, table, midpoints, sorted_to_code, grid_lut?, bits, blocksize, rule, identity_order)
      -> (packed uint8 [ceil(n*bits/8)], scales float32 [nblocks], offsets float32 [nblocks or 0])
  qengine::dequantize_blockwise(packed, table, scales, offsets?, bits, blocksize, numel, dtype) -> flat [numel]
  qengine::dequantize_blockwise_out(..., out) -> None   (writes into out)
"""

from __future__ import annotations

from typing import Optional

import torch

from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from . import _C
from ._checks import FLOAT_DTYPES, check_contiguous, check_dtype, check_float, check_numel, check_same_device

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_SUPPORTED_DEVICES = ("cpu", "cuda") if _C.cuda_compiled else ("cpu",)


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled and a GPU is visible."""
    return bool(_C.cuda_compiled) and _C.cuda.device_count() > 0 and torch.cuda.is_available()


def _cuda_stream(device: torch.device) -> int:
    """The handle of torch's current stream on `device`: every CUDA launch goes there."""
    return torch.cuda.current_stream(device).cuda_stream


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def _packed_bytes(numel: int, bits: int) -> int:
    return -(-numel * bits // 8)


# Ends the device errors: `qengine doctor` says which devices this build and machine serve.
DOCTOR_HINT = "run `qengine doctor` to check every kernel on the CPU and GPUs of this machine"


def unsupported_device_message(name: str, t: torch.Tensor, what: str = "qengine supports") -> str:
    """The error for a tensor on a device the kernels do not serve (a CUDA tensor where the CUDA
    kernels were not compiled, or meta, mps, ...)."""
    why = " (this qengine build has no CUDA kernels)" if t.device.type == "cuda" else ""
    return f"{name} is on {t.device}; {what} {', '.join(_SUPPORTED_DEVICES)} tensors{why}; {DOCTOR_HINT}"


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type not in _SUPPORTED_DEVICES:
        raise ValueError(unsupported_device_message(name, t))


def _check_tables(table: torch.Tensor, midpoints: Optional[torch.Tensor], order: Optional[torch.Tensor], bits: int,
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


def _check_quantize_args(x, table, midpoints, order, bits, blocksize, rule):
    check_float("x", x)
    check_device("x", x)
    check_contiguous("x", x)
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if rule not in (0, 1):
        raise ValueError(f"rule must be 0 (absmax) or 1 (minmax), got {rule}")
    _check_tables(table, midpoints, order, bits, x.device)


def check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel):
    check_dtype("packed", packed, torch.uint8)
    check_device("packed", packed)
    check_contiguous("packed", packed)
    if blocksize < 1 or numel < 0:
        raise ValueError(f"blocksize must be >= 1 and numel >= 0, got {blocksize}, {numel}")
    _check_tables(table, None, None, bits, packed.device)
    check_numel("packed", packed, _packed_bytes(numel, bits))
    nb = num_blocks(numel, blocksize)
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t is None:
            continue
        check_dtype(name, t, torch.float32)
        check_contiguous(name, t)
        check_numel(name, t, nb)
        check_same_device(packed.device, **{name: t})


# --------------------------------------------------------------------------- quantize
@torch.library.custom_op("qengine::quantize_blockwise", mutates_args=())
def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, midpoints: torch.Tensor, sorted_to_code: torch.Tensor,
                       grid_lut: Optional[torch.Tensor], bits: int, blocksize: int, rule: int, identity_order: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_quantize_args(x, table, midpoints, sorted_to_code, bits, blocksize, rule)
    if grid_lut is not None:
        check_dtype("grid_lut", grid_lut, torch.uint8)
        check_contiguous("grid_lut", grid_lut)
        check_numel("grid_lut", grid_lut, 65536)
        check_same_device(x.device, grid_lut=grid_lut)
        if bits != 8 or rule != 0:
            raise ValueError("grid_lut is only supported for 8-bit absmax formats")
    n = x.numel()
    nb = num_blocks(n, blocksize)
    packed = torch.empty(_packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    scales = torch.empty(nb, dtype=torch.float32, device=x.device)
    offsets = torch.empty(nb if rule == 1 else 0, dtype=torch.float32, device=x.device)
    if x.device.type == "cuda":
        # The CUDA kernels produce the CPU's bytes; `flags` is their error word (NaN, overflow),
        # read back once the stream has run them (quantization waits for its status).
        if n:
            flags = torch.empty(1, dtype=torch.int32, device=x.device)
            with torch.cuda.device(x.device):
                _C.cuda.quantize(x.data_ptr(), DTYPE_CODES[x.dtype], n, blocksize, table.data_ptr(),
                                 midpoints.data_ptr(), sorted_to_code.data_ptr(), bits, identity_order,
                                 grid_lut.data_ptr() if grid_lut is not None else 0, rule, packed.data_ptr(),
                                 scales.data_ptr(), offsets.data_ptr() if rule == 1 else 0, flags.data_ptr(),
                                 _cuda_stream(x.device))
        return packed, scales, offsets
    if n:
        _C.quantize_cpu(x.data_ptr(), DTYPE_CODES[x.dtype], n, blocksize, table.data_ptr(), midpoints.data_ptr(),
                        sorted_to_code.data_ptr(), bits, identity_order,
                        grid_lut.data_ptr() if grid_lut is not None else 0, rule, packed.data_ptr(), scales.data_ptr(),
                        offsets.data_ptr() if rule == 1 else 0)
    return packed, scales, offsets


@quantize_blockwise.register_fake
def _(x, table, midpoints, sorted_to_code, grid_lut, bits, blocksize, rule, identity_order):
    n = x.numel()
    nb = num_blocks(n, blocksize)
    return (x.new_empty(_packed_bytes(n, bits), dtype=torch.uint8), x.new_empty(nb, dtype=torch.float32),
            x.new_empty(nb if rule == 1 else 0, dtype=torch.float32))


# --------------------------------------------------------------------------- dequantize
def _dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out, stream=False):
    """Decodes into out. stream=True (callers' buffers) lets large outputs bypass the cache; a
    buffer allocated just now is written through the cache, where its zeroed pages still are."""
    if numel == 0:
        return
    code = DTYPE_CODES[out.dtype]
    off = offsets.data_ptr() if offsets is not None else 0
    if packed.device.type == "cuda":
        stream = torch.cuda.current_stream(packed.device).cuda_stream
        with torch.cuda.device(packed.device):  # launches go to the current device
            _C.cuda.dequantize(packed.data_ptr(), numel, blocksize, table.data_ptr(), bits,
                               1 if offsets is not None else 0, scales.data_ptr(), off, out.data_ptr(), code, stream)
    else:
        _C.dequantize_cpu(packed.data_ptr(), numel, blocksize, table.data_ptr(), bits,
                          1 if offsets is not None else 0, scales.data_ptr(), off, out.data_ptr(), code, stream)


@torch.library.custom_op("qengine::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                         offsets: Optional[torch.Tensor], bits: int, blocksize: int, numel: int,
                         dtype: torch.dtype) -> torch.Tensor:
    check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    _dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out)
    return out


@dequantize_blockwise.register_fake
def _(packed, table, scales, offsets, bits, blocksize, numel, dtype):
    return packed.new_empty(numel, dtype=dtype)


@torch.library.custom_op("qengine::dequantize_blockwise_out", mutates_args=("out",))
def dequantize_blockwise_out(packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                             offsets: Optional[torch.Tensor], bits: int, blocksize: int, numel: int,
                             out: torch.Tensor) -> None:
    check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel)
    check_float("out", out)
    check_contiguous("out", out)
    check_numel("out", out, numel)
    check_same_device(packed.device, out=out)
    _dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out, stream=True)


@dequantize_blockwise_out.register_fake
def _(packed, table, scales, offsets, bits, blocksize, numel, out):
    return None


# --------------------------------------------------------------------------- k-means
def kmeans_accumulate(x: torch.Tensor, blocksize: int, table: torch.Tensor, midpoints: torch.Tensor, bits: int,
                      rule: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One weighted Lloyd step over the block-normalised values of x (CPU): per-code weighted
    sums, weight totals (weights = block scale^2) and the weighted squared error."""
    check_float("x", x)
    check_contiguous("x", x)
    if x.device.type != "cpu":
        raise ValueError(f"k-means fitting runs on the CPU; x is on {x.device}")
    _check_tables(table, midpoints, None, bits, x.device)
    sums = torch.zeros(2**bits, dtype=torch.float64)
    counts = torch.zeros(2**bits, dtype=torch.float64)
    sse = _C.kmeans_accumulate_cpu(x.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), blocksize, table.data_ptr(),
                                   midpoints.data_ptr(), bits, rule, sums.data_ptr(), counts.data_ptr())
    return sums, counts, sse


# --------------------------------------------------------------------------- matmul
# Up to this many rows of x use the fused small-batch kernel (decode in registers, each packed
# byte read once); more rows dequantize the layer once into x's dtype and use a dense GEMM.
SMALL_BATCH_ROWS = 16


def _check_matmul_args(x, packed, table, scales, offsets, bits, blocksize, out_features, nested):
    check_float("x", x)
    check_device("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    in_features = x.shape[-1]
    if out_features < 0:
        raise ValueError(f"out_features must be >= 0, got {out_features}")
    check_weight(packed, table, scales, nested, offsets, bits, blocksize, out_features * in_features)
    check_same_device(x.device, packed=packed)


def check_weight(packed, table, scales, nested, offsets, bits, blocksize, numel):
    """The quantized weight of matmul / matmul_t, with plain or double-quantized scales."""
    if nested is None:
        check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel)
    else:
        check_dequantize_args(packed, table, None, offsets, bits, blocksize, numel)
        check_nested(scales, nested, num_blocks(numel, blocksize), packed.device)


def check_nested(codes, nested, nblocks, device):
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


def dense_scales(scales, nested):
    """Float32 per-block scales from the (possibly double-quantized) argument pair."""
    if nested is None:
        return scales
    table, absmax, mean, nbs = nested
    out = torch.empty(scales.numel(), dtype=torch.float32, device=scales.device)
    _dequantize_into(scales, table, absmax, None, 8, int(nbs), scales.numel(), out)
    return out + mean.reshape(())


def weight_args(packed, blocksize, table, bits, scales, nested, offsets):
    """The quantized weight as _C.matmul_cpu / matmul_t_cpu take it: packed ptr, blocksize,
    table ptr, bits, rule, scales ptr, nested table ptr, nested absmax ptr, nested blocksize,
    mean, offsets ptr."""
    rule = 1 if offsets is not None else 0
    offsets_ptr = offsets.data_ptr() if offsets is not None else 0
    if nested is None:
        scale_args = (scales.data_ptr(), 0, 0, 1, 0.0)
    else:
        ntable, absmax, mean, nbs = nested
        scale_args = (scales.data_ptr(), ntable.data_ptr(), absmax.data_ptr(), int(nbs), float(mean))
    return (packed.data_ptr(), blocksize, table.data_ptr(), bits, rule, *scale_args, offsets_ptr)


def _cuda_weight_args(packed, blocksize, table, bits, scales, nested, offsets):
    """As weight_args for _C.cuda.matmul / matmul_t, with the nested mean passed by device
    address (read in the kernel: no host synchronisation)."""
    rule = 1 if offsets is not None else 0
    offsets_ptr = offsets.data_ptr() if offsets is not None else 0
    if nested is None:
        scale_args = (scales.data_ptr(), 0, 0, 1, 0)
    else:
        ntable, absmax, mean, nbs = nested
        scale_args = (scales.data_ptr(), ntable.data_ptr(), absmax.data_ptr(), int(nbs), mean.data_ptr())
    return (packed.data_ptr(), blocksize, table.data_ptr(), bits, rule, *scale_args, offsets_ptr)


def _matmul_cuda_small(x2, packed, table, scales, nested, offsets, bits, blocksize, n, lora_a, lora_b, lora_scale):
    """The fused CUDA GEMV for x2 [m <= SMALL_BATCH_ROWS, K]: float32 [m, n]. The LoRA side path
    is added by torch in float32 (an epilogue on the float32 output, before the caller rounds
    to x's dtype, as on the CPU); its two thin products are not worth a kernel of their own."""
    m, k = x2.shape
    xf = x2.to(torch.float32).contiguous()
    y = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    if m and n:
        with torch.cuda.device(x2.device):
            _C.cuda.matmul(xf.data_ptr(), m, k, k, n, *_cuda_weight_args(packed, blocksize, table, bits, scales, nested,
                                                                         offsets),
                           y.data_ptr(), _cuda_stream(x2.device))
        if lora_a is not None:
            side = (xf @ lora_a.to(torch.float32).t()) @ lora_b.to(torch.float32).t()
            y.add_(side, alpha=float(lora_scale))
    return y


def _matmul_t_cuda_small(g2, packed, table, scales, nested, offsets, bits, blocksize, k):
    """The fused CUDA transposed product for g2 [m <= SMALL_BATCH_ROWS, N]: float32 [m, k]. The
    kernel sums row splits of W in a fixed order through a scratch buffer allocated here."""
    m, n = g2.shape
    gf = g2.to(torch.float32).contiguous()
    gx = torch.empty(m, k, dtype=torch.float32, device=g2.device)
    if m and k:
        ws = torch.empty(_C.cuda.matmul_t_workspace(m, n, k), dtype=torch.float32, device=g2.device)
        with torch.cuda.device(g2.device):
            _C.cuda.matmul_t(gf.data_ptr(), m, n, k,
                             *_cuda_weight_args(packed, blocksize, table, bits, scales, nested, offsets),
                             ws.data_ptr(), ws.numel(), gx.data_ptr(), _cuda_stream(g2.device))
    return gx


# The large-batch CPU product dequantizes this many bytes of W at a time into one buffer, which
# stays in the last-level cache between its decode and its GEMM (measured on 11008x4096, batch
# 512: 124 ms against 130 ms for the whole layer at once, and 16 MiB of scratch instead of 86).
DENSE_TILE_BYTES = 16 << 20


def _tiled_product_cpu(x2, packed, table, scales, offsets, bits, blocksize, n):
    """x2 [M, K] @ W^T for the quantized W [N, K], W dequantized into x2's dtype a tile of rows
    at a time; each tile's output columns come from one GEMM over all of K."""
    m, k = x2.shape
    y = torch.empty(m, n, dtype=x2.dtype)
    rows = max(1, min(n, DENSE_TILE_BYTES // max(1, k * x2.element_size())))
    tile = torch.empty(rows, k, dtype=x2.dtype)
    rule = 1 if offsets is not None else 0
    off = offsets.data_ptr() if offsets is not None else 0
    for first in range(0, n, rows):
        w = tile[: min(rows, n - first)]
        if k:
            _C.dequantize_range_cpu(packed.data_ptr(), first * k, w.numel(), blocksize, table.data_ptr(), bits, rule,
                                    scales.data_ptr(), off, w.data_ptr(), DTYPE_CODES[x2.dtype])
        y[:, first:first + w.shape[0]] = x2 @ w.t()
    return y


def dense_weight(packed, table, scales, offsets, bits, blocksize, n, k, dtype):
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    _dequantize_into(packed, table, scales, offsets, bits, blocksize, n * k, w)
    return w


@torch.library.custom_op("qengine::matmul", mutates_args=())
def matmul(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
           scales_nested: list[torch.Tensor], offsets: Optional[torch.Tensor], bits: int, blocksize: int,
           out_features: int, lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor],
           lora_scale: float) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T (+ lora_scale * (x @ A^T) @ B^T) for the quantized W [N, K];
    float32 accumulation, x's dtype out.

    scales: float32 [nblocks] with scales_nested = [], or uint8 codes [nblocks] with
    scales_nested = [table, absmax, mean, nested_blocksize] when double-quantized (decoded
    inside the kernel). lora_a [r, K], lora_b [N, r]: both or neither."""
    return _matmul_impl(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a,
                        lora_b, lora_scale)


def call_matmul(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b,
                lora_scale) -> torch.Tensor:
    """torch.ops.qengine.matmul, or its implementation called directly where the dispatcher has
    nothing to add: a plain CPU tensor, no gradient to record, no tracing, no dispatch mode. The
    dispatcher's custom-op layers cost ~30 us a call, 3 % of a 4096x11008 decode step."""
    if (type(x) is torch.Tensor and x.device.type == "cpu" and not _needs_dispatcher(x, lora_a, lora_b)):
        return _matmul_impl(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a,
                            lora_b, lora_scale)
    return torch.ops.qengine.matmul(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features,
                                    lora_a, lora_b, lora_scale)


def _needs_dispatcher(x, *params) -> bool:
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return True
    return (torch.compiler.is_compiling() or _current_dispatch_mode() is not None
            or torch._C._functorch.is_functorch_wrapped_tensor(x))


def _matmul_impl(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b,
                 lora_scale):
    scales_nested = scales_nested or None
    _check_matmul_args(x, packed, table, scales, offsets, bits, blocksize, out_features, scales_nested)
    k, n = x.shape[-1], out_features
    check_lora(lora_a, lora_b, k, n, x.device)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x.device.type == "cpu" and m <= SMALL_BATCH_ROWS:
        xc = x2.contiguous()
        y = torch.empty(m, n, dtype=torch.float32)
        if m and n:
            _C.matmul_cpu(xc.data_ptr(), DTYPE_CODES[xc.dtype], m, k, k, n,
                          *weight_args(packed, blocksize, table, bits, scales, scales_nested, offsets), y.data_ptr())
        y = cpu_small_batch_epilogue(xc, y, lora_a, lora_b, lora_scale)
    elif x.device.type == "cuda" and m <= SMALL_BATCH_ROWS:
        y = _matmul_cuda_small(x2, packed, table, scales, scales_nested, offsets, bits, blocksize, n, lora_a, lora_b,
                               lora_scale).to(x.dtype)
    else:
        flat_scales = dense_scales(scales, scales_nested)
        if x.device.type == "cpu":
            y = _tiled_product_cpu(x2, packed, table, flat_scales, offsets, bits, blocksize, n)
        else:
            w = dense_weight(packed, table, flat_scales, offsets, bits, blocksize, n, k, x.dtype)
            y = x2 @ w.t()
            del w  # the dense copy lives only for this product
        if lora_a is not None:
            side = (x2.to(torch.float32) @ lora_a.to(torch.float32).t()) @ lora_b.to(torch.float32).t()
            y = y + (lora_scale * side).to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def cpu_small_batch_epilogue(xc, y, lora_a, lora_b, lora_scale):
    """After a small-batch CPU kernel wrote y (float32 [M, N]) for x (xc, contiguous [M, K]):
    adds the LoRA side path into the same float32 output, then rounds once to x's dtype. Both
    natively: torch ops of this size would start OpenMP workers that keep spinning beside the
    next kernel call on a small machine (measured: batch-8 GEMV 13.8 -> 7.1 ms on 2 vCPUs)."""
    m, k = xc.shape
    n = y.shape[1]
    if lora_a is not None and m and n:
        af = lora_a.contiguous()
        bf = lora_b.to(af.dtype).contiguous()
        _C.lora_epilogue_cpu(xc.data_ptr(), DTYPE_CODES[xc.dtype], m, k, af.data_ptr(), bf.data_ptr(),
                             DTYPE_CODES[af.dtype], af.shape[0], n, float(lora_scale), y.data_ptr())
    if xc.dtype == torch.float32:
        return y
    out = torch.empty(m, n, dtype=xc.dtype)
    if m and n:
        _C.cast_float_cpu(y.data_ptr(), m * n, out.data_ptr(), DTYPE_CODES[xc.dtype])
    return out


def check_lora(a, b, k, n, device):
    if (a is None) != (b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if a is None:
        return
    for name, t in (("lora_a", a), ("lora_b", b)):
        check_float(name, t)
        check_same_device(device, **{name: t})
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape[0] != n or a.shape[0] != b.shape[1]:
        raise ValueError(f"LoRA shapes must be A [r, {k}] and B [{n}, r], got {tuple(a.shape)} and {tuple(b.shape)}")


@matmul.register_fake
def _(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b, lora_scale):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("qengine::matmul_t", mutates_args=())
def matmul_t(g: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
             scales_nested: list[torch.Tensor], offsets: Optional[torch.Tensor], bits: int, blocksize: int,
             in_features: int) -> torch.Tensor:
    """gx[..., K] = g[..., N] @ W for the quantized W [N, K] (the backward of matmul for x)."""
    scales_nested = scales_nested or None
    check_float("g", g)
    check_device("g", g)
    n, k = g.shape[-1], in_features
    check_weight(packed, table, scales, scales_nested, offsets, bits, blocksize, n * k)
    check_same_device(g.device, packed=packed)
    g2 = g.reshape(-1, n)
    m = g2.shape[0]
    if g.device.type == "cpu" and m <= SMALL_BATCH_ROWS:
        gf = g2.to(torch.float32).contiguous()
        gx = torch.empty(m, k, dtype=torch.float32)
        if m and k:
            _C.matmul_t_cpu(gf.data_ptr(), m, n, k,
                            *weight_args(packed, blocksize, table, bits, scales, scales_nested, offsets),
                            gx.data_ptr())
        gx = gx.to(g.dtype)
    elif g.device.type == "cuda" and m <= SMALL_BATCH_ROWS:
        gx = _matmul_t_cuda_small(g2, packed, table, scales, scales_nested, offsets, bits, blocksize, k).to(g.dtype)
    else:
        w = dense_weight(packed, table, dense_scales(scales, scales_nested), offsets, bits, blocksize, n, k, g.dtype)
        gx = g2 @ w
        del w
    return gx.reshape(*g.shape[:-1], k)


@matmul_t.register_fake
def _(g, packed, table, scales, scales_nested, offsets, bits, blocksize, in_features):
    return g.new_empty(*g.shape[:-1], in_features)


def _matmul_setup_context(ctx, inputs, output):
    x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b, s = inputs
    nested = list(scales_nested)
    lora = lora_a is not None
    ctx.save_for_backward(x if lora else None, lora_a, lora_b, packed, table, scales, offsets, *nested)
    ctx.meta = (bits, blocksize, x.shape[-1], s)


def _matmul_backward(ctx, grad):
    x, lora_a, lora_b, packed, table, scales, offsets, *nested = ctx.saved_tensors
    bits, blocksize, in_features, s = ctx.meta
    gx = ga = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qengine.matmul_t(grad, packed, table, scales, nested, offsets, bits, blocksize, in_features)
    if lora_a is not None:
        g2 = grad.reshape(-1, grad.shape[-1]).to(torch.float32)
        x2 = x.reshape(-1, in_features).to(torch.float32)
        a32, b32 = lora_a.to(torch.float32), lora_b.to(torch.float32)
        gb_t = g2 @ b32  # [M, r]
        if ctx.needs_input_grad[0]:
            gx = gx + (s * (gb_t @ a32)).reshape(gx.shape).to(gx.dtype)
        if ctx.needs_input_grad[9]:
            ga = (s * (gb_t.t() @ x2)).to(lora_a.dtype)
        if ctx.needs_input_grad[10]:
            gb = (s * (g2.t() @ (x2 @ a32.t()))).to(lora_b.dtype)
    return gx, None, None, None, [None] * len(nested), None, None, None, None, ga, gb, None


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)
