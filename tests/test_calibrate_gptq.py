"""qengine.calibrate.gptq_quantize: lower output error than round-to-nearest on held-out
inputs in every format, RTN's layout and bytes, agreement with a slow float64 GPTQ written
here (the OBQ form: the inverse Hessian of the remaining columns updated one column at a time,
no Cholesky factor, no lazy batches), bitsandbytes export, act_order, and bad input."""

from __future__ import annotations

import pytest
import torch

import qengine
import reference as ref
from cases import FORMAT_NAMES, fmt_of
from qengine.calibrate import gptq_quantize
from qengine.compat import from_bnb_state_dict, to_bnb_state_dict

BLOCKSIZES = [32, 64, 128, None]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The sweep is a few thousand small ops; on a loaded 2-core machine each one that torch
    splits across threads waits ~10 ms for a descheduled worker (measured: 0.04 s per layer on
    one thread, 0.1-0.5 s on two). One thread keeps this file fast; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(cols: int, samples: int, mix: torch.Tensor) -> torch.Tensor:
    """X = Z @ L: inputs whose channels are correlated (and of unequal energy) through `mix`."""
    return torch.randn(samples, cols, dtype=torch.float64) @ mix


def make_layer(rows: int = 96, cols: int = 256, samples: int = 1024):
    """(w float32 [rows, cols], H = X^T X from calibration inputs, held-out inputs)."""
    mix = torch.randn(cols, cols, dtype=torch.float64) / cols**0.5 + 0.3 * torch.eye(cols, dtype=torch.float64)
    calib, held_out = correlated_inputs(cols, samples, mix), correlated_inputs(cols, samples, mix)
    w = (torch.randn(rows, cols) * torch.exp(0.3 * torch.randn(rows, 1))).contiguous()
    return w, calib.T @ calib, held_out


def output_error(x: torch.Tensor, w: torch.Tensor, q: qengine.QuantizedTensor) -> float:
    return float((x @ (w.double() - q.dequantize(torch.float32).double()).T).norm())


