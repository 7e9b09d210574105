"""The torch.library ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch)
and torch.compile(fullgraph=True) of code calling them."""

from __future__ import annotations

import pytest
import torch

import qengine
from cases import TORCH_JIT_DEPRECATION, fmt_of, make_input

# torch.compile's inductor imports torch.utils.mkldnn (torch's own deprecation warning).
pytestmark = pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)

OPS_FORMATS = ["nf4", "fp4", "uint8", "cb5"]


def tables(fmt):
    """The kernel tables a quantize op call takes, in the op's argument order."""
    return list(qengine.get_format(fmt).kernel_tables("cpu"))


def quantize_args(x, fmt, blocksize, convert=lambda t: t):
    f = qengine.get_format(fmt)
    tabs = [convert(t) if t is not None else None for t in tables(f)]
    return (x.reshape(-1), *tabs, f.bits, blocksize, f.rule_code, f.identity_order)


def quantized_input(fmt):
    """(x, q, table): a float32 [37, 33] input, quantized in fmt (blocksize 64), and the table the
    dequantize ops take."""
    x = make_input((37, 33), torch.float32)
    q = qengine.quantize(x, fmt_of(fmt), 64)
    return x, q, tables(q.format)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", OPS_FORMATS)
def test_opcheck_quantize_blockwise(fmt, dtype):
    x = make_input((37, 33), dtype)
    torch.library.opcheck(torch.ops.qengine.quantize_blockwise.default, quantize_args(x, fmt_of(fmt), 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", OPS_FORMATS)
def test_opcheck_dequantize_blockwise(fmt, dtype):
    x, q, table = quantized_input(fmt)
    args = (q.packed, table, q.scales, q.offsets, q.format.bits, 64, x.numel(), dtype)
    torch.library.opcheck(torch.ops.qengine.dequantize_blockwise.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", OPS_FORMATS)
def test_opcheck_dequantize_blockwise_out(fmt, dtype):
    x, q, table = quantized_input(fmt)
    out = torch.empty(x.numel(), dtype=dtype)
    args = (q.packed, table, q.scales, q.offsets, q.format.bits, 64, x.numel(), out)
    torch.library.opcheck(torch.ops.qengine.dequantize_blockwise_out.default, args)
    expected = q.dequantize(dtype).reshape(-1)
    torch.ops.qengine.dequantize_blockwise_out(*args)
    assert torch.equal(out, expected)


def test_ops_agree_with_the_python_api():
    x = make_input((37, 33), torch.float32)
    q = qengine.quantize(x, "uint4", 64)
    packed, scales, offsets = torch.ops.qengine.quantize_blockwise(*quantize_args(x, "uint4", 64))
    assert torch.equal(packed, q.packed) and torch.equal(scales, q.scales) and torch.equal(offsets, q.offsets)
    _, _, offsets = torch.ops.qengine.quantize_blockwise(*quantize_args(x, "nf4", 64))
    assert offsets.numel() == 0  # absmax formats return an empty offsets tensor


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(1001)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        packed, scales, offsets = torch.ops.qengine.quantize_blockwise(
            *quantize_args(fx, "uint4", 64, convert=mode.from_tensor))
        assert packed.shape == (501,) and packed.dtype == torch.uint8
        assert scales.shape == (16,) and scales.dtype == torch.float32
        assert offsets.shape == (16,)
        out = torch.ops.qengine.dequantize_blockwise(packed, mode.from_tensor(tables("uint4")[0]), scales, offsets, 4,
                                                     64, 1001, torch.bfloat16)
        assert out.shape == (1001,) and out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_fullgraph_dequantize_ops():
    torch._dynamo.reset()
    x = make_input((100, 77), torch.float32)
    q = qengine.quantize(x, "uint4", 64)
    qn = qengine.quantize(x, "nf4", 128)
    t_u4 = tables("uint4")[0]
    t_nf4 = tables("nf4")[0]
    n = x.numel()

    def f(packed, scales, offsets, packed2, scales2):
        a = torch.ops.qengine.dequantize_blockwise(packed, t_u4, scales, offsets, 4, 64, n, torch.bfloat16)
        out = torch.empty(n, dtype=torch.float32)
        torch.ops.qengine.dequantize_blockwise_out(packed2, t_nf4, scales2, None, 4, 128, n, out)
        return a.reshape(100, 77), out.reshape(100, 77) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    args = (q.packed, q.scales, q.offsets, qn.packed, qn.scales)
    got = compiled(*args)
    expected = f(*args)
    assert torch.equal(got[0], expected[0]) and got[0].dtype == torch.bfloat16
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], q.dequantize(torch.bfloat16))
    assert torch.equal(got[1], qn.dequantize() * 2.0)
