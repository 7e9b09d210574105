"""The format registry and user codebooks (qengine.formats)."""

from __future__ import annotations

import math

import pytest
import torch

import qengine
from qengine.formats import Format, get_format

# bitsandbytes' NF4 table (QLoRA, Dettmers et al. 2023), storage order = sorted order.
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# bitsandbytes' FP4: sign bit 3, then e2m1 magnitudes scaled by 1/12 (code 8 is the other zero).
FP4_TIMES_12 = [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]


def f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def f32_list(vs) -> list[float]:
    return [f32(v) for v in vs]


BUILTIN = {
    # name: (bits, rule, values)
    "nf4": (4, "absmax", f32_list(NF4)),
    "fp4": (4, "absmax", [float(torch.tensor(v, dtype=torch.float32) / 12) for v in FP4_TIMES_12]),
    "int4": (4, "absmax", f32_list(k / 7 for k in range(-7, 8))),
    "int8": (8, "absmax", f32_list(k / 127 for k in range(-127, 128))),
    "uint4": (4, "minmax", f32_list(k / 15 for k in range(16))),
    "uint8": (8, "minmax", f32_list(k / 255 for k in range(256))),
}


def test_available_formats_lists_the_builtins():
    names = qengine.available_formats()
    for name in ("nf4", "fp4", "int4", "int8", "uint4", "uint8"):
        assert name in names
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_tables(name):
    bits, rule, values = BUILTIN[name]
    fmt = get_format(name)
    assert isinstance(fmt, Format)
    assert fmt.name == name
    assert fmt.bits == bits
    assert fmt.rule == rule
    assert len(fmt.values) == len(values) <= 2**bits
    assert list(fmt.values) == values  # -0.0 == 0.0 for FP4's code 8


@pytest.mark.parametrize("name", list(BUILTIN) + ["dynamic8"])
def test_builtin_values_are_float32_and_in_range(name):
    fmt = get_format(name)
    lo, hi = (-1.0, 1.0) if fmt.rule == "absmax" else (0.0, 1.0)
    for v in fmt.values:
        assert isinstance(v, float)
        assert math.isfinite(v)
        assert f32(v) == v, f"{name}: {v!r} is not float32-representable"
        assert lo <= v <= hi


def test_fp4_has_two_zeros_in_storage_order():
    values = get_format("fp4").values
    zeros = [i for i, v in enumerate(values) if v == 0.0]
    assert zeros == [0, 8]


def test_dynamic8_table_shape():
    """The double-quant map: bitsandbytes' signed dynamic map (256 sorted values, 0 and 1
    included, symmetric apart from the extra 1.0). Exact equality with bitsandbytes'
    create_dynamic_map is checked in test_bnb_compat.py."""
    fmt = get_format("dynamic8")
    v = list(fmt.values)
    assert fmt.bits == 8 and fmt.rule == "absmax"
    assert len(v) == 256
    assert all(a < b for a, b in zip(v, v[1:]))
    assert 0.0 in v and v[-1] == 1.0
    negatives = sorted(-x for x in v if x < 0)
    positives = [x for x in v if 0 < x < 1.0]
    assert negatives == positives
    assert len(negatives) == 127


def test_get_format_passes_formats_through():
    cb = qengine.codebook([-1.0, 0.0, 1.0])
    assert get_format(cb) is cb


@pytest.mark.parametrize("name", ["nf5", "", "int16", "float8"])
def test_unknown_format_name(name):
    with pytest.raises(ValueError):
        get_format(name)


# ---------------------------------------------------------------------------- codebook()
def test_codebook_basic():
    cb = qengine.codebook([-1.0, -0.25, 0.1, 1.0])
    assert isinstance(cb, Format)
    assert cb.bits == 4
    assert cb.rule == "absmax"
    assert list(cb.values) == [-1.0, -0.25, f32(0.1), 1.0]  # rounded to float32


