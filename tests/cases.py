"""Parametrisation cases shared by the test modules (formats, dtypes, block sizes, shapes)."""

from __future__ import annotations

import torch

import qengine

DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}

# torch's own modules (torch.utils.mkldnn, imported by bitsandbytes and by inductor) define
# ScriptModules with the deprecated @torch.jit.script_method; pyproject turns warnings into
# errors, so the few tests that import those modules filter exactly this warning.
TORCH_JIT_DEPRECATION = r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning"

# ---------------------------------------------------------------------------- formats
# The user codebooks of the cross products: a 5-value absmax table (4-bit storage with unused
# codes) and a 200-value minmax table (8-bit storage, non-uniform).
CB5 = qengine.codebook([-1.0, -0.35, 0.0, 0.4, 1.0], rule="absmax", name="cb5")
CB200 = qengine.codebook((torch.linspace(0.0, 1.0, 200, dtype=torch.float64) ** 1.5).tolist(), rule="minmax",
                         bits=8, name="cb200")

FORMATS = {
    "nf4": "nf4",
    "fp4": "fp4",
    "int4": "int4",
    "int8": "int8",
    "uint4": "uint4",
    "uint8": "uint8",
    "cb5": CB5,
    "cb200": CB200,
}
FORMAT_NAMES = list(FORMATS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 4096, None]
ODD_SHAPES = [(1,), (7,), (63,), (65,), (3, 5), (257, 33), (2, 3, 31)]


def fmt_of(name: str):
    """The format object (or registered name) behind a FORMATS key; other names pass through."""
    return FORMATS.get(name, name)


def shape_id(shape) -> str:
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


# ---------------------------------------------------------------------------- data helpers
def make_input(shape, dtype, kind: str = "randn") -> torch.Tensor:
    """Test data in `dtype`; a mix of scales so blocks differ (and some have ties/zeros)."""
    n = 1
    for s in shape:
        n *= s
    if kind == "randn":
        x = torch.randn(n) * torch.exp(torch.randn(n) * 0.5)
    elif kind == "positive":
        x = torch.rand(n) + 0.5
    else:
        raise ValueError(kind)
    return x.reshape(shape).to(dtype)


# ---------------------------------------------------------------------------- special values
def special_inputs() -> dict[str, torch.Tensor]:
    """Inputs of 200 values that stress a quantizer: zeros of both signs, constants, subnormals,
    values near the float32 limit, magnitudes spanning 60 decades."""
    g = torch.Generator().manual_seed(1234)
    tiny = torch.randn(200, generator=g) * 1e-41  # subnormal float32
    return {
        "zeros": torch.zeros(200),
        "neg_zeros": -torch.zeros(200),
        "constant": torch.full((200,), 3.25),
        "negative_constant": torch.full((200,), -0.75),
        "one_nonzero": torch.cat([torch.zeros(99), torch.tensor([2.5]), torch.zeros(100)]),
        "all_negative": -torch.rand(200, generator=g) - 0.1,
        "all_positive": torch.rand(200, generator=g) + 0.1,
        "subnormal": tiny,
        "smallest_subnormal": torch.tensor([1.4e-45, 0.0, -1.4e-45, 2.8e-45] * 50),
        "huge": torch.randn(200, generator=g).clamp(-3, 3) * 1e38,
        "float32_max": torch.tensor([3.4028234663852886e38, -3.0e38, 1.0, 0.0] * 50),
        "mixed_magnitudes": torch.randn(200, generator=g) * torch.logspace(-30, 30, 200),
    }


SPECIAL = special_inputs()
