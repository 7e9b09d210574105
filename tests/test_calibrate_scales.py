"""qengine.calibrate.search_scales (searched, clipped block scales) and
qengine.calibrate.fit_codebook(weights=...) (importance-weighted k-means): lower weighted
error than round-to-nearest at RTN's layout and bytes, RTN's exact bytes when the search is
reduced to RTN's own candidate, clipping through the end codes, and bad input."""

from __future__ import annotations

import pytest
import torch

import qengine
import reference as ref
from cases import FORMAT_NAMES, fmt_of
from qengine.calibrate import fit_codebook, gptq_quantize, search_scales
from qengine.calibrate._blocks import Encoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small ops (see test_calibrate_gptq.py): one thread keeps this file fast on a loaded
    2-core machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weighted_error(w: torch.Tensor, q: qengine.QuantizedTensor, h: torch.Tensor) -> float:
    d = w.double() - q.dequantize(torch.float32).double()
    return float((d * d * h.double()).sum())


def importance(cols: int) -> torch.Tensor:
    """Per-input-channel energy spread over two orders of magnitude, as activations have."""
    return torch.exp(1.5 * torch.randn(cols)).to(torch.float64)


def same_layout(a: qengine.QuantizedTensor, b: qengine.QuantizedTensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa)
    assert sa["quant_meta"].tolist() == sb["quant_meta"].tolist()
    assert a.bits_per_param == b.bits_per_param


# ---------------------------------------------------------------------------- RTN's own candidate
@pytest.mark.parametrize("fmt", FORMAT_NAMES + ["dynamic8"])
def test_ratio_one_reproduces_rtn_bytes(fmt):
    # Blocks crossing rows, a partial last block, per-row, 3-D, half precision, and a tensor
    # large enough for the bucketize path of the nearest-code search.
    for shape, dtype, bs in [((37, 250), torch.float32, 32), ((37, 250), torch.bfloat16, None),
                             ((2, 5, 63), torch.float16, 64), ((7,), torch.float32, 4096),
                             ((300, 256), torch.float32, 128)]:
        w = (torch.randn(shape) * torch.exp(torch.randn(shape))).to(dtype)
        rtn = qengine.quantize(w, fmt_of(fmt), bs)
        q = search_scales(w, fmt_of(fmt), bs, grid=(1.0,), refine=0)
        a, b = q.state_dict(), rtn.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), (shape, dtype, bs)
        # Double quant: RTN's nested state, codes nearest for the decoded scales.
        rtn = qengine.quantize(w, fmt_of(fmt), bs, True)
        q = search_scales(w, fmt_of(fmt), bs, True, grid=(1.0,), refine=0)
        a, b = q.state_dict(), rtn.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b if k != "packed"), (shape, dtype, bs)


def test_sorted_index_paths_agree_with_reference():
    for fmt in ["nf4", "fp4", "uint8", "cb200"]:
        enc = Encoder(qengine.get_format(fmt_of(fmt)), torch.device("cpu"))
        for n in (5, 3000, 70000, 300000):
            v = torch.rand(n) * 2.2 - 1.1
            v[:4] = enc.real_mids[:4]  # exact ties go down
            want = ref.nearest_codes(v, ref.RefFormat.of(fmt_of(fmt)).values).long()
            assert torch.equal(enc.order.take(enc.sorted_index(v)), want), (fmt, n)


# ---------------------------------------------------------------------------- quality
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, None])
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_search_beats_rtn(fmt, blocksize, double_quant):
    w = torch.randn(96, 256) * torch.exp(0.3 * torch.randn(96, 1))
    h = importance(256)
    rtn = qengine.quantize(w, fmt_of(fmt), blocksize, double_quant)
    for weights, hh in ((None, torch.ones(256, dtype=torch.float64)), (h, h)):
        q = search_scales(w, fmt_of(fmt), blocksize, double_quant, importance=weights)
        same_layout(q, rtn)
        # Measured: 0.55-0.97 of RTN's (8-bit tables gain least; uint8 with double quant ~0.4).
        assert weighted_error(w, q, hh) < 0.995 * weighted_error(w, rtn, hh)


def test_importance_steers_the_search():
    w = torch.randn(64, 512)
    h = importance(512)
    plain = search_scales(w, "nf4", 64)
    weighted = search_scales(w, "nf4", 64, importance=h)
    assert weighted_error(w, weighted, h) < weighted_error(w, plain, h)
    assert weighted_error(w, plain, torch.ones(512)) <= weighted_error(w, weighted, torch.ones(512))
    H = torch.diag(h) + 0.01  # the Hessian itself: its diagonal is used
    assert torch.equal(search_scales(w, "nf4", 64, importance=H).packed,
                       search_scales(w, "nf4", 64, importance=H.diagonal()).packed)


