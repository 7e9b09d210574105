"""The fixed checks of `qengine doctor`: seeded inputs of odd sizes and, per kernel family and
format, a function that runs the kernels on one device and records its outputs for comparison
with the scalar CPU kernels' (doctor.py runs and compares them)."""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import qat
from .formats import codebook
from .functional import matmul, quantize
from .nn import LoRAExperts, QuantExperts
from .optim import PagedAdamW, PagedAdamW8bit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Results that are not bytes (matmul family, MoE) are compared with a tolerance of the output
# dtype: two float32-accumulated products of the same x and W each differ from the exact one by
# a few roundings of that dtype times |x| @ |W|^T (half precision: the weight or the table
# rounded to it on some paths, the output rounded once), so two of them by at most 4 of them.
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
TOLERANCE_NOTE = ("matmul family: |y - y_ref| <= tol * (|x| @ |W|^T) elementwise (|g| @ |W| for gradients); "
                  "moe_experts: ||y - y_ref|| / ||y_ref|| <= tol; tol = "
                  + ", ".join(f"{t:g} ({DTYPE_IDS[d]})" for d, t in TOL.items()))

SHAPE = (37, 200)  # 7400 elements: partial last block at every block size, per-row blocks of 200
LAYERS = ((37, 200), (24, 256))  # K = 200: blocks straddle rows; K = 256: the aligned path
CONFIGS = ((64, False), (32, True), (None, False))  # (blocksize, double_quant); None = per row
SMALL_M, LARGE_M = 3, 33  # rows of x: the fused small-batch kernels (<= 16) and the large-batch paths

FORMATS = {
    "nf4": "nf4", "fp4": "fp4", "int4": "int4", "int8": "int8", "uint4": "uint4", "uint8": "uint8",
    # user codebooks: 4-bit absmax with unused codes, 8-bit min-max non-uniform
    "cb5": codebook([-1.0, -0.35, 0.0, 0.4, 1.0], rule="absmax", name="cb5"),
    "cb200": codebook((torch.linspace(0.0, 1.0, 200, dtype=torch.float64) ** 1.5).tolist(), rule="minmax", bits=8,
                      name="cb200"),
}


class Outcome:
    """What one device produced for one check, moved to the CPU: `exact` compared byte for
    byte; `bound` (output, magnitude) compared elementwise within TOL * magnitude; `norm`
    compared by relative Frobenius error; `ideal` the float64 value of `bound` entries, checked
    on the reference device (whose results the others are compared with)."""

    def __init__(self):
        self.exact: dict[str, torch.Tensor] = {}
        self.bound: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.norm: dict[str, torch.Tensor] = {}
        self.ideal: dict[str, torch.Tensor] = {}

    def bytes(self, name: str, t: torch.Tensor) -> None:
        self.exact[name] = t.detach().cpu().clone()

    def state(self, prefix: str, q) -> None:
        """Every tensor of a QuantizedTensor's state (packed codes, scales, nested state, positions)."""
        for key, t in q.state_dict().items():
            self.bytes(f"{prefix} {key}", t)

    def close(self, name: str, y: torch.Tensor, mag: torch.Tensor, ideal: Optional[torch.Tensor] = None) -> None:
        self.bound[name] = (y.detach().cpu().clone(), mag.detach())
        if ideal is not None:
            self.ideal[name] = ideal.detach()

    def relative(self, name: str, y: torch.Tensor) -> None:
        self.norm[name] = y.detach().cpu().clone()


@dataclass(frozen=True)
class Check:
    kernel: str
    format: str
    run: Callable[[torch.device, Outcome], None]


