"""Schemas, fake implementations and autograd of the quantized matmul ops (kernels per device
in cpu.py and cuda.py):

  qengine::matmul(x, packed, table, scales, scales_nested, offsets?, bits, blocksize, out_features,
                  lora_a?, lora_b?, lora_scale) -> [..., out_features]
      (and qengine::matmul_nograd: the same without autograd, for grad mode off; define_nograd_twin)
  qengine::matmul_t(g, packed, table, scales, scales_nested, offsets?, bits, blocksize, in_features)
      -> [..., in_features]    (the backward of matmul for x; its double backward: functional.py)
  qengine::lora_backward(grad, x, lora_a, lora_b, lora_scale, gx?, need_a, need_b) -> (gx, ga, gb)
      (the LoRA side path's share of both products' backward)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._checks import reject_device

# Up to this many rows of x use the fused small-batch kernel (decode in registers, each packed
# byte read once); more rows dequantize the layer (a tile at a time on the CPU) into x's dtype
# and use a dense GEMM.
SMALL_BATCH_ROWS = 16


# Twins of the product ops without an autograd formula, for calls made where grad mode is off
# (what `generate` and evaluation loops run under). A custom op's autograd formula
# (register_autograd) is a Python function the dispatcher runs on every call, also under
# torch.no_grad, where it records nothing: ~11 us of a ~50 us batch-1 call of a small layer
# (bench/bench_call.py). An op defined by Library.define with no autograd kernel passes that
# dispatch key in C++. So each product op (matmul here, sparse24_matmul in sparse.py) has a twin,
# qengine::<name>_nograd, with the same schema (inferred from the same prototype), fake and
# kernels and no autograd formula, which KernelWeight.matmul calls where torch.is_grad_enabled()
# is False: nothing would be recorded there anyway. A program traced or exported under no_grad
# calls the twin.
_LIB = torch.library.Library("qengine", "FRAGMENT")


def define_nograd_twin(name: str, prototype: Callable, fake: Callable) -> str:
    """Defines qengine::<name>_nograd from the op's prototype (its annotated signature; its body,
    which rejects the device, serves every device without a kernel) and fake; returns the twin's
    name. The device kernels register on it beside the op's (cpu.py, cuda.py)."""
    twin = f"{name}_nograd"
    _LIB.define(twin + torch.library.infer_schema(prototype, mutates_args=()))
    _LIB.impl(twin, prototype, "CompositeExplicitAutograd")
    torch.library.register_fake(f"qengine::{twin}", fake, lib=_LIB)
    return twin


def _matmul(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
            scales_nested: list[torch.Tensor], offsets: Optional[torch.Tensor], bits: int, blocksize: int,
            out_features: int, lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor],
            lora_scale: float) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T (+ lora_scale * (x @ A^T) @ B^T) for the quantized W [N, K];
    float32 accumulation, x's dtype out.

    scales: float32 [nblocks] with scales_nested = [], or uint8 codes [nblocks] with
    scales_nested = [table, absmax, mean, nested_blocksize] when double-quantized (decoded
    inside the kernel). lora_a [r, K], lora_b [N, r]: both or neither."""
    reject_device("x", x)


def _matmul_fake(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b,
                 lora_scale):
    return x.new_empty(*x.shape[:-1], out_features)


matmul = torch.library.custom_op("qengine::matmul", _matmul, mutates_args=())
matmul.register_fake(_matmul_fake)
MATMUL_NOGRAD = define_nograd_twin("matmul", _matmul, _matmul_fake)  # the same op without autograd


@torch.library.custom_op("qengine::matmul_t", mutates_args=())
def matmul_t(g: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
             scales_nested: list[torch.Tensor], offsets: Optional[torch.Tensor], bits: int, blocksize: int,
             in_features: int) -> torch.Tensor:
    """gx[..., K] = g[..., N] @ W for the quantized W [N, K] (the backward of matmul for x)."""
    reject_device("g", g)


@matmul_t.register_fake
def _(g, packed, table, scales, scales_nested, offsets, bits, blocksize, in_features):
    return g.new_empty(*g.shape[:-1], in_features)


def add_lora_side(y: torch.Tensor, x2: torch.Tensor, lora_a, lora_b, lora_scale: float) -> torch.Tensor:
    """y + lora_scale * (x2 @ A^T) @ B^T, the side path computed in float32 and rounded to y's
    dtype (the large-batch paths; the small-batch kernels fuse it)."""
    if lora_a is None:
        return y
    side = (lora_scale * (x2.to(torch.float32) @ lora_a.to(torch.float32).t())) @ lora_b.to(torch.float32).t()
    return y + side.to(y.dtype)


def lora_backward_composite(grad, x, lora_a, lora_b, lora_scale: float, gx, need_a: bool, need_b: bool):
    """qengine::lora_backward in torch ops, float32 throughout: what every device runs unless it
    registers a kernel, and the CPU kernel's fallback."""
    g2 = grad.reshape(-1, grad.shape[-1]).to(torch.float32)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    a32, b32 = lora_a.to(torch.float32), lora_b.to(torch.float32)
    # s applied to the [M, r] products, the small end: a pass over [M, K] or [N, r] saved (the
    # QLoRA step of a 134M Llama at 512 rows: 1.034x -> 1.020x a bf16 PEFT step, interleaved).
    sgb = lora_scale * (g2 @ b32)  # [M, r]
    gx_out = gx + (sgb @ a32).reshape(gx.shape).to(gx.dtype) if gx is not None else x.new_empty(0)
    ga = (sgb.t() @ x2).to(lora_a.dtype) if need_a else lora_a.new_empty(0)
    gb = (g2.t() @ (lora_scale * (x2 @ a32.t()))).to(lora_b.dtype) if need_b else lora_b.new_empty(0)
    return gx_out, ga, gb