@pytest.mark.parametrize("fmt", ["nf4", "int4", "fp4"])
def test_clipped_weights_take_the_end_codes(fmt):
    # Heavy tails: the search clips (stored scale < block absmax); weights beyond the scale
    # decode to the end values, and every kernel reads the result as any other.
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    q = search_scales(w, fmt, 64)
    absmax = w.reshape(-1, 64).abs().amax(1)
    assert (q.scales < 0.999 * absmax).float().mean() > 0.5
    top = max(abs(v) for v in qengine.get_format(fmt).values)
    deq = q.dequantize().reshape(-1, 64)
    assert torch.all(deq.abs() <= q.scales[:, None] * top)
    beyond = w.reshape(-1, 64).abs() > q.scales[:, None]
    assert torch.equal(deq[beyond].abs(), (q.scales[:, None] * top).expand_as(deq)[beyond])
    x = torch.randn(3, 256)
    torch.testing.assert_close(qengine.matmul(x, q), x @ q.dequantize().T, rtol=1e-5, atol=1e-4)


def test_minmax_search_moves_the_offset():
    w = torch.rand(32, 128) ** 3  # skewed: the top of the range is sparse
    q = search_scales(w, "uint4", 64)
    rtn = qengine.quantize(w, "uint4", 64)
    assert not torch.equal(q.offsets, rtn.offsets)
    assert weighted_error(w, q, torch.ones(128)) < 0.9 * weighted_error(w, rtn, torch.ones(128))
    back = qengine.QuantizedTensor.from_state_dict(q.state_dict())
    assert torch.equal(back.dequantize(), q.dequantize())


def test_gptq_with_searched_scales():
    cols = 256
    mix = torch.randn(cols, cols, dtype=torch.float64) / cols**0.5 + 0.3 * torch.eye(cols, dtype=torch.float64)
    calib = torch.randn(1024, cols, dtype=torch.float64) @ mix
    held = torch.randn(1024, cols, dtype=torch.float64) @ mix
    w = torch.randn(96, cols)

    def err(q):
        return float((held @ (w.double() - q.dequantize().double()).T).norm())

    H = calib.T @ calib
    for fmt in ["nf4", "int4", "uint4"]:
        for dq in (False, True):
            rtn = qengine.quantize(w, fmt, None, dq)
            q = gptq_quantize(w, H, fmt, None, dq, search=True)
            same_layout(q, rtn)
            assert err(q) < 0.85 * err(rtn), (fmt, dq)


# ---------------------------------------------------------------------------- weighted k-means
def test_unit_weights_match_the_native_fit():
    w = torch.randn(64, 512)
    for bits, bs, rule in ((4, 64, "absmax"), (4, 128, "minmax"), (8, None, "absmax")):
        a = qengine.fit_codebook(w, bits, bs, rule)
        b = fit_codebook(w, bits, bs, rule, weights=torch.ones(512))
        assert b.rule == rule and b.bits == bits
        assert max(abs(x - y) for x, y in zip(a.values, b.values)) < 1e-6
    assert fit_codebook(w, 4, 64).values == qengine.fit_codebook(w, 4, 64).values  # weights=None: the native path


@pytest.mark.parametrize("blocksize", [64, None])
def test_weighted_fit_lowers_weighted_error(blocksize):
    # The important channels are uniform, the rest Laplace: an unweighted fit follows the
    # Laplace majority, a weighted one the channels that count.
    cols = 512
    w = torch.distributions.Laplace(0.0, 0.3).sample((128, cols))
    w[:, :64] = torch.rand(128, 64) * 2 - 1
    h = torch.ones(cols)
    h[:64] = 50.0
    plain = qengine.fit_codebook(w, 4, blocksize)
    weighted = fit_codebook(w, 4, blocksize, weights=h)

    def err(fmt):
        return weighted_error(w, qengine.quantize(w, fmt, blocksize), h)

    assert err(weighted) < 0.9 * err(plain)
    assert err(weighted) < err("nf4")
    # A fitted table is a format like any other: searched scales and GPTQ take it.
    q = search_scales(w, weighted, blocksize, importance=h)
    assert weighted_error(w, q, h) < err(weighted)
    back = qengine.QuantizedTensor.from_state_dict(q.state_dict())
    assert back.format.values == weighted.values and torch.equal(back.dequantize(), q.dequantize())


# ---------------------------------------------------------------------------- bad input
def test_bad_input():
    w = torch.randn(8, 64)
    w0 = w.clone()
    with pytest.raises(ValueError, match=r"importance must have shape \(64,\)"):
        search_scales(w, "nf4", 32, importance=torch.ones(63))
    with pytest.raises(ValueError, match="finite and >= 0"):
        search_scales(w, "nf4", 32, importance=-torch.ones(64))
    nan = torch.ones(64)
    nan[5] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        search_scales(w, "nf4", 32, importance=nan)
    with pytest.raises(TypeError, match="floating-point"):
        search_scales(w, "nf4", 32, importance=torch.ones(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="clipping ratios"):
        search_scales(w, "nf4", 32, grid=(1.0, 1.5))
    with pytest.raises(ValueError, match="clipping ratios"):
        search_scales(w, "nf4", 32, grid=())
    with pytest.raises(ValueError, match="refine"):
        search_scales(w, "nf4", 32, refine=-1)
    bad = w.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        search_scales(bad, "nf4", 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_codebook(bad, 4, 32, weights=torch.ones(64))
    with pytest.raises(ValueError, match="importance must have shape"):
        fit_codebook(w, 4, 32, weights=torch.ones(8))
    with pytest.raises(ValueError, match="bits"):
        fit_codebook(w, 3, 32, weights=torch.ones(64))
    assert torch.equal(w, w0)