def same_layout(a: qengine.QuantizedTensor, b: qengine.QuantizedTensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k
    assert sa["quant_meta"].tolist() == sb["quant_meta"].tolist()
    assert a.bits_per_param == b.bits_per_param and a.nbytes == b.nbytes
    assert (a.shape, a.dtype, a.blocksize, a.per_row, a.double_quant) == (b.shape, b.dtype, b.blocksize, b.per_row,
                                                                           b.double_quant)


# ---------------------------------------------------------------------------- float64 reference
def ref_codes(x: torch.Tensor, scale: torch.Tensor, offset, partial: torch.Tensor, f: ref.RefFormat) -> torch.Tensor:
    """Codes of float32 x [n] for per-element block parameters, by the spec in reference.py."""
    div = torch.where(scale.abs() >= ref.MIN_DIV, scale, ref.MIN_DIV)
    centred = x - offset if f.rule == "minmax" else x
    v = torch.where(partial, centred / div, centred * (torch.ones_like(div) / div))
    return ref.nearest_codes(v, f.values).long()


def ref_decode(codes, scale, offset, f: ref.RefFormat) -> torch.Tensor:
    prod = f.values[codes].double() * scale.double()
    return ref.fma_to_float32(prod, offset.double()) if f.rule == "minmax" else prod.float()


def ref_params(x: torch.Tensor, partial: bool, rule: str):
    x = x.float()
    if rule == "minmax":
        return x.max() - x.min(), x.min()
    a = x.abs().max()
    return (torch.maximum(a, ref.MIN_DIV) if partial else a), torch.zeros(())


def reference_gptq(w, H, fmt, blocksize, damp=0.01, double_quant=False, act_order=False):
    """(codes [rows, cols], chosen weights float32 [rows, cols]): GPTQ in float64, column by
    column. Natural order: a block's scale is fixed from the current weights when the sweep
    first reaches one of its columns. act_order: scales from the original weights, columns in
    decreasing H_jj. Double quant: the scales of the original weights nested by the reference's
    own double quantization, then a sweep with the decoded scales."""
    f = ref.RefFormat.of(fmt)
    rows, cols = w.shape
    bs = cols if blocksize is None else blocksize
    n = rows * cols
    nb = -(-n // bs)
    partial = [b == nb - 1 and n % bs != 0 for b in range(nb)]
    H = H.double().clone()
    order = torch.argsort(H.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(cols))
    d = H.diagonal()
    d[d == 0] = 1.0
    d += damp * d.mean()

    def block(flat, b):
        return flat[b * bs:min((b + 1) * bs, n)]

    def static(flat):
        ps = [ref_params(block(flat, b), partial[b], f.rule) for b in range(nb)]
        return torch.stack([p[0] for p in ps]), torch.stack([p[1] for p in ps])

    def sweep(fixed):
        W = w.double().clone()
        scales, offsets = fixed if fixed is not None else (torch.zeros(nb), torch.zeros(nb))
        done = set(range(nb)) if fixed is not None else set()
        codes = torch.zeros(rows, cols, dtype=torch.int64)
        chosen = torch.zeros(rows, cols)
        Hinv = torch.linalg.inv(H[order][:, order])
        for step, j in enumerate(order):
            ids = (torch.arange(rows) * cols + j) // bs
            for b in ids.unique().tolist():
                if b not in done:
                    scales[b], offsets[b] = ref_params(block(W.reshape(-1), b), partial[b], f.rule)
                    done.add(b)
            s, o, p = scales[ids], offsets[ids], torch.tensor([partial[b] for b in ids.tolist()])
            q = ref_codes(W[:, j].float(), s, o, p, f)
            chosen[:, j] = ref_decode(q, s, o, f)
            codes[:, j] = q
            err = W[:, j] - chosen[:, j].double()
            rest = order[step + 1:]
            W[:, rest] -= err[:, None] * (Hinv[0, 1:] / Hinv[0, 0])[None, :]
            Hinv = Hinv[1:, 1:] - Hinv[1:, :1] @ Hinv[:1, 1:] / Hinv[0, 0]
        return codes, chosen, scales, offsets

    fixed = static(w.reshape(-1)) if act_order or double_quant else None
    if double_quant:
        s, o = fixed
        fixed = (ref.nest(s).values, ref.nest(o).values if f.rule == "minmax" else o)
    codes, chosen, _, _ = sweep(fixed)
    return codes, chosen


def unpack_codes(q: qengine.QuantizedTensor) -> torch.Tensor:
    return ref.unpack(q.packed, q.format.bits, q.numel).long().reshape(q.shape)


# ---------------------------------------------------------------------------- quality
@pytest.fixture(scope="module")
def layer():
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        return make_layer()
    finally:
        torch.random.set_rng_state(gen_state)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_gptq_beats_rtn_on_held_out_inputs(layer, fmt, blocksize, double_quant):
    w, H, held_out = layer
    rtn = qengine.quantize(w, fmt_of(fmt), blocksize, double_quant)
    q = gptq_quantize(w, H, fmt_of(fmt), blocksize, double_quant)
    same_layout(q, rtn)
    # Measured on this layer (ratio to RTN's error): 0.74-0.77 for nf4, fp4, int4, uint4 and the
    # 8-bit tables without double quant, 0.77-0.82 for cb5 (5 values), 0.31-0.69 for the 8-bit
    # tables with double quant (RTN picks their codes before the scales are nested).
    assert output_error(held_out, w, q) < 0.85 * output_error(held_out, w, rtn)


@pytest.mark.parametrize("blocksize", [32, 64, None])
@pytest.mark.parametrize("fmt", ["nf4", "uint4", "int8"])
def test_gptq_beats_rtn_when_blocks_cross_rows(fmt, blocksize):
    # 250 columns: blocks of 32 and 64 run from one row into the next (qengine's blocks are
    # runs over the flat tensor), and the last block is partial.
    w, H, held_out = make_layer(rows=37, cols=250, samples=600)
    for kwargs in ({}, {"act_order": True}, {"search": True}):
        q = gptq_quantize(w, H, fmt, blocksize, **kwargs)
        rtn = qengine.quantize(w, fmt, blocksize)
        same_layout(q, rtn)
        assert output_error(held_out, w, q) < 0.9 * output_error(held_out, w, rtn), kwargs


@pytest.mark.parametrize("fmt", ["nf4", "int4", "uint4"])
def test_act_order_and_search_beat_rtn(layer, fmt):
    w, H, held_out = layer
    for dq in (False, True):
        rtn = output_error(held_out, w, qengine.quantize(w, fmt, 64, dq))
        for kwargs in ({"act_order": True}, {"search": True}, {"act_order": True, "search": True}):
            q = gptq_quantize(w, H, fmt, 64, dq, **kwargs)
            assert output_error(held_out, w, q) < 0.85 * rtn, (dq, kwargs)


# ---------------------------------------------------------------------------- exactness
CASES = [  # (format, blocksize, rows, cols, block_columns)
    ("nf4", 64, 24, 96, 32),  # blocks wider than a lazy batch
    ("int4", 32, 24, 96, 128),
    ("uint4", None, 24, 96, 16),
    ("cb5", 32, 13, 70, 16),  # blocks crossing rows, a partial last block, batches ending early
    ("cb200", 64, 9, 50, 8),
    ("fp4", 128, 10, 64, 16),  # blocks of two rows each
]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt,blocksize,rows,cols,block_columns", CASES)
def test_gptq_matches_float64_reference(fmt, blocksize, rows, cols, block_columns, act_order, double_quant):
    w, H, _ = make_layer(rows, cols, samples=4 * cols)
    q = gptq_quantize(w, H, fmt_of(fmt), blocksize, double_quant, act_order=act_order,
                      block_columns=block_columns, compute_dtype=torch.float64)
    codes, chosen = reference_gptq(w, H, fmt_of(fmt), blocksize, double_quant=double_quant, act_order=act_order)
    assert torch.equal(unpack_codes(q), codes)
    assert ref.same_bits(q.dequantize(torch.float32), chosen)
    # The float32 sweep drifts by rounding only: nearly every code agrees.
    q32 = gptq_quantize(w, H, fmt_of(fmt), blocksize, double_quant, act_order=act_order,
                        block_columns=block_columns)
    assert (unpack_codes(q32) != codes).float().mean() < 0.01


def test_lazy_batch_size_changes_nothing():
    w, H, _ = make_layer(40, 200, samples=800)
    qs = [gptq_quantize(w, H, "nf4", 64, block_columns=b, compute_dtype=torch.float64) for b in (1, 7, 64, 128, 500)]
    for q in qs[1:]:
        assert torch.equal(q.packed, qs[0].packed) and torch.equal(q.scales, qs[0].scales)


# (shape, dtype, blocksize, act_order): blocks crossing rows, partial last blocks, blocks of
# several rows, per-row, a padding nibble, half-precision inputs.
RTN_CASES = [((37, 250), torch.float32, 32, False), ((37, 250), torch.float32, 32, True),
             ((37, 250), torch.float32, 128, False), ((37, 250), torch.bfloat16, 4096, False),
             ((37, 250), torch.float16, None, True), ((5, 7), torch.float32, 32, False),
             ((3, 1), torch.bfloat16, None, False), ((96, 256), torch.float32, 64, True)]


@pytest.mark.parametrize("fmt", FORMAT_NAMES + ["dynamic8"])
def test_no_error_feedback_reproduces_rtn_bytes(fmt):
    # A diagonal H decouples the columns (U is diagonal): no error reaches other columns, so
    # GPTQ must store exactly what round-to-nearest stores, for every format and block size.
    for shape, dtype, bs, act_order in RTN_CASES:
        w = torch.randn(shape).to(dtype)
        H = torch.diag(torch.rand(shape[1], dtype=torch.float64) + 0.1)
        rtn = qengine.quantize(w, fmt_of(fmt), bs)
        q = gptq_quantize(w, H, fmt_of(fmt), bs, act_order=act_order)
        a, b = q.state_dict(), rtn.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), (shape, dtype, bs, act_order)


@pytest.mark.parametrize("fmt", ["nf4", "uint4", "cb200"])
def test_no_error_feedback_with_double_quant(fmt):
    # Double quant: the nested scales are RTN's own, bit for bit; each code is the nearest for
    # the scale the kernels decode (RTN picks it for the scale before nesting).
    w = torch.randn(40, 192)
    H = torch.diag(torch.rand(192, dtype=torch.float64) + 0.1)
    rtn = qengine.quantize(w, fmt_of(fmt), 64, True)
    q = gptq_quantize(w, H, fmt_of(fmt), 64, True)
    a, b = q.state_dict(), rtn.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if k != "packed")
    f = ref.RefFormat.of(fmt_of(fmt))
    s = rtn.scales.values().repeat_interleave(64)
    o = rtn.offsets.values().repeat_interleave(64) if rtn.offsets is not None else None
    want = ref_codes(w.reshape(-1), s, o, torch.zeros(w.numel(), dtype=torch.bool), f)
    assert torch.equal(unpack_codes(q).reshape(-1), want)
    assert (q.dequantize() - w).norm() <= (rtn.dequantize() - w).norm()