@torch.library.custom_op("qengine::lora_backward", mutates_args=())
def lora_backward_op(grad: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, lora_scale: float,
                     gx: Optional[torch.Tensor], need_a: bool, need_b: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LoRA side path's share of the backward of y = x @ W^T + s * (x @ A^T) @ B^T (matmul,
    sparse24_matmul): (gx plus the side path's input gradient in gx's dtype, the gradient of A
    where need_a, that of B where need_b), each summed in float32; an empty tensor stands for each
    one not asked for (gx None, need_a or need_b False). Kernels: the composite below on every
    device, the CPU's own in cpu.py (native for bfloat16 x and grad with float32 A and B)."""
    return lora_backward_composite(grad, x, lora_a, lora_b, lora_scale, gx, need_a, need_b)


@lora_backward_op.register_fake
def _(grad, x, lora_a, lora_b, lora_scale, gx, need_a, need_b):
    return (gx.new_empty(gx.shape) if gx is not None else x.new_empty(0),
            lora_a.new_empty(lora_a.shape if need_a else (0,)), lora_b.new_empty(lora_b.shape if need_b else (0,)))


def _lora_backward_double_backward(ctx, *grads):
    raise NotImplementedError(
        "qengine.matmul with a LoRA side path does not support double backward: the gradient of its "
        "gradients (torch.autograd.grad(..., create_graph=True) followed by another backward) is not implemented.")


lora_backward_op.register_autograd(_lora_backward_double_backward, setup_context=lambda ctx, inputs, output: None)


def lora_backward(grad, x, lora_a, lora_b, s: float, gx, need_a: bool, need_b: bool):
    """qengine::lora_backward with None for each output not asked for: (gx plus the side path's
    input gradient, or None where gx is None; the gradient of A or None; that of B or None)."""
    gx_out, ga, gb = torch.ops.qengine.lora_backward(grad, x, lora_a, lora_b, float(s), gx, need_a, need_b)
    return (gx_out if gx is not None else None, ga if need_a else None, gb if need_b else None)


def _setup_context(ctx, inputs, output):
    x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b, s = inputs
    nested = list(scales_nested)
    lora = lora_a is not None
    ctx.save_for_backward(x if lora else None, lora_a, lora_b, packed, table, scales, offsets, *nested)
    ctx.meta = (bits, blocksize, x.shape[-1], s)


def _backward(ctx, grad):
    x, lora_a, lora_b, packed, table, scales, offsets, *nested = ctx.saved_tensors
    bits, blocksize, in_features, s = ctx.meta
    gx = ga = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qengine.matmul_t(grad, packed, table, scales, nested, offsets, bits, blocksize, in_features)
    if lora_a is not None:
        gx, ga, gb = lora_backward(grad, x, lora_a, lora_b, s, gx, ctx.needs_input_grad[9], ctx.needs_input_grad[10])
    return gx, None, None, None, [None] * len(nested), None, None, None, None, ga, gb, None


matmul.register_autograd(_backward, setup_context=_setup_context)