@pytest.mark.parametrize("n, bits", [(2, 4), (16, 4)])
def test_codebook_default_bits(n, bits):
    values = torch.linspace(-1, 1, n, dtype=torch.float64).tolist()
    assert qengine.codebook(values).bits == bits


@pytest.mark.parametrize("n", [17, 256])
def test_codebook_over_16_values_needs_explicit_8_bits(n):
    values = torch.linspace(-1, 1, n, dtype=torch.float64).tolist()
    with pytest.raises(ValueError, match="bits=8"):
        qengine.codebook(values)
    assert qengine.codebook(values, bits=8).bits == 8


def test_codebook_explicit_8_bits_for_a_small_table():
    cb = qengine.codebook([0.0, 0.5, 1.0], rule="minmax", bits=8)
    assert cb.bits == 8 and cb.rule == "minmax"
    assert list(cb.values) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_codebook_from_tensor(dtype):
    t = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=dtype)
    cb = qengine.codebook(t)
    assert list(cb.values) == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_codebook_does_not_modify_its_tensor():
    t = torch.tensor([-1.0, 0.1, 0.7], dtype=torch.float64)
    before = t.clone()
    qengine.codebook(t)
    assert torch.equal(t, before)


BAD_CODEBOOKS = {
    "unsorted": ([0.0, -0.5, 1.0], "absmax", None),
    "duplicate": ([-1.0, 0.0, 0.0, 1.0], "absmax", None),
    "duplicate_after_f32_rounding": ([0.1, 0.1 + 1e-12, 0.5], "absmax", None),
    "nan": ([-1.0, float("nan"), 1.0], "absmax", None),
    "inf": ([-1.0, 0.0, float("inf")], "absmax", None),
    "neg_inf": ([float("-inf"), 0.0, 1.0], "absmax", None),
    "17_values_4_bits": (torch.linspace(-1, 1, 17).tolist(), "absmax", 4),
    "257_values": (torch.linspace(-1, 1, 257, dtype=torch.float64).tolist(), "absmax", None),
    "257_values_8_bits": (torch.linspace(-1, 1, 257, dtype=torch.float64).tolist(), "absmax", 8),
    "absmax_above_1": ([-1.0, 0.0, 1.5], "absmax", None),
    "absmax_below_-1": ([-1.01, 0.0, 1.0], "absmax", None),
    "minmax_negative": ([-0.1, 0.5, 1.0], "minmax", None),
    "minmax_above_1": ([0.0, 0.5, 1.1], "minmax", None),
    "bad_rule": ([-1.0, 0.0, 1.0], "symmetric", None),
    "bits_3": ([-1.0, 0.0, 1.0], "absmax", 3),
    "bits_16": ([-1.0, 0.0, 1.0], "absmax", 16),
}


@pytest.mark.parametrize("case", list(BAD_CODEBOOKS))
def test_codebook_rejects(case):
    values, rule, bits = BAD_CODEBOOKS[case]
    with pytest.raises(ValueError):
        qengine.codebook(values, rule=rule, bits=bits)


def test_codebook_rejects_2d_tensor():
    with pytest.raises(ValueError):
        qengine.codebook(torch.tensor([[-1.0, 0.0], [0.5, 1.0]]))


@pytest.mark.parametrize("case", ["unsorted", "nan", "absmax_above_1"])
def test_codebook_rejects_tensor_input_too(case):
    values, rule, bits = BAD_CODEBOOKS[case]
    with pytest.raises(ValueError):
        qengine.codebook(torch.tensor(values, dtype=torch.float64), rule=rule, bits=bits)


def test_user_codebook_is_usable_as_a_format():
    cb = qengine.codebook([-1.0, -0.3, 0.0, 0.45, 1.0])
    x = torch.randn(100)
    q = qengine.quantize(x, cb, 32)
    assert q.format == cb
    assert q.dequantize().shape == x.shape