# ---------------------------------------------------------------------------- kernels and exports
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_bitsandbytes_export_round_trip(layer, fmt, double_quant):
    w, H, held_out = layer
    q = gptq_quantize(w, H, fmt, 64, double_quant, act_order=True)
    back = from_bnb_state_dict(to_bnb_state_dict(q))
    assert torch.equal(back.dequantize(), q.dequantize())
    x = held_out[:5].float()
    torch.testing.assert_close(qengine.matmul(x, q), x @ q.dequantize().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_state_dict_round_trip(layer, act_order):
    w, H, _ = layer
    q = gptq_quantize(w.to(torch.bfloat16), H.float(), "uint4", None, True, act_order=act_order)
    back = qengine.QuantizedTensor.from_state_dict(q.state_dict())
    assert torch.equal(back.dequantize(), q.dequantize()) and back.dtype == torch.bfloat16 and back.per_row


# ---------------------------------------------------------------------------- bad input
def test_bad_hessian_is_refused_and_inputs_unchanged():
    w, H, _ = make_layer(8, 32, samples=64)
    w0, H0 = w.clone(), H.clone()
    with pytest.raises(ValueError, match=r"shape \(32, 32\)"):
        gptq_quantize(w, H[:31, :31], "nf4", 32)
    with pytest.raises(TypeError, match="float32 or float64"):
        gptq_quantize(w, H.to(torch.float16), "nf4", 32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        gptq_quantize(w, H.tolist(), "nf4", 32)
    bad = H.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, bad, "nf4", 32)
    with pytest.raises(ValueError, match="symmetric"):
        gptq_quantize(w, H + torch.triu(torch.ones_like(H)) * H.diagonal().max(), "nf4", 32)
    with pytest.raises(ValueError, match="negative diagonal"):
        gptq_quantize(w, -H, "nf4", 32)
    assert torch.equal(w, w0) and torch.equal(H, H0)


@pytest.mark.parametrize("shape", [(1, 64), (64, 1), (1, 1)])
def test_weight_is_never_modified(shape):
    # A 1-row weight's transpose is contiguous already: the sweep must still work on a copy.
    w = torch.randn(shape)
    x = torch.randn(4 * shape[1] + 8, shape[1], dtype=torch.float64)
    w0 = w.clone()
    for kwargs in ({}, {"act_order": True}, {"double_quant": True, "search": True}):
        q = gptq_quantize(w, x.T @ x, "nf4", None, **kwargs)
        assert torch.equal(w, w0) and q.shape == w.shape


def test_bad_arguments():
    w, H, _ = make_layer(8, 32, samples=64)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(w.reshape(-1), H, "nf4", 32)
    nan_w = w.clone()
    nan_w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(nan_w, H, "nf4", 32)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, H, "nf4", 32, damp=-0.1)
    with pytest.raises(ValueError, match="block_columns"):
        gptq_quantize(w, H, "nf4", 32, block_columns=0)
    with pytest.raises(TypeError, match="compute_dtype"):
        gptq_quantize(w, H, "nf4", 32, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="blocksize"):
        gptq_quantize(w, H, "nf4", 48)
    with pytest.raises(ValueError, match="unknown format"):
        gptq_quantize(w, H, "nf5", 32)
    with pytest.raises(TypeError, match="act_order"):
        gptq_quantize(w, H, "nf4", 32, act_order=1)


