"""Byte compatibility with bitsandbytes' 4-bit quantization (NF4 / FP4, with and without
compress_statistics). Skipped when bitsandbytes cannot be imported.

bitsandbytes' own 4-bit dequantize is wrapped in torch.compile (dynamic=False), which would
recompile for every shape on this CPU-only machine; the tests run it eagerly
(torch.compiler.set_stance("force_eager")), which computes the same float32 products.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qengine
from cases import TORCH_JIT_DEPRECATION
from qengine.tensor import NestedScales

pytestmark = pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)

# 2-D with a row length that block 256 does not divide, 2-D with an odd row length, odd 1-D
# sizes (a padding nibble) and one past a block of 4096. Kept small: bitsandbytes' CPU path
# is pure PyTorch here (~1 us per element for quantize + dequantize).
BNB_SHAPES = [(64, 384), (200, 77), (13,), (4097,)]


@pytest.fixture
def F(bnb):
    return bnb.functional


@pytest.fixture(autouse=True)
def _eager_bnb():
    with torch.compiler.set_stance("force_eager"):
        yield


def bnb_dequantize_flat(F, packed, state):
    """bitsandbytes' dequantize_4bit of the flattened tensor, reshaped.

    bitsandbytes 0.50's native CPU dequantize_4bit decodes row by row and assumes every block
    lies inside one row of state.shape; when shape[-1] is not a multiple of the block size
    (e.g. (256, 384) with block 256) its output is wrong (scales applied to the wrong
    elements). Blocks are defined over the flattened tensor, so decoding the flat tensor is
    the layout-independent answer."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return F.dequantize_4bit(packed, flat).reshape(state.shape)


def test_tables_match_bitsandbytes(F):
    for name in ("nf4", "fp4"):
        ours = torch.tensor(qengine.get_format(name).values, dtype=torch.float32)
        theirs = F.get_4bit_type(name, device="cpu").float()
        assert torch.equal(ours, theirs), name  # (FP4 code 8: -0.0 there, 0.0 here; equal values)
    ours = torch.tensor(qengine.get_format("dynamic8").values, dtype=torch.float32)
    assert torch.equal(ours, F.create_dynamic_map(signed=True).float())


@pytest.mark.parametrize("compress_statistics", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("shape", BNB_SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_bytes(F, quant_type, dtype, blocksize, shape, compress_statistics):
    w = torch.randn(shape, dtype=dtype)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=compress_statistics)
    q = qengine.quantize(w, quant_type, blocksize, double_quant=compress_statistics)

    assert torch.equal(packed.reshape(-1), q.packed), "packed codes differ from bitsandbytes'"
    if compress_statistics:
        assert isinstance(q.scales, NestedScales)
        assert torch.equal(state.absmax, q.scales.quantized.packed), "nested absmax codes differ"
        assert torch.equal(state.state2.absmax, q.scales.quantized.scales), "nested absmax scales differ"
        assert torch.equal(state.offset.reshape(()), q.scales.mean.reshape(())), "nested offset (mean) differs"
        assert state.state2.blocksize == q.scales.quantized.blocksize
    else:
        assert torch.equal(state.absmax, q.scales), "absmax differs from bitsandbytes'"

    ours = q.dequantize()
    assert ours.dtype == dtype and ours.shape == w.shape
    if len(shape) == 1 or shape[-1] % blocksize == 0:  # where bitsandbytes' CPU kernel is layout-safe
        theirs = F.dequantize_4bit(packed, state)
    else:
        theirs = bnb_dequantize_flat(F, packed, state)
    assert torch.equal(theirs, ours), "dequantized values differ from bitsandbytes'"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_decodes_qengine_bytes(F, quant_type):
    """bitsandbytes' dequantize of qengine's state (via qengine.compat) equals ours."""
    compat = pytest.importorskip("qengine.compat")
    for dq in (False, True):
        w = torch.randn(300, 128, dtype=torch.bfloat16)
        q = qengine.quantize(w, quant_type, 64, double_quant=dq)
        sd = compat.to_bnb_state_dict(q, prefix="weight")
        packed = sd.pop("weight")
        qs = {k[len("weight."):]: v for k, v in sd.items()}
        state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
        assert torch.equal(F.dequantize_4bit(packed, state), q.dequantize())
        # and back: bitsandbytes' own state dict loads into the same QuantizedTensor
        p2, s2 = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
        bnb_sd = {"weight": p2, **{f"weight.{k}": v for k, v in s2.as_dict(packed=True).items()}}
        r = compat.from_bnb_state_dict(bnb_sd, prefix="weight")
        assert torch.equal(r.packed, q.packed)
        assert torch.equal(r.dequantize(), q.dequantize())


@pytest.mark.slow
def test_nf4_4096x4096_error_equals_bitsandbytes(F):
    w = torch.randn(4096, 4096)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs = F.dequantize_4bit(packed, state)
    q = qengine.quantize(w, "nf4", 64)
    ours = q.dequantize()
    err_ours = (ours - w).abs().double().mean().item()
    err_theirs = (theirs - w).abs().double().mean().item()
    assert err_ours <= err_theirs
    assert err_ours == err_theirs
    assert torch.equal(packed.reshape(-1), q.packed)
