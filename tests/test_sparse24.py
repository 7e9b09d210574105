"""The 2:4 sparse layout: selection, byte order, dequantize and matmul against float64
references written from the layout's definition (sparse_reference.py), state dicts, cost and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import qengine
from cases import FORMAT_NAMES, fmt_of, make_input
from sparse_reference import ref_keep, ref_sparse_dequantize

SUPPORTED = qengine.build_info()["supported_cpu_isas"]


# ---------------------------------------------------------------------------- dequantize
SHAPES = [(4,), (3, 8), (5, 260), (2, 3, 516), (16, 256)]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_matches_reference(fmt, dtype):
    x = make_input((5, 260), dtype)
    q = qengine.quantize(x, fmt_of(fmt), 32, sparsity="2:4")
    assert torch.equal(q.dequantize(), ref_sparse_dequantize(x, fmt, 32, False, dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, None])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_shapes_and_blocks(shape, blocksize, double_quant):
    x = make_input(shape, torch.float32)
    fmt = "nf4" if double_quant else "uint4"
    q = qengine.quantize(x, fmt, blocksize, double_quant=double_quant, sparsity="2:4")
    expect = ref_sparse_dequantize(x, fmt, blocksize, double_quant, torch.bfloat16)
    assert torch.equal(q.dequantize(torch.bfloat16), expect)
    out = torch.full(shape, 7.0)
    assert torch.equal(q.dequantize(out=out), ref_sparse_dequantize(x, fmt, blocksize, double_quant, torch.float32))


@pytest.mark.parametrize("fmt, blocksize", [("nf4", 64), ("int8", 32)])
def test_native_dequantize_decodes_nested_scales(fmt, blocksize):
    """_C.sparse24_dequantize_cpu takes the double-quantized scale codes themselves and decodes
    them with the reference's bits."""
    from qengine import _C
    from qengine._checks import DTYPE_CODES
    from support import native_ref

    x = make_input((9, 1032), torch.float32)
    q = qengine.quantize(x, fmt, blocksize, double_quant=True, sparsity="2:4")
    kw, weight = native_ref(q)
    assert kw.nested  # the scales go in as codes
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _C.sparse24_dequantize_cpu(weight, x.numel() // 2, out.data_ptr(), DTYPE_CODES[out.dtype])
    assert torch.equal(out, ref_sparse_dequantize(x, fmt, blocksize, True, torch.bfloat16))


@pytest.mark.parametrize("fmt, blocksize, double_quant", [("nf4", 64, True), ("int8", 32, False), ("uint4", 128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_dequantize_columns(fmt, blocksize, double_quant, dtype):
    """_C.sparse24_dequantize_columns_cpu (the fallback products' tiles): rows [row0, row0 + rows)
    by columns [k0, k0 + cols), whole 256-weight chunks, bit for bit the reference's; a range
    that is no whole chunks, or past the weight, raises ValueError and writes nothing."""
    from qengine import _C
    from qengine._checks import DTYPE_CODES
    from support import native_ref

    n, k = 7, 768
    x = make_input((n, k), torch.float32)
    q = qengine.quantize(x, fmt, blocksize, double_quant=double_quant, sparsity="2:4")
    expected = ref_sparse_dequantize(x, fmt, blocksize, double_quant, dtype)
    kw, weight = native_ref(q)  # noqa: F841 (kw keeps the weight's tensors alive)
    code = DTYPE_CODES[dtype]
    for row0, rows, k0, cols in [(0, n, 0, k), (2, 3, 0, k), (0, n, 256, 512), (6, 1, 512, 256), (3, 0, 0, k)]:
        tile = torch.full((rows, cols), float("nan"), dtype=dtype)
        _C.sparse24_dequantize_columns_cpu(weight, row0, rows, n, k, k0, cols, tile.data_ptr(), code)
        assert torch.equal(tile, expected[row0:row0 + rows, k0:k0 + cols]), (row0, rows, k0, cols)
    out = torch.full((n * k,), 7.0, dtype=dtype)
    for row0, rows, k0, cols in [(0, n, 128, 256), (0, n, 0, 200), (5, 3, 0, k), (-1, 2, 0, k), (0, n, 512, 512)]:
        with pytest.raises(ValueError):
            _C.sparse24_dequantize_columns_cpu(weight, row0, rows, n, k, k0, cols, out.data_ptr(), code)
    assert (out == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bfloat16 x may take the native GEMM
def test_fallback_tiles_match_the_whole_layer_product(monkeypatch, dtype):
    """More than 16 rows without the native GEMM: the forward takes W a tile of rows at a time
    (3 rows here), the backward a tile of 256 columns at a time, each tile one GEMM: within the
    GEMM's own rounding of the whole-layer products, and the gradient within the float64 bound."""
    from qengine.ops import cpu as _ops
    from support import matmul_bound

    q = qengine.quantize(torch.randn(10, 768), "nf4", 64, double_quant=True, sparsity="2:4")
    kw = q.kernel_weight()
    x = torch.randn(20, 768).to(dtype)
    g = torch.randn(20, 10).to(dtype)
    w = q.dequantize(dtype)
    monkeypatch.setattr(_ops, "DENSE_TILE_BYTES", 3 * 768 * x.element_size())
    monkeypatch.setattr(_ops, "MIN_TILE_COLUMNS", 64)  # below the layout's 256: tiles stay whole chunks
    y = qengine.matmul(x, q)
    gx = torch.ops.qengine.sparse24_matmul_t(g, kw.packed, kw.positions, kw.table, kw.scales, kw.nested, kw.offsets,
                                             kw.bits, kw.blocksize, 768)
    tol = 1e-5 if dtype == torch.float32 else 2.0**-10
    assert torch.allclose(y.float(), (x @ w.t()).float(), rtol=tol, atol=tol * 10)
    assert torch.allclose(gx.float(), (g @ w).float(), rtol=tol, atol=tol * 10)
    g64, w64 = g.to(torch.float64), w.to(torch.float64)  # the weights the fallback multiplies, in dtype
    assert ((gx.to(torch.float64) - g64 @ w64).abs() <= matmul_bound(g64, w64.t(), dtype)).all()


@pytest.mark.parametrize("isa", SUPPORTED)
def test_dequantize_every_isa(isa, isa_restore):
    qengine.set_cpu_isa(isa)
    x = make_input((9, 1032), torch.float32)  # 36 full chunks (more than one batch of 32) + a tail
    for fmt, bs in (("nf4", 64), ("uint4", 4096), ("int8", 32)):
        q = qengine.quantize(x, fmt, bs, sparsity="2:4")
        for dtype in (torch.float32, torch.float16):
            assert torch.equal(q.dequantize(dtype), ref_sparse_dequantize(x, fmt, bs, False, dtype)), (fmt, dtype)


@pytest.mark.parametrize("fmt", ["nf4", "uint8"])
def test_pruned_positions_are_exact_zeros_and_kept_largest(fmt):
    x = make_input((7, 516), torch.float32)
    q = qengine.quantize(x, fmt, 64, sparsity="2:4")
    d = q.dequantize().reshape(-1, 4)
    keep = ref_keep(x)
    pruned = torch.ones_like(d, dtype=torch.bool).scatter(1, keep, False)
    assert bool((d[pruned] == 0).all()) and not bool(torch.signbit(d[pruned]).any())


def test_mask_selects_kept_values():
    x = make_input((4, 64), torch.float32)
    scores = torch.rand(x.shape).reshape(-1, 4)
    keep = scores.topk(2, dim=1).indices.sort(dim=1).values
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, keep, True).reshape(x.shape)
    q = qengine.quantize(x, "int8", 32, sparsity="2:4", mask=mask)
    assert torch.equal(q.dequantize(), ref_sparse_dequantize(x, "int8", 32, False, torch.float32, keep))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_mask_with_fewer_kept_decodes_exact_zeros(fmt):
    x = make_input((3, 64), torch.float32, "positive")
    mask = torch.rand(x.shape) < 0.3
    mask.reshape(-1, 4)[:, 2:] = False  # at most 2 a group, often fewer
    q = qengine.quantize(x, fmt_of(fmt), 32, sparsity="2:4", mask=mask)
    d = q.dequantize()
    assert bool((d[~mask] == 0).all())
    q2 = qengine.QuantizedTensor.from_state_dict(q.state_dict())
    assert torch.equal(q2.dequantize(), d)


def test_bits_per_param_nf4_double_quant():
    x = torch.randn(256, 4096)
    q = qengine.quantize(x, "nf4", 64, double_quant=True, sparsity="2:4")
    stored = x.numel() // 2
    expected = (stored // 2 + stored // 4 + 16 * 4 + q.scales.nbytes) * 8 / x.numel()
    assert q.bits_per_param == pytest.approx(expected)
    assert q.bits_per_param <= 3.3


# ---------------------------------------------------------------------------- matmul
def _bound(x, w, y_ref, weight_rel):
    """|error| bound: weight rounding (relative weight_rel) + float32 accumulation over K +
    rounding of the output to x's dtype."""
    k = x.shape[-1]
    mag = x.abs().double() @ w.abs().double().t()
    out_eps = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[x.dtype]
    return mag * (weight_rel + 4 * math.sqrt(k) * 2**-24) + y_ref.abs() * out_eps + 1e-30


@pytest.mark.parametrize("isa", SUPPORTED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 20])
def test_matmul_matches_float64(isa, dtype, m, isa_restore):
    qengine.set_cpu_isa(isa)
    w = make_input((40, 512), torch.float32)
    q = qengine.quantize(w, "nf4", 64, double_quant=True, sparsity="2:4")
    x = make_input((m, 512), dtype)
    y = qengine.matmul(x, q)
    wd = q.dequantize(torch.float32)
    y_ref = x.double() @ wd.double().t()
    # The bfloat16 GEMV rounds the table values to bfloat16 (as dense bfloat16 F.linear would);
    # more than 16 rows multiply by the weight dequantized to x's dtype.
    rel = {torch.float32: 0.0, torch.float16: 2**-11 if m > 16 else 0.0, torch.bfloat16: 2**-8}[dtype]
    assert y.dtype == dtype and y.shape == (m, 40)
    assert bool(((y.double() - y_ref).abs() <= _bound(x, wd, y_ref, rel)).all())


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_matmul_formats_and_odd_shapes(fmt):
    # [3, 12]: a tail chunk only; [33, 260]: chunks straddle rows, plus a tail.
    for shape, batch in (((3, 12), (2,)), ((33, 260), (2, 5))):
        w = make_input(shape, torch.float32)
        q = qengine.quantize(w, fmt_of(fmt), 32, sparsity="2:4")
        x = make_input((*batch, shape[1]), torch.float32)
        y = qengine.matmul(x, q)
        wd = q.dequantize()
        y_ref = x.double() @ wd.double().t()
        assert y.shape == (*batch, shape[0])
        assert bool(((y.double() - y_ref).abs() <= _bound(x, wd, y_ref, 0.0)).all())


def test_matmul_lora_and_gradients():
    w = make_input((24, 256), torch.float32)
    q = qengine.quantize(w, "nf4", 64, sparsity="2:4")
    x = make_input((3, 256), torch.float32).requires_grad_()
    a = (torch.randn(4, 256) * 0.1).requires_grad_()
    b = (torch.randn(24, 4) * 0.1).requires_grad_()
    y = qengine.matmul(x, q, lora=(a, b, 0.5))
    wd = q.dequantize().double()
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ wd.t() + 0.5 * (x64 @ a64.t()) @ b64.t()
    assert torch.allclose(y.double(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    for t, t64 in ((x, x64), (a, a64), (b, b64)):
        assert torch.allclose(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-5)


def test_opcheck_sparse_ops():
    w = make_input((8, 256), torch.float32)
    q = qengine.quantize(w, "nf4", 64, double_quant=True, sparsity="2:4")
    table = q.format.kernel_tables()[0]
    scales, nested = q._kernel_scales()
    x = torch.randn(2, 256)
    torch.library.opcheck(torch.ops.qengine.sparse24_matmul.default,
                          (x, q.packed, q.positions, table, scales, nested, None, 4, 64, 8, None, None, 0.0))
    torch.library.opcheck(torch.ops.qengine.sparse24_dequantize.default,
                          (q.packed, q.positions, table, q._block_values(q.scales), None, 4, 64, w.numel(),
                           torch.bfloat16))
    for g in (torch.randn(2, 8), torch.randn(20, 8).to(torch.bfloat16)):  # the small and large-batch paths
        torch.library.opcheck(torch.ops.qengine.sparse24_matmul_t.default,
                              (g, q.packed, q.positions, table, scales, nested, None, 4, 64, 256))


def test_compile_fullgraph():
    q = qengine.quantize(make_input((16, 256), torch.float32), "nf4", 64, sparsity="2:4")
    f = torch.compile(lambda x: qengine.matmul(x, q), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 256)
    assert torch.equal(f(x), qengine.matmul(x, q))


# ---------------------------------------------------------------------------- state dict
def test_state_dict_round_trip_and_validation():
    x = make_input((6, 520), torch.float16)
    q = qengine.quantize(x, "fp4", 64, double_quant=True, sparsity="2:4")
    sd = q.state_dict("w.")
    q2 = qengine.QuantizedTensor.from_state_dict(sd, "w.")
    assert q2.layout == "2:4" and torch.equal(q2.dequantize(), q.dequantize())
    assert q2.nbytes == q.nbytes
    bad = dict(sd)
    bad["w.positions"] = sd["w.positions"][:-1]
    with pytest.raises(ValueError, match="positions"):
        qengine.QuantizedTensor.from_state_dict(bad, "w.")
    bad["w.positions"] = torch.zeros_like(sd["w.positions"])  # both kept at position 0
    with pytest.raises(ValueError, match="positions are corrupt"):
        qengine.QuantizedTensor.from_state_dict(bad, "w.")
    del bad["w.positions"]
    with pytest.raises(ValueError, match="missing"):
        qengine.QuantizedTensor.from_state_dict(bad, "w.")
    assert torch.equal(q.dequantize(), qengine.QuantizedTensor.from_state_dict(sd, "w.").dequantize())  # unchanged


def test_pickle_deepcopy_and_to_keep_the_layout():
    import copy
    import pickle

    q = qengine.quantize(make_input((8, 256), torch.float32), "nf4", 64, double_quant=True, sparsity="2:4")
    for other in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q), q.to("cpu")):
        assert other.layout == "2:4" and torch.equal(other.positions, q.positions)
        assert torch.equal(other.dequantize(), q.dequantize())


# ---------------------------------------------------------------------------- bad input
def test_bad_input():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        qengine.quantize(x, "nf4", 64, sparsity="2:4")
    with pytest.raises(ValueError, match="sparsity"):
        qengine.quantize(torch.randn(4, 8), "nf4", 64, sparsity="1:4")
    with pytest.raises(ValueError, match="shape"):
        qengine.quantize(torch.randn(4, 8), "nf4", 64, sparsity="2:4", mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        qengine.quantize(torch.randn(4, 8), "nf4", 64, sparsity="2:4", mask=torch.ones(4, 8))
    with pytest.raises(ValueError, match="more than 2"):
        qengine.quantize(torch.randn(4, 8), "nf4", 64, sparsity="2:4", mask=torch.ones(4, 8, dtype=torch.bool))
    nan = torch.randn(4, 8)
    nan[1, 3] = float("nan")
    before = nan.clone()
    with pytest.raises(ValueError, match="NaN"):
        qengine.quantize(nan, "nf4", 64, sparsity="2:4")
    assert torch.equal(nan.isnan(), before.isnan()) and torch.equal(nan.nan_to_num(), before.nan_to_num())
    q = qengine.quantize(torch.randn(4, 8), "nf4", 32, sparsity="2:4")
    with pytest.raises(ValueError, match="in_features"):
        qengine.matmul(torch.randn(2, 6), q)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["nf4", "uint8", "cb5"])
def test_cuda_dequantize_matches_cpu(fmt):
    x = make_input((33, 260), torch.float32)
    q = qengine.quantize(x, fmt_of(fmt), 32, double_quant=True, sparsity="2:4")
    qc = q.to("cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(qc.dequantize(dtype).cpu(), q.dequantize(dtype))
    xs = torch.randn(3, 260)
    y_ref = xs.double() @ q.dequantize().double().t()
    assert torch.allclose(qengine.matmul(xs.cuda(), qc).cpu().double(), y_ref, rtol=1e-4, atol=1e-4)
