"""The gather-free nearest-code search of the 8-bit optimizer states (csrc/cpu/optim/state_encoder.h),
which AVX-512 VBMI CPUs use in place of the bucket-table gather: both state codes fit its
tables, and its codes equal the searchsorted reference on every midpoint and its float
neighbours, every bucket edge, signed zeros, subnormals and a million log-uniform values."""

from __future__ import annotations

import pytest
import torch

from qengine import _C
from qengine.formats import get_format
from qengine.ops.optim import STATE_FORMATS, state_codes


def _nearest(x: torch.Tensor, name: str) -> torch.Tensor:
    """Reference: the number of float32 midpoints strictly below x."""
    mids = get_format(name).kernel_tables()[1][:255]
    return torch.searchsorted(mids, x, side="left").to(torch.uint8)


def _probe_values(name: str) -> torch.Tensor:
    """Finite floats with |x| < 2 where a search table can go wrong."""
    mids = get_format(name).kernel_tables()[1][:255]
    near = [mids]
    for direction in (2.0, -2.0):
        step = mids
        for _ in range(3):
            step = torch.nextafter(step, torch.tensor(direction))
            near.append(step)
    near = torch.cat(near)
    # Every float whose low 16 bits are at the edge or middle of a 16-bit bucket, |x| < 2.
    top = torch.arange(0, 0x4000, dtype=torch.int32) << 16
    edges = torch.cat([top | low for low in (0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)]).view(torch.float32)
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.empty(1 << 20).uniform_(-40.0, 0.9, generator=gen))
    special = torch.tensor([0.0, 1e-45, 1e-38, 1.17e-38, 2**-30, 2**-31, 1.0, 1.5, 1.9999999])
    body = torch.cat([near, edges, magnitudes, special])
    return torch.cat([body, -body]).clamp(-1.9999999, 1.9999999)


def test_both_state_codes_have_an_encoder():
    for code in state_codes(torch.device("cpu")):
        assert code.encoder_address != 0


@pytest.mark.skipif(not _C.vbmi_scales(), reason="the CPU has no AVX-512 VBMI (or QENGINE_NO_VBMI is set)")
@pytest.mark.parametrize("index", [0, 1], ids=["m signed", "v unsigned"])
def test_encoder_codes_equal_the_reference(index):
    name = STATE_FORMATS[index]
    code = state_codes(torch.device("cpu"))[index]
    x = _probe_values(name)
    x = torch.nn.functional.pad(x, (0, (-x.numel()) % 64))
    out = torch.empty(x.numel(), dtype=torch.uint8)
    code.encoder.encode(x.data_ptr(), x.numel(), out.data_ptr())
    expected = _nearest(x, name)
    bad = (out != expected).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} wrong codes, first x={x[bad[:5]].tolist()}"


def test_encoder_refuses_bad_sizes():
    code = state_codes(torch.device("cpu"))[0]
    x = torch.zeros(65)
    out = torch.empty(65, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 64|VBMI"):
        code.encoder.encode(x.data_ptr(), 65, out.data_ptr())
