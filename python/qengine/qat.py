"""Quantization-aware training: the fused fake-quantize op (quantize then dequantize through
the native kernels, straight-through gradient) and FakeQuantLinear / prepare().

    >>> qengine.qat.prepare(model, format="int4", blocksize=None, skip=["lm_head"])
    >>> ...train as usual: each forward sees the weights as `format` would store them...

Gradient (straight-through estimator): d fake_quantize(w) / dw = 1 where w is inside the
representable range of its block, 0 outside. With absmax or minmax scales every weight is
inside by construction (the scale is the block's own max |w|, or its max - min), so the
gradient is the identity. With clip < 1 (absmax formats) the scale is clip * max|w| of the
block and weights beyond +-clip * max|w| are clamped to the end codes: those get zero gradient.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_blocksize, check_contiguous, check_float
from .formats import Format, get_format
from .functional import dequantize, quantize
from .prune import is_skipped
from .tensor import NestedScales

__all__ = ["fake_quantize", "FakeQuantLinear", "prepare", "convert"]


def _clip_bound(w: torch.Tensor, blocksize: int, clip: float) -> torch.Tensor:
    """clip * max |w| of each element's block (float32, flat [numel]); blocks over the flat tensor."""
    flat = w.reshape(-1).to(torch.float32)
    n = flat.numel()
    padded = torch.cat([flat.abs(), flat.new_zeros((-n) % blocksize)]).reshape(-1, blocksize)
    absmax = padded.amax(1)
    return (absmax * clip).repeat_interleave(blocksize)[:n]


def _nested_roundtrip(values: torch.Tensor) -> torch.Tensor:
    """Double quantization of per-block values: what quantize(double_quant=True) stores and
    dequantize decodes, through the same code (NestedScales: the mean taken on the CPU, so
    CUDA gives the CPU's bytes)."""
    return NestedScales.from_values(values).values()


@torch.library.custom_op("qengine::fake_quantize", mutates_args=())
def _fake_quantize(w: torch.Tensor, table: torch.Tensor, midpoints: torch.Tensor, sorted_to_code: torch.Tensor,
                   grid_lut: Optional[torch.Tensor], bits: int, blocksize: int, rule: int, identity_order: bool,
                   double_quant: bool, clip: float) -> torch.Tensor:
    """dequantize(quantize(w)) [w.shape] in w's dtype: blockwise over the flat w (blocksize),
    with the format's kernel tables; double_quant as quantize(double_quant=True); clip < 1
    (absmax only) clamps each block to +-clip * its max |w| first."""
    check_float("w", w)
    check_contiguous("w", w)
    if w.numel() == 0:
        raise ValueError("cannot fake-quantize an empty tensor")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf values")
    x = w
    if clip < 1.0:
        bound = _clip_bound(w, blocksize, clip)
        x = torch.maximum(torch.minimum(w.reshape(-1).to(torch.float32), bound), -bound).to(w.dtype)
    packed, scales, offsets = torch.ops.qengine.quantize_blockwise(x.reshape(-1), table, midpoints, sorted_to_code,
                                                                   grid_lut, bits, blocksize, rule, identity_order)
    offsets = offsets if rule == 1 else None
    if double_quant:
        scales = _nested_roundtrip(scales)
        if offsets is not None:
            offsets = _nested_roundtrip(offsets)
    out = torch.ops.qengine.dequantize_blockwise(packed, table, scales, offsets, bits, blocksize, w.numel(), w.dtype)
    return out.reshape(w.shape)


@_fake_quantize.register_fake
def _(w, table, midpoints, sorted_to_code, grid_lut, bits, blocksize, rule, identity_order, double_quant, clip):
    return torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    w, *_rest = inputs
    ctx.blocksize, ctx.clip = inputs[6], inputs[10]
    ctx.save_for_backward(w if ctx.clip < 1.0 else None)


def _backward(ctx, grad):
    (w,) = ctx.saved_tensors
    gw = grad
    if w is not None:  # zero outside the clipped range: those weights sit on the end codes
        inside = w.reshape(-1).to(torch.float32).abs() <= _clip_bound(w, ctx.blocksize, ctx.clip)
        gw = grad * inside.reshape(w.shape).to(grad.dtype)
    return gw, None, None, None, None, None, None, None, None, None, None


_fake_quantize.register_autograd(_backward, setup_context=_setup_context)


def _resolve(w_shape, format, blocksize, clip) -> tuple[Format, int]:
    fmt = get_format(format)
    if blocksize is None:
        bs = w_shape[-1] if len(w_shape) else 1
    elif fmt.fixed_blocksize and blocksize == fmt.fixed_blocksize and not isinstance(blocksize, bool):
        bs = blocksize  # nvfp4's 16, below what the other formats take
    else:
        bs = check_blocksize(blocksize)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (0.0 < clip <= 1.0) or math.isnan(clip):
        raise ValueError(f"clip must be in (0, 1], got {clip!r}")
    if clip < 1.0 and fmt.rule != "absmax":
        raise ValueError(f"clip < 1 needs an absmax-scaled format; {fmt.name!r} uses {fmt.rule} scaling")
    return fmt, bs