class Inputs:
    """Seeded inputs and reference weights, made once (on the CPU, by the first device that asks:
    the scalar reference) and shared by every device, so each kernel sees the same arguments."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._cache: dict = {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def randn(self, shape, dtype=torch.float32, tag: str = "") -> torch.Tensor:
        """Mixed magnitudes (so blocks differ), fixed by (shape, tag)."""
        def make():
            g = torch.Generator().manual_seed(self.seed + zlib.crc32(f"{tuple(shape)} {tag}".encode()))
            n = 1
            for s in shape:
                n *= s
            x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 0.5)
            return x.reshape(shape)
        return self._get(("randn", tuple(shape), tag), make).to(dtype, copy=True)  # callers may modify it

    def weight(self, fmt: str, shape, blocksize, dq: bool, sparsity=None):
        """(QuantizedTensor on the CPU, its float32 dequantization as float64)."""
        def make():
            q = quantize(self.randn(shape, tag="w"), FORMATS[fmt], blocksize, double_quant=dq, sparsity=sparsity)
            return q, q.dequantize(torch.float32).to(torch.float64)
        return self._get(("weight", fmt, tuple(shape), blocksize, dq, sparsity), make)

    def experts(self, fmt: str, dq: bool, lora: bool):
        """A QuantExperts layer (4 experts, hidden 96, intermediate 32, biases; LoRA adapters on
        both matrices when `lora`) on the CPU."""
        def make():
            E, H, inter = 4, 96, 32
            m = QuantExperts.from_weights(self.randn((E, 2 * inter, H), tag="gu") * 0.1,
                                          self.randn((E, H, inter), tag="dn") * 0.1,
                                          up_bias=self.randn((E, 2 * inter), tag="ub") * 0.1,
                                          down_bias=self.randn((E, H), tag="db") * 0.1,
                                          format=FORMATS[fmt], blocksize=32, double_quant=dq)
            if lora:
                for attr in ("gate_up_proj", "down_proj"):
                    adapter = LoRAExperts(getattr(m, attr), r=3, alpha=6)
                    with torch.no_grad():
                        adapter.lora_B.copy_(self.randn(tuple(adapter.lora_B.shape), tag=attr) * 0.1)
                    setattr(m, attr, adapter)
            return m.eval()
        return self._get(("experts", fmt, dq, lora), make)


def _abs_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.detach().to(torch.float64).abs() @ b.to(torch.float64).abs()


# ---------------------------------------------------------------------------- dense layout
def _quantize(inputs, fmt, dev, out):
    for dtype in DTYPES:
        x = inputs.randn(SHAPE, dtype, "q").to(dev)
        for bs, dq in CONFIGS:
            out.state(f"{DTYPE_IDS[dtype]} bs={bs} dq={dq}", quantize(x, FORMATS[fmt], bs, double_quant=dq))


def _dequantize(inputs, fmt, dev, out):
    for bs, dq in CONFIGS:
        q = inputs.weight(fmt, SHAPE, bs, dq)[0].to(dev)
        for dtype in DTYPES:
            out.bytes(f"bs={bs} dq={dq} {DTYPE_IDS[dtype]}", q.dequantize(dtype))
        buf = torch.full(SHAPE, 7.0, device=dev)
        out.bytes(f"bs={bs} dq={dq} out=", q.dequantize(out=buf))


def _products(inputs, fmt, dev, out, m, dtypes):
    """y = x @ W^T for each layer and weight layout; m rows of x."""
    for n, k in LAYERS:
        for bs, dq in ((64, True), (None, False)):
            q, w64 = inputs.weight(fmt, (n, k), bs, dq)
            qd = q.to(dev)
            for dtype in dtypes:
                x = inputs.randn((m, k), dtype, "x")
                x64 = x.to(torch.float64)
                out.close(f"{n}x{k} bs={bs} dq={dq} {DTYPE_IDS[dtype]}", matmul(x.to(dev), qd),
                          _abs_product(x64, w64.t()), x64 @ w64.t())


def _matmul_small(inputs, fmt, dev, out):
    _products(inputs, fmt, dev, out, SMALL_M, DTYPES)


def _matmul_large(inputs, fmt, dev, out):
    _products(inputs, fmt, dev, out, LARGE_M, DTYPES)


def _matmul_t(inputs, fmt, dev, out):
    """gx = g @ W, the backward of matmul for x (the fused transposed kernel for few rows)."""
    for n, k in LAYERS:
        q, w64 = inputs.weight(fmt, (n, k), 64, True)
        qd = q.to(dev)
        for m in (SMALL_M, 20):
            for dtype in (torch.float32, torch.bfloat16):
                g = inputs.randn((m, n), dtype, "g")
                x = torch.zeros(m, k, dtype=dtype, device=dev, requires_grad=True)
                with torch.enable_grad():
                    (gx,) = torch.autograd.grad(matmul(x, qd), x, g.to(dev))
                g64 = g.to(torch.float64)
                out.close(f"{n}x{k} m={m} {DTYPE_IDS[dtype]}", gx, _abs_product(g64, w64), g64 @ w64)


def _matmul_lora(inputs, fmt, dev, out):
    """y = x @ W^T + bias + s (x A^T) B^T and its gradients for x, A, B, bias."""
    n, k, r, s = 37, 200, 8, 0.75
    q, w64 = inputs.weight(fmt, (n, k), 64, True)
    qd = q.to(dev)
    a0, b0, bias0 = inputs.randn((r, k), tag="A") * 0.1, inputs.randn((n, r), tag="B") * 0.1, inputs.randn((n,))
    for m in (SMALL_M, 20):
        for dtype in (torch.float32, torch.bfloat16):
            x0, g0 = inputs.randn((m, k), dtype, "x"), inputs.randn((m, n), dtype, "g")
            x, a, b, bias = (t.to(dev, dtype, copy=True).requires_grad_() for t in (x0, a0, b0, bias0))
            with torch.enable_grad():
                y = matmul(x, qd, bias, (a, b, s))
                grads = torch.autograd.grad(y, (x, a, b, bias), g0.to(dev))
            x64, a64, b64, g64 = (t.to(torch.float64) for t in (x0, a0.to(dtype), b0.to(dtype), g0))
            xa, gb = _abs_product(x64, a64.t()), _abs_product(g64, b64)
            tag = f"m={m} {DTYPE_IDS[dtype]}"
            bias_mag = bias0.to(dtype).abs().to(torch.float64)
            out.close(f"{tag} y", y, _abs_product(x64, w64.t()) + s * xa @ b64.abs().t() + bias_mag)
            out.close(f"{tag} grad x", grads[0], _abs_product(g64, w64) + s * gb @ a64.abs())
            out.close(f"{tag} grad A", grads[1], s * gb.t() @ x64.abs())
            out.close(f"{tag} grad B", grads[2], s * g64.abs().t() @ xa)
            out.close(f"{tag} grad bias", grads[3], g64.abs().sum(0))


def _fake_quantize(inputs, fmt, dev, out):
    for dtype in (torch.float32, torch.bfloat16):
        w = inputs.randn(SHAPE, dtype, "q").to(dev)
        for bs, dq in CONFIGS:
            out.bytes(f"{DTYPE_IDS[dtype]} bs={bs} dq={dq}", qat.fake_quantize(w, FORMATS[fmt], bs, dq))


# ---------------------------------------------------------------------------- 2:4 sparse layout
def _sparse_quantize(inputs, fmt, dev, out):
    for dtype in (torch.float32, torch.bfloat16):
        x = inputs.randn(SHAPE, dtype, "q").to(dev)
        for bs, dq in CONFIGS:
            out.state(f"{DTYPE_IDS[dtype]} bs={bs} dq={dq}",
                      quantize(x, FORMATS[fmt], bs, double_quant=dq, sparsity="2:4"))


def _sparse_dequantize(inputs, fmt, dev, out):
    for bs, dq in CONFIGS:
        q = inputs.weight(fmt, SHAPE, bs, dq, "2:4")[0].to(dev)
        for dtype in DTYPES:
            out.bytes(f"bs={bs} dq={dq} {DTYPE_IDS[dtype]}", q.dequantize(dtype))


def _sparse_matmul(inputs, fmt, dev, out):
    for bs, dq in ((64, True), (None, False)):
        q, w64 = inputs.weight(fmt, SHAPE, bs, dq, "2:4")
        qd = q.to(dev)
        for m in (SMALL_M, 20):
            for dtype in DTYPES:
                x = inputs.randn((m, SHAPE[1]), dtype, "x")
                x64 = x.to(torch.float64)
                out.close(f"bs={bs} dq={dq} m={m} {DTYPE_IDS[dtype]}", matmul(x.to(dev), qd),
                          _abs_product(x64, w64.t()), x64 @ w64.t())
        for m in (SMALL_M, 20):  # the backward for x: sparse24_matmul_t
            g = inputs.randn((m, SHAPE[0]), torch.bfloat16, "g")
            x = torch.zeros(m, SHAPE[1], dtype=torch.bfloat16, device=dev, requires_grad=True)
            with torch.enable_grad():
                (gx,) = torch.autograd.grad(matmul(x, qd), x, g.to(dev))
            g64 = g.to(torch.float64)
            out.close(f"bs={bs} dq={dq} m={m} grad x", gx, _abs_product(g64, w64), g64 @ w64)


# ---------------------------------------------------------------------------- MoE, optimizers
def _moe(inputs, fmt, dev, out):
    """torch.ops.qengine.moe_experts through QuantExperts: 4 experts, top-2 of 7 tokens (and 1)."""
    for lora in (False, True):
        cpu_layer = inputs.experts(fmt, fmt == "nf4", lora)
        layer = cpu_layer if dev.type == "cpu" else copy.deepcopy(cpu_layer).to(dev)
        for t in (7, 1):
            g = torch.Generator().manual_seed(inputs.seed + t)
            idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(t)])
            w = torch.rand(t, 2, generator=g)
            for dtype in (torch.float32, torch.bfloat16):
                x = inputs.randn((t, 96), dtype, "moe")
                with torch.no_grad():
                    y = layer(x.to(dev), idx.to(dev), w.to(dev))
                out.relative(f"lora={lora} tokens={t} {DTYPE_IDS[dtype]}", y)


def _optimizer(cls):
    def run(inputs, fmt, dev, out):
        """A few steps over spans split across pages and partial state blocks, both SIMD flag
        families (maximize, 1 - beta1 >= 0.5): parameters and states byte for byte."""
        shapes = [(37, 200), (333,), (1,)]
        for dtype in (torch.float32, torch.bfloat16):
            for flags in (dict(), dict(betas=(0.3, 0.9), maximize=True)):
                ps = [torch.nn.Parameter(inputs.randn(s, tag="p").to(dtype).to(dev)) for s in shapes]
                opt = cls(ps, lr=1e-2, weight_decay=0.1, page_elements=4096, **flags)
                for step in range(3):
                    for p, s in zip(ps, shapes):
                        p.grad = inputs.randn(s, tag=f"grad{step}").to(dtype).to(dev)
                    opt.step()
                tag = f"{DTYPE_IDS[dtype]} {'maximize' if flags else 'defaults'}"
                for i, p in enumerate(ps):
                    out.bytes(f"{tag} param{i}", p)
                for i, st in opt.state_dict()["state"].items():
                    for key, t in sorted(st.items()):
                        if isinstance(t, torch.Tensor):
                            out.bytes(f"{tag} state{i}.{key}", t)
    return run


_PER_FORMAT = [("quantize", _quantize), ("dequantize", _dequantize), ("matmul", _matmul_small),
               ("matmul_large", _matmul_large), ("matmul_t", _matmul_t), ("fake_quantize", _fake_quantize),
               ("sparse24_quantize", _sparse_quantize), ("sparse24_dequantize", _sparse_dequantize),
               ("sparse24_matmul", _sparse_matmul), ("moe_experts", _moe)]
KERNEL_NOTES = {
    "quantize": "packed codes, scales, nested state: bytes",
    "dequantize": "3 dtypes and out=: bytes",
    "matmul": f"fused small batch (m={SMALL_M}): tol",
    "matmul_large": f"large batch (m={LARGE_M}): the blocked GEMM, or dequantized tiles: tol",
    "matmul_t": "backward for x (transposed kernels, small and large batch): tol",
    "matmul_lora": "LoRA + bias forward and gradients: tol",
    "fake_quantize": "QAT fake quantization: bytes",
    "sparse24_quantize": "2:4 selection, codes, positions: bytes",
    "sparse24_dequantize": "2:4 dequantize: bytes",
    "sparse24_matmul": "2:4 matmul and its backward for x (m=3 and 20): tol",
    "moe_experts": "torch.ops.qengine.moe_experts: tol",
    "adamw": "PagedAdamW 3 steps: params and states bytes",
    "adamw8bit": "PagedAdamW8bit 3 steps: params and states bytes",
}


def all_checks(inputs: Inputs) -> list[Check]:
    """Every check, kernel family by kernel family, each over every format it applies to."""
    def bind(fn, fmt):
        return lambda dev, out: fn(inputs, fmt, dev, out)

    checks = [Check(kernel, fmt, bind(fn, fmt)) for kernel, fn in _PER_FORMAT[:5] for fmt in FORMATS]
    checks += [Check("matmul_lora", fmt, bind(_matmul_lora, fmt)) for fmt in ("nf4", "uint8")]
    checks += [Check(kernel, fmt, bind(fn, fmt)) for kernel, fn in _PER_FORMAT[5:] for fmt in FORMATS]
    checks += [Check("adamw", "state32", bind(_optimizer(PagedAdamW), "state32")),
               Check("adamw8bit", "state8", bind(_optimizer(PagedAdamW8bit), "state8"))]
    return checks
