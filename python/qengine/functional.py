"""Quantize, dequantize and fit codebooks on tensors: the functional API."""

from __future__ import annotations

from typing import Optional

import torch

from . import _layouts
from .ops import kmeans_accumulate
from ._checks import (check_blocksize, check_codebook_fit, check_contiguous, check_float, check_same_device,
                      check_tensor)
from ._fit import quantile_init, resolve_blocksize, strictly_increasing
from .formats import Format, codebook, get_format
from .microscaling import quantize_microscaling
from .tensor import NestedScales, QuantizedTensor

__all__ = ["quantize", "dequantize", "fit_codebook", "matmul"]




def quantize(x: torch.Tensor, format: str | Format = "nf4", blocksize: Optional[int] = 64,
             double_quant: bool = False, sparsity: Optional[str] = None,
             mask: Optional[torch.Tensor] = None) -> QuantizedTensor:
    """Blockwise quantization of a float tensor.

    Args:
        x: float32, float16 or bfloat16, any shape, contiguous, finite (NaN or Inf raises
            ValueError: a non-finite weight has no faithful 4-bit code); not modified.
        format: a registered name (``nf4``, ``fp4``, ``int4``, ``int8``, ``uint4``, ``uint8``)
            or a Format from ``qengine.codebook(...)`` / ``qengine.fit_codebook(...)``.
        blocksize: elements per block, a power of two from 32 to 4096 over the flattened
            tensor; ``None`` quantizes per row (one block per row of the last dimension).
        double_quant: also quantize the per-block float32 scales (and offsets) to 8 bits,
            blockwise (256), after subtracting their mean, as QLoRA does.
        sparsity: None (dense layout) or ``"2:4"``: of every group of 4 consecutive elements
            along the last dimension (which must be divisible by 4) only 2 are stored, the 2
            largest in magnitude (or the mask's); the kept values (numel / 2) are quantized in
            `format` and `blocksize` counts *stored* values (``None``: per row = last dim / 2),
            plus 2 bits of position each: NF4, block 64, double quant costs ~3.07 bits/param.
            Pruned elements decode to exactly 0.0.
        mask: None or a bool tensor of x's shape (True = kept, e.g. from ``qengine.prune``):
            elements where it is False are pruned and decode to exactly 0.0 in every format.
            Formats with an exact zero (absmax scaling with 0.0 in the table: nf4, fp4, int4,
            int8, codebooks containing 0) need nothing more; for the others (uint4, uint8,
            codebooks without 0) the mask is stored packed (1 bit per element) and applied
            on dequantization, and qengine.matmul then runs on the dequantized weight. With
            ``sparsity="2:4"`` the mask keeps at most 2 of each group of 4.
    """
    check_tensor("x", x)
    check_float("x", x)
    check_contiguous("x", x)
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(x.shape)})")
    fmt = get_format(format)
    if fmt.scale_format:
        return _quantize_microscaling(x, fmt, blocksize, double_quant, sparsity, mask)
    bs, per_row = resolve_blocksize(x, blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if sparsity not in (None, "2:4"):
        raise ValueError(f"sparsity must be None (dense) or '2:4', got {sparsity!r}")
    if mask is not None:
        mask = _check_mask(mask, x)
    if sparsity == "2:4":
        q = _quantize_24(x.detach(), fmt, blocksize, mask)
    else:
        xm = x.detach() if mask is None else torch.where(mask, x.detach(), torch.zeros((), dtype=x.dtype,
                                                                                           device=x.device))
        q = QuantizedTensor._quantize_flat(xm, fmt, bs)
        q.per_row = per_row
        if mask is not None and not _layouts.has_exact_zero(fmt) and not bool(mask.all()):
            q.mask = _layouts.pack_mask(mask)
    if double_quant:
        q.scales = NestedScales.from_values(q.scales)
        if q.offsets is not None:
            q.offsets = NestedScales.from_values(q.offsets)
    return q


def _quantize_microscaling(x: torch.Tensor, fmt: Format, blocksize, double_quant, sparsity, mask) -> QuantizedTensor:
    """mxfp4 / nvfp4: the format fixes the block (32 / 16) and the scale encoding (E8M0 / E4M3),
    so blocksize must be that block or quantize's default 64 (ignored), and double_quant is
    ignored (the scale bytes are always the nested codes)."""
    if blocksize not in (fmt.fixed_blocksize, 64) or isinstance(blocksize, bool):
        raise ValueError(f"{fmt.name} fixes its block size at {fmt.fixed_blocksize} elements; got blocksize="
                         f"{blocksize!r} (pass {fmt.fixed_blocksize} or leave the default)")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if sparsity is not None:
        raise ValueError(f"sparsity={sparsity!r} is not supported for {fmt.name} (its blocks are fixed on the "
                         "dense layout)")
    if mask is not None:
        mask = _check_mask(mask, x)
        x = torch.where(mask, x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))  # E2M1 has an exact 0
    return quantize_microscaling(x, fmt)