def fake_quantize(w: torch.Tensor, format: str | Format = "int4", blocksize: Optional[int] = 64,
                  double_quant: bool = False, clip: float = 1.0) -> torch.Tensor:
    """``dequantize(quantize(w, format, blocksize, double_quant))`` (bit for bit when clip == 1)
    as one differentiable op (straight-through gradient, see the module docstring).

    Args:
        w: float32/float16/bfloat16, any shape, finite; not modified.
        format, blocksize, double_quant: as qengine.quantize (blocksize None = per row).
        clip: absmax formats only: scale = clip * block max |w| (values beyond are clamped).
    """
    check_float("w", w)
    fmt = get_format(format)
    if fmt.scale_format or fmt.quantizer:  # quantize checks the block size these formats take
        return _fake_quantize_own_rule(w, fmt, blocksize, double_quant, clip)
    fmt, bs = _resolve(w.shape, fmt, blocksize, clip)
    table, mids, order, grid = fmt.kernel_tables(w.device)
    return _fake_quantize(w.contiguous(), table, mids, order, grid, fmt.bits, bs, fmt.rule_code, fmt.identity_order,
                          bool(double_quant), float(clip))


class _StraightThrough(torch.autograd.Function):
    """q in the forward, the gradient passed to w unchanged (every weight is inside its block's
    range: the scale is the block's own max |w|)."""

    @staticmethod
    def forward(ctx, w, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _fake_quantize_own_rule(w, fmt: Format, blocksize, double_quant, clip) -> torch.Tensor:
    """mxfp4 / nvfp4 / fp8_e4m3, whose scales or codes follow the format's own rules rather than
    the nearest-code kernel's: the real quantizer and dequantize (bit for bit), straight through."""
    if clip != 1.0:
        raise ValueError(f"clip < 1 is not supported for {fmt.name!r}: its scale rule is fixed by the format")
    q = dequantize(quantize(w.detach().contiguous(), fmt, blocksize, bool(double_quant)))
    return _StraightThrough.apply(w, q.to(w.dtype).reshape(w.shape))


class FakeQuantLinear(nn.Module):
    """An nn.Linear whose forward uses fake_quantize(weight): y = x @ fq(W)^T + b.

    weight: [out_features, in_features] and bias: [out_features] or None, trained as usual
    (the same Parameter objects as the nn.Linear it replaces). Forward is pure (no state is
    set), so torch.compile(fullgraph=True) traces it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: str | Format = "int4",
                 blocksize: Optional[int] = 64, double_quant: bool = False, clip: float = 1.0, device=None,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.format, self.blocksize = _resolve((out_features, in_features), format, blocksize, clip)
        self.blocksize_arg, self.double_quant, self.clip = blocksize, bool(double_quant), float(clip)

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str | Format = "int4", blocksize: Optional[int] = 64,
                    double_quant: bool = False, clip: float = 1.0) -> "FakeQuantLinear":
        """Wraps linear's own weight and bias Parameters (no copy: optimizers keep tracking them)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        m.format, m.blocksize = _resolve(tuple(linear.weight.shape), format, blocksize, clip)
        m.blocksize_arg, m.double_quant, m.clip = blocksize, bool(double_quant), float(clip)
        return m

    def fake_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.format, self.blocksize_arg, self.double_quant, self.clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        bs = "row" if self.blocksize_arg is None else self.blocksize
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format.name}, blocksize={bs}, double_quant={self.double_quant}, clip={self.clip}")


def prepare(model: nn.Module, format: str | Format = "int4", blocksize: Optional[int] = 64,
            double_quant: bool = False, clip: float = 1.0, skip: Sequence[str] = ()) -> nn.Module:
    """Replaces every nn.Linear of `model` (in place; the model is returned) by a
    FakeQuantLinear sharing its parameters, except modules named in `skip` (names or fnmatch
    patterns; a name also skips its children). Other modules (embeddings, norms, 3-D expert
    weights) are left alone and stay in full precision."""
    if isinstance(skip, str):
        raise TypeError("skip must be a list of module names or patterns, not a string")
    get_format(format)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and name and not is_skipped(name, skip)]
    if isinstance(model, nn.Linear) and type(model) is nn.Linear:
        raise TypeError("prepare() swaps the nn.Linear children of a model; wrap a bare nn.Linear with "
                        "FakeQuantLinear.from_linear instead")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FakeQuantLinear.from_linear(linear, format, blocksize, double_quant, clip))
    return model


def _quantized_weight(m: FakeQuantLinear):
    """The QuantizedTensor whose dequantization is exactly m.fake_weight(): the same native
    quantize of the same (clamped, when clip < 1) weight."""
    from .functional import quantize

    w = m.weight.detach()
    if m.clip < 1.0:
        bound = _clip_bound(w, m.blocksize, m.clip)
        w = torch.maximum(torch.minimum(w.reshape(-1).to(torch.float32), bound), -bound).to(w.dtype).reshape(w.shape)
    return quantize(w.contiguous(), m.format, m.blocksize_arg, m.double_quant)


def convert(model: nn.Module) -> nn.Module:
    """Replaces every FakeQuantLinear of `model` (in place; the model is returned) by a
    QuantLinear holding exactly the bytes its fake-quant forward uses at the current weights,
    so the converted model computes what the QAT model computes in eval mode."""
    from .nn import QuantLinear

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if isinstance(model, FakeQuantLinear):
        raise TypeError("convert() swaps the FakeQuantLinear children of a model; use "
                        "QuantLinear.from_quantized(qengine.qat._quantized_weight(layer), layer.bias) for a bare one")
    if not targets:
        raise ValueError("model has no FakeQuantLinear layers (call qengine.qat.prepare first)")
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = None if m.bias is None else m.bias.detach().clone()
        setattr(parent, child, QuantLinear.from_quantized(_quantized_weight(m), bias))
    return model