def test_singular_hessian_names_damping():
    # Fewer calibration samples than inputs: X^T X is singular, and without damping the
    # Cholesky factorisation fails; the error says to increase damp. Damped, it works.
    w = torch.randn(8, 64)
    x = torch.randn(16, 64, dtype=torch.float64)
    H = x.T @ x
    with pytest.raises(ValueError, match="Increase damp"):
        gptq_quantize(w, H, "nf4", 32, damp=0.0)
    not_psd = torch.eye(64, dtype=torch.float64) + 0.9 * (torch.ones(64, 64, dtype=torch.float64) - torch.eye(64))
    not_psd[0, 1] = not_psd[1, 0] = -0.9
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, not_psd, "nf4", 32, damp=0.0)
    q = gptq_quantize(w, H, "nf4", 32)
    assert output_error(x, w, q) < output_error(x, w, qengine.quantize(w, "nf4", 32))


def test_dead_inputs_are_rounded_to_nearest():
    # Inputs that were always zero in calibration (H_jj = 0, zero row and column): their
    # weights are kept and rounded to nearest (per row: one scale, RTN's), the rest still
    # compensate, and the factorisation needs no extra damping.
    w, H, held_out = make_layer(16, 96, samples=400)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[[3, 40, 41, 95]] = True
    H[dead] = 0
    H[:, dead] = 0
    q = gptq_quantize(w, H, "int4", None, damp=0.0)
    rtn = qengine.quantize(w, "int4", None)
    assert torch.equal(q.scales, rtn.scales)
    assert torch.equal(q.dequantize()[:, dead], rtn.dequantize()[:, dead])
    live = held_out.clone()
    live[:, dead] = 0
    assert output_error(live, w, q) < 0.85 * output_error(live, w, rtn)


@pytest.mark.parametrize("fmt", ["fp8_e4m3"])
def test_calibrated_methods_refuse_formats_with_their_own_rules(fmt):
    # fp8_e4m3's codes are the minifloat's own bits, with no block scale to choose: a
    # block-scale method would store something else under the format's name. (mxfp4 and nvfp4
    # are calibrated on their own scale grids: test_calibrate_microscaling.py.)
    w = torch.randn(16, 128)
    with pytest.raises(ValueError, match="method 'rtn'"):
        gptq_quantize(w, torch.eye(128), fmt, 32)
    with pytest.raises(ValueError, match="method 'rtn'"):
        qengine.calibrate.search_scales(w, fmt, 32)