def _check_mask(mask: object, x: torch.Tensor) -> torch.Tensor:
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != x.shape:
        raise ValueError(f"mask must have x's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    return mask.contiguous()


def _quantize_24(x: torch.Tensor, fmt: Format, blocksize: Optional[int], mask: Optional[torch.Tensor]
                 ) -> QuantizedTensor:
    """The 2:4 layout: kept values in storage order quantized as a flat dense tensor."""
    if x.dim() < 1 or x.shape[-1] % 4:
        raise ValueError(f"sparsity='2:4' needs the last dimension (in_features) divisible by 4, got shape "
                         f"{tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):  # a NaN in a pruned slot must not vanish silently
        raise ValueError("x contains NaN or Inf values; a non-finite weight has no faithful code")
    per_row = blocksize is None
    bs = x.shape[-1] // 2 if per_row else check_blocksize(blocksize)
    vals, pos = _layouts.select_24(x, mask)
    inner = QuantizedTensor._quantize_flat(_layouts.to_storage(vals), fmt, bs)
    q = QuantizedTensor(inner.packed, inner.scales, inner.offsets, fmt, x.shape, x.dtype, bs, per_row, layout="2:4",
                        positions=_layouts.pack_positions(pos))
    if mask is not None and not _layouts.has_exact_zero(fmt):
        kept_count = mask.reshape(-1, 4).sum(1)
        if bool((kept_count < 2).any()):  # a stored zero would not decode to exactly 0.0
            q.mask = _layouts.pack_mask(mask)
    return q


def dequantize(q: QuantizedTensor, dtype: Optional[torch.dtype] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense tensor of `q` (see QuantizedTensor.dequantize)."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    return q.dequantize(dtype=dtype, out=out)


def matmul(x: torch.Tensor, qweight: QuantizedTensor, bias: Optional[torch.Tensor] = None,
           lora: Optional[tuple] = None) -> torch.Tensor:
    """``y = x @ dequantize(qweight)^T + bias + s * (x @ A^T) @ B^T`` without a dense weight.

    Args:
        x: float32/float16/bfloat16 [..., in_features].
        qweight: QuantizedTensor of shape [out_features, in_features] (frozen: no gradient).
        bias: [out_features] or None.
        lora: (A [r, in_features], B [out_features, r], s: float) or None.
    Gradients flow to x, bias, A and B. Up to 16 rows of x use the fused kernel that decodes
    each packed byte once; more rows dequantize the layer once (freed after the call).
    """
    check_tensor("x", x)
    check_float("x", x)
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a QuantizedTensor, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must be 2-D [out_features, in_features], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must end in in_features={k}, got shape {tuple(x.shape)}")
    a = b = None
    s = 0.0
    if lora is not None:
        if not (isinstance(lora, (tuple, list)) and len(lora) == 3):
            raise TypeError("lora must be a tuple (A, B, scale)")
        a, b, s = lora
        check_tensor("lora A", a)
        check_tensor("lora B", b)
        s = float(s)
    if qweight.mask is not None:
        # A stored pruning mask (formats without an exact zero): the kernels do not read it,
        # so the product runs on the dequantized (masked) weight.
        y = x @ qweight.dequantize(x.dtype).t()
        if a is not None:
            y = y + (s * ((x.to(torch.float32) @ a.to(torch.float32).t()) @ b.to(torch.float32).t())).to(y.dtype)
    else:
        y = qweight.kernel_weight().matmul(x, a, b, s)  # the dense or 2:4 layout's op
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        check_same_device(x.device, bias=bias)
        y = y + bias.to(y.dtype)
    return y


def _matmul_t_setup_context(ctx, inputs, output):
    pass


def _matmul_t_double_backward(ctx, grad):
    # matmul's backward for x is the transposed product qengine::matmul_t; differentiating it
    # again (create_graph=True, then a second backward) would need its own formula. Without one
    # torch reports an op name users never called; say what is not supported and what to do.
    raise NotImplementedError(
        "qengine.matmul (QuantLinear's forward) does not support double backward: the gradient of its input "
        "gradient (torch.autograd.grad(..., create_graph=True) followed by another backward) is not implemented. "
        "For gradient penalties or Hessian-vector products run that part on the dequantized weight, "
        "torch.nn.functional.linear(x, q.dequantize())")


# Registered here, next to the public matmul whose double backward it concerns (ops/matmul.py holds
# matmul_t's schema, kernels and fake).
torch.library.register_autograd("qengine::matmul_t", _matmul_t_double_backward, setup_context=_matmul_t_setup_context)


def fit_codebook(weight: torch.Tensor, bits: int = 4, blocksize: Optional[int] = 64, rule: str = "absmax",
                 iters: int = 60, sample: int = 1 << 20, seed: int = 0, tol: float = 1e-7) -> Format:
    """A codebook fitted to `weight` by 1-D k-means (weight clustering) on its block-normalised
    values, each weighted by its block's scale^2, so that quantizing `weight` with it (same
    blocksize and rule) minimises the squared error of the weights. Initialised at quantiles of
    a sample, then Lloyd iterations over all values in the native kernel. Returns a Format
    usable everywhere a format name is.

    Args:
        weight: float tensor (any shape, contiguous, finite), on the CPU (others are copied).
        bits: 4 (16 values) or 8 (256 values).
        blocksize, rule: as in quantize(); ``rule="absmax"`` fits values in [-1, 1],
            ``"minmax"`` in [0, 1].
        iters: maximum Lloyd iterations; stops earlier when the error improves by < tol (relative).
    """
    check_codebook_fit(weight, bits, rule, iters)
    x = weight.detach().to("cpu").contiguous()
    bs, _ = resolve_blocksize(x, blocksize)
    k = 2**bits
    init = quantile_init(x, bs, rule, k, sample, seed)
    centroids = init
    last_sse = None
    for _ in range(iters):
        fmt = codebook(centroids, rule=rule, bits=bits, name="kmeans")
        table, mids, _order, _grid = fmt.kernel_tables("cpu")
        sums, weights, sse = kmeans_accumulate(x, bs, table, mids, bits, fmt.rule_code)
        n = len(fmt.values)
        weights, sums = weights[:n], sums[:n]
        old = torch.tensor(fmt.values, dtype=torch.float64)
        # Empty clusters keep their value; the others move to the (scale^2-weighted) mean of
        # their members, which minimises the squared error of the weights themselves.
        new = torch.where(weights > 0, sums / weights.clamp(min=1e-300), old)
        new = strictly_increasing(new, rule)
        centroids = new.tolist()
        if last_sse is not None and last_sse - sse <= tol * max(last_sse, 1e-30):
            break
        last_sse = sse
    return codebook(centroids, rule=rule, bits=bits, name="codebook")



