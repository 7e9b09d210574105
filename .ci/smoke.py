"""Smoke test of an installed qengine under whatever torch is installed: quantize, matmul forward
and backward, and QuantLinear forward and backward where qengine.nn exists, on the CPU, each
checked against float64 torch. Run by .ci/smoke_torch.sh; exits non-zero on the first failure."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys

import torch
import torch.nn.functional as F

import qengine


def check(name: str, ok: bool, detail: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        sys.exit(1)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-300)).item()


def smoke_quantize() -> None:
    w = torch.randn(96, 200)
    q = qengine.quantize(w, "nf4", blocksize=64, double_quant=True)
    w_hat = q.dequantize()
    # NF4 on standard-normal weights: ~10 % relative error (README table); 0.15 catches garbage.
    err = rel_err(w_hat, w)
    check("quantize nf4 + double quant", w_hat.shape == w.shape and err < 0.15, f"relative error {err:.4f}")
    # The decoded values are codebook entries times the block's scale, exactly (float64 reference).
    q1 = qengine.quantize(w, "int8", blocksize=64)
    codes = q1.packed.to(torch.int64)
    # float32 table times float32 scale is exact in float64; rounding it once gives the float32 product.
    table = q1.format.kernel_tables(torch.device("cpu"))[0].double()
    scales = q1.scales.double().repeat_interleave(64)[: w.numel()]
    ref = (table[codes] * scales).reshape(w.shape)
    check("dequantize int8 == table[code] * scale", torch.equal(q1.dequantize().double(), ref.float().double()),
          "bytes equal the float64 reference rounded to float32")


def smoke_matmul() -> None:
    n, k = 48, 160
    w = torch.randn(n, k)
    q = qengine.quantize(w, "nf4", blocksize=64)
    dense = q.dequantize(torch.float32).double()
    for rows in (3, 33):  # the fused kernel (<= 16 rows) and the dequantize + GEMM path
        x = torch.randn(rows, k, requires_grad=True)
        bias = torch.randn(n, requires_grad=True)
        a = (torch.randn(4, k) * 0.1).requires_grad_()
        b = (torch.randn(n, 4) * 0.1).requires_grad_()
        y = qengine.matmul(x, q, bias=bias, lora=(a, b, 2.0))
        x64, bias64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        ref = F.linear(x64, dense, bias64) + 2.0 * (x64 @ a64.T) @ b64.T
        # float32 accumulation over K terms: tolerance grows like sqrt(K) * eps.
        tol = 50 * math.sqrt(k) * torch.finfo(torch.float32).eps
        err = rel_err(y, ref)
        check(f"matmul forward, {rows} rows", err < tol, f"relative error {err:.2e} (tolerance {tol:.1e})")
        grad = torch.randn(rows, n)
        y.backward(grad)
        ref.backward(grad.double())
        for name, got, want in (("x", x, x64), ("bias", bias, bias64), ("lora A", a, a64), ("lora B", b, b64)):
            err = rel_err(got.grad, want.grad)
            check(f"matmul backward d{name}, {rows} rows", err < tol, f"relative error {err:.2e}")


def smoke_quant_linear() -> None:
    if importlib.util.find_spec("qengine.nn") is None:
        print("  skip QuantLinear: this qengine has no qengine.nn")
        return
    nn_mod = importlib.import_module("qengine.nn")  # an error inside it fails the smoke test
    lin = torch.nn.Linear(160, 48)
    ql = nn_mod.QuantLinear.from_linear(lin, format="nf4", blocksize=64, double_quant=True)
    dense = ql.dequantize().double()
    x = torch.randn(5, 160, requires_grad=True)
    y = ql(x)
    x64 = x.detach().double().requires_grad_()
    bias64 = None if lin.bias is None else lin.bias.detach().double()
    ref = F.linear(x64, dense, bias64)
    tol = 50 * math.sqrt(160) * torch.finfo(torch.float32).eps
    err = rel_err(y, ref)
    check("QuantLinear forward", err < tol, f"relative error {err:.2e}")
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad.double())
    err = rel_err(x.grad, x64.grad)
    check("QuantLinear backward dx", err < tol, f"relative error {err:.2e}")


def main() -> None:
    torch.manual_seed(0)
    info = qengine.build_info()
    print(f"qengine {qengine.__version__} from {qengine.__file__}")
    print(f"torch {torch.__version__}; CPU kernels {info['cpu_isa']}; CUDA kernels "
          f"{'compiled' if info['cuda_compiled'] else 'not compiled'}; GPU in use: {info['cuda_available']}")
    smoke_quantize()
    smoke_matmul()
    smoke_quant_linear()
    print("smoke test passed")


if __name__ == "__main__":
    main()
