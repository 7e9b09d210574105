"""The 8-bit optimizer states' codes as two-piece minifloats (formats.STATE8_*_FORM,
csrc/cpu/optim/state_minifloat.h): their values follow the documented construction, and the check
that lets the CPU kernels decode and encode them by shifts accepts exactly the right form:
a wrong field, a table value one ulp off or a search table with one midpoint moved fails it."""

from __future__ import annotations

import pytest
import torch

from qengine import _C
from qengine.formats import STATE8_SIGNED_FORM, STATE8_UNSIGNED_FORM, get_format
from qengine.ops import optim as _ops

FORMS = dict(zip(_ops.STATE_FORMATS, _ops.STATE_FORMS))


def _magnitudes(top_bits: int, top_binades: int, low_bits: int, count: int) -> list[float]:
    """The largest `count` magnitudes, from 1.0 down: top_binades binades of 2**top_bits evenly
    spaced values, then binades of 2**low_bits (float64, exact)."""
    out, exponent = [1.0], -1
    while len(out) < count:
        bits = top_bits if -exponent <= top_binades else low_bits
        out += [2.0**exponent * (1 + j / 2**bits) for j in reversed(range(2**bits))]
        exponent -= 1
    return out[:count]


def test_signed_code_values():
    """m: 0.0, 127 negative magnitudes (no -1.0) and 128 positive ones, 1.0 the largest."""
    top_bits, top_binades, low_bits, zero = STATE8_SIGNED_FORM
    mags = _magnitudes(top_bits, top_binades, low_bits, 128)
    expected = sorted([-m for m in mags[1:]] + [0.0] + mags)
    assert list(get_format("_state8_signed").values) == expected
    assert get_format("_state8_signed").values[zero] == 0.0


def test_unsigned_code_values():
    """v: 256 positive magnitudes, no zero (a v never decodes to 0 where its block's max is
    not), 1.0 the largest."""
    top_bits, top_binades, low_bits, zero = STATE8_UNSIGNED_FORM
    assert zero == -1
    assert list(get_format("_state8_unsigned").values) == sorted(_magnitudes(top_bits, top_binades, low_bits, 256))


@pytest.mark.parametrize("name", _ops.STATE_FORMATS)
def test_state_codes_have_their_forms(name):
    code = _ops.StateCode(name, torch.device("cpu"), FORMS[name])
    assert code.form == FORMS[name]
    assert _C.check_minifloat_form(*code.args(), *FORMS[name])


@pytest.mark.parametrize("name", _ops.STATE_FORMATS)
@pytest.mark.parametrize("field", range(4))
@pytest.mark.parametrize("delta", [-1, 1])
def test_a_wrong_field_fails_the_check(name, field, delta):
    code = _ops.StateCode(name, torch.device("cpu"), FORMS[name])
    form = list(FORMS[name])
    form[field] += delta
    assert not _C.check_minifloat_form(*code.args(), *form)


@pytest.mark.parametrize("form", [(0, 2, 3, 127), (5, 2, 0, 127), (8, 2, 3, 127), (5, 2, 9, 127), (5, -1, 3, 127),
                                  (5, 17, 3, 127), (5, 2, 3, 255), (5, 2, 3, -2), (7, 8, 3, 127), (1, 0, 1, -1)])
def test_malformed_forms_fail_the_check(form):
    """Out-of-range fields, a top piece with more magnitudes than the code, a smallest value
    that is not a normal float: refused, not computed."""
    code = _ops.StateCode("_state8_signed", torch.device("cpu"), STATE8_SIGNED_FORM)
    assert not _C.check_minifloat_form(*code.args(), *form)


@pytest.mark.parametrize("name", _ops.STATE_FORMATS)
def test_a_value_one_ulp_off_fails_the_check(name):
    code = _ops.StateCode(name, torch.device("cpu"), FORMS[name])
    for index in (0, 100, 200, 255):
        table = code.table.clone()
        table[index] = torch.nextafter(table[index], torch.tensor(2.0))
        assert not _C.check_minifloat_form(table.data_ptr(), *code.args()[1:], *FORMS[name])


@pytest.mark.parametrize("name", _ops.STATE_FORMATS)
def test_a_moved_midpoint_fails_the_check(name):
    """One bucket of the search table with its midpoint one ulp higher: the search then
    differs from the form on one float, which the check must find. (These codes' midpoints
    have few significant bits, so each lies at the start of its bucket: low 16 bits 0, in a
    positive bucket, where 0xFFFF means none.)"""
    code = _ops.StateCode(name, torch.device("cpu"), FORMS[name])
    low = code.lut & 0xFFFF
    positive = torch.arange(code.lut.numel()) > code.kmax
    moved = 0
    for bucket in torch.nonzero(positive & (low == 0)).flatten()[::13].tolist():
        lut = code.lut.clone()
        lut[bucket] += 1
        assert not _C.check_minifloat_form(code.table.data_ptr(), lut.data_ptr(), code.base, code.kmax,
                                           *FORMS[name]), bucket
        moved += 1
    assert moved >= 5
