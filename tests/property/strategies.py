"""Hypothesis strategies shared by the property tests: shapes, dtypes, block sizes, formats
(incl. user codebooks), values with special numbers, and views of the data.

Every tensor is built from drawn parameters plus a drawn seed for torch.Generator, so a
failing example replays exactly. A new area (layers, optimizers) is one more module
tests/property/test_prop_<area>.py: `@PROFILE @given(shape=shapes(), dtype=float_dtypes(), ...)`,
predicting its documented errors with checks.check_raises and comparing with a float64
reference; the thorough profile then covers it too (profiles.py counts examples per test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st

import qengine

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BAD_DTYPES = [torch.float64, torch.int32, torch.uint8, torch.bool, torch.complex64]
FORMAT_NAMES = ["nf4", "fp4", "int4", "int8", "uint4", "uint8", "dynamic8"]
VALID_BLOCKSIZES = [32, 64, 128, 256, 1024, 4096, None]
BAD_BLOCKSIZES = [0, 1, 16, 31, 33, 48, 100, 4095, 8192, -64, 64.0, "64", True]

# Dimension sizes: empty, one, primes (never a multiple of a block or a vector), powers of two
# and their neighbours (mid-vector tails), larger.
DIMS = [0, 1, 2, 3, 5, 7, 13, 31, 32, 33, 63, 64, 65, 127, 128, 129, 257, 509]
MAX_NUMEL = 1 << 15  # keeps the float64 references quick

SPECIALS = ["nan", "inf", "-inf", "denormal", "-denormal", "zero", "-zero", "huge", "-huge"]


def shapes(min_dims: int = 1, max_dims: int = 3, allow_empty: bool = True) -> st.SearchStrategy:
    dims = st.sampled_from(DIMS if allow_empty else [d for d in DIMS if d]) | st.integers(1, 300)
    return st.lists(dims, min_size=min_dims, max_size=max_dims).map(tuple).filter(
        lambda s: _prod(s) <= MAX_NUMEL)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def float_dtypes() -> st.SearchStrategy:
    return st.sampled_from(FLOAT_DTYPES)


def any_dtypes(bad_weight: float = 0.1) -> st.SearchStrategy:
    """Mostly float dtypes, sometimes one the API must reject."""
    return st.one_of(st.sampled_from(FLOAT_DTYPES), st.sampled_from(BAD_DTYPES)) if bad_weight else float_dtypes()


def blocksizes(allow_invalid: bool = True) -> st.SearchStrategy:
    valid = st.sampled_from(VALID_BLOCKSIZES)
    if not allow_invalid:
        return valid
    return st.one_of(valid, valid, valid, st.sampled_from(BAD_BLOCKSIZES))


@st.composite
def user_codebooks(draw, rule: Optional[str] = None) -> qengine.Format:
    """A valid qengine.codebook: 2..16 (4-bit) or 17..256 (8-bit) strictly increasing float32
    values in [-1, 1] (absmax) or [0, 1] (minmax), often including the range ends and 0."""
    rule = rule or draw(st.sampled_from(["absmax", "minmax"]))
    lo = -1.0 if rule == "absmax" else 0.0
    eight = draw(st.booleans())
    size = draw(st.integers(17, 256) if eight else st.integers(2, 16))
    mode = draw(st.sampled_from(["random", "power", "ends"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if mode == "power":  # non-uniform spacing, dense near lo
        vals = torch.linspace(0, 1, size, dtype=torch.float64) ** draw(st.floats(0.3, 3.0))
        vals = lo + (1.0 - lo) * vals
    else:
        vals = lo + (1.0 - lo) * torch.rand(size, generator=g, dtype=torch.float64)
        if mode == "ends":
            vals[0], vals[-1] = lo, 1.0
            if rule == "absmax" and size > 2:
                vals[1] = 0.0
    vals = torch.unique(vals.to(torch.float32)).to(torch.float64)  # sorted, float32-distinct
    if vals.numel() < 2:
        vals = torch.tensor([lo, 1.0], dtype=torch.float64)
    return qengine.codebook(vals.tolist(), rule=rule, bits=8 if eight else None, name="prop_cb")


def formats(user: bool = True) -> st.SearchStrategy:
    named = st.sampled_from(FORMAT_NAMES)
    return st.one_of(named, user_codebooks()) if user else named


@dataclass
class ValueSpec:
    """How to fill a tensor: random normals of a magnitude, optionally all-equal blocks, plus
    special values at given flat positions (fractions of numel)."""

    seed: int
    log2_scale: int
    kind: str  # "randn", "equal", "equal_blocks", "positive", "tiny"
    specials: list  # [(fraction, name)]

    def finite_only(self) -> bool:
        return not any(name in ("nan", "inf", "-inf") for _, name in self.specials)


@st.composite
def value_specs(draw, allow_nonfinite: bool = True, allow_huge: bool = True) -> ValueSpec:
    names = SPECIALS if allow_nonfinite else [s for s in SPECIALS if s not in ("nan", "inf", "-inf")]
    if not allow_huge:
        names = [s for s in names if "huge" not in s]
    specials = draw(st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.sampled_from(names)),
                             max_size=4) | st.just([]))
    return ValueSpec(seed=draw(st.integers(0, 2**31 - 1)), log2_scale=draw(st.integers(-30, 30)),
                     kind=draw(st.sampled_from(["randn", "randn", "equal", "equal_blocks", "positive", "tiny"])),
                     specials=specials)


def _special_value(name: str, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    denormal = info.smallest_normal / 4  # a subnormal of the dtype
    return {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "denormal": denormal,
            "-denormal": -denormal, "zero": 0.0, "-zero": -0.0, "huge": info.max, "-huge": -info.max}[name]


def make_values(spec: ValueSpec, shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of `shape` in `dtype` (for non-float dtypes: small integers)."""
    n = _prod(shape)
    g = torch.Generator().manual_seed(spec.seed)
    if spec.kind == "equal":
        x = torch.full((n,), float(torch.randn(1, generator=g)))
    elif spec.kind == "equal_blocks":  # runs of 32 equal values: whole blocks with max == min
        x = torch.randn((n + 31) // 32, generator=g).repeat_interleave(32)[:n]
    elif spec.kind == "positive":
        x = torch.rand(n, generator=g) + 0.5
    elif spec.kind == "tiny":  # block scales near the float32 normal limit
        x = torch.randn(n, generator=g) * 1e-37
    else:
        x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    if spec.kind != "tiny":
        x = x * 2.0 ** spec.log2_scale
    if dtype.is_complex:
        return x.to(dtype).reshape(shape)
    if not dtype.is_floating_point:
        return x.clamp(-100, 100).to(dtype).reshape(shape) if dtype != torch.bool else (x > 0).reshape(shape)
    if dtype in (torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        x = x.clamp(-info.max, info.max)
    x = x.to(dtype)
    for frac, name in spec.specials:
        if n:
            x[int(frac * n)] = _special_value(name, dtype if dtype.is_floating_point else torch.float32)
    return x.reshape(shape)


VIEWS = ["contiguous", "contiguous", "offset", "transposed", "strided", "expanded"]


def views() -> st.SearchStrategy:
    return st.sampled_from(VIEWS)


def make_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """x (contiguous) presented as `view`: same values for contiguous/offset (the offset view
    starts one element into a larger buffer); other views are non-contiguous where possible."""
    if view == "offset":
        buf = torch.empty(x.numel() + 3, dtype=x.dtype)
        buf[0] = buf[-1] = buf[-2] = 0
        buf[1 : 1 + x.numel()] = x.reshape(-1)
        return buf[1 : 1 + x.numel()].view(x.shape)
    if view == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if view == "strided" and x.numel():
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] * 2, dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if view == "expanded" and x.dim() >= 1 and x.shape[0] == 1:
        return x[:1].expand(3, *x.shape[1:]) if x.dim() > 1 else x.expand(3)
    return x


def unchanged(x: torch.Tensor, before: torch.Tensor, stride: tuple) -> bool:
    """x still holds before's values bit for bit (NaN payloads and signed zeros included) and
    has the strides it had (`stride`)."""
    if x.stride() != stride or x.shape != before.shape or x.dtype != before.dtype:
        return False
    if x.is_floating_point():
        bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
                torch.float64: torch.int64}[x.dtype]
        return torch.equal(x.contiguous().view(bits), before.contiguous().view(bits))
    return torch.equal(x, before)
