"""mxfp4 (OCP MX v1.0) and nvfp4 (NVIDIA): decode against the specs' definitions written here in
float64 (E2M1, E8M0 and E4M3 decoded from their bits), the quantizers against a float64
reference quantizer written here, every kernel against float64, every ISA against the scalar
bytes, state round trips, bits per parameter, and MXFP4 codes/exponents equal to the gguf
package's quantizer."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch

import qengine
from qengine.nn import QuantLinear
from reference import e4m3

FORMATS = ("mxfp4", "nvfp4")
ISAS = qengine.build_info()["supported_cpu_isas"]


# ------------------------------------------------------------------ the specs, from bits, in float64
def e2m1(code: int) -> float:
    """OCP MX v1.0 FP4 E2M1: sign bit 3, 2 exponent bits (bias 1), 1 mantissa bit, no inf/NaN."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    mag = (m / 2) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -mag if s else mag


def e8m0(code: int) -> float:
    """OCP E8M0: 2**(code - 127); 0xff is NaN."""
    return math.nan if code == 255 else 2.0 ** (code - 127)


E2M1 = [e2m1(c) for c in range(16)]
E2M1_POS = sorted(set(abs(v) for v in E2M1))
E4M3_POS = [e4m3(c) for c in range(127)]


def codes_of(q) -> torch.Tensor:
    p = q.packed.to(torch.int64)
    return torch.stack([p >> 4, p & 15], 1).reshape(-1)[: q.numel]


def decode64(q) -> torch.Tensor:
    """The weight from q's bytes by the specs, in float64."""
    inner = q.scales.quantized
    sc = inner.packed.to(torch.int64).tolist()
    if q.format.name == "mxfp4":
        scale = torch.tensor([e8m0(c) for c in sc], dtype=torch.float64)
    else:  # float32 e4m3 * tensor scale (one rounding), then the element in float64
        g = inner.scales.to(torch.float64)[0]
        scale = (torch.tensor([e4m3(c) for c in sc], dtype=torch.float64) * g).to(torch.float32).to(torch.float64)
    el = torch.tensor(E2M1, dtype=torch.float64)[codes_of(q)]
    return (el * scale.repeat_interleave(q.blocksize)[: q.numel]).reshape(q.shape)


def rne(v: float, grid: list[float]) -> int:
    """Index of v (>= 0) in the sorted grid: nearest, ties to the even index, saturating."""
    if v >= grid[-1]:
        return len(grid) - 1
    for i in range(len(grid) - 1):
        lo, hi = grid[i], grid[i + 1]
        if v < hi:
            mid = (lo + hi) / 2
            if v < mid:
                return i
            if v > mid:
                return i + 1
            return i if i % 2 == 0 else i + 1
    return len(grid) - 1


def ref_quantize(x: torch.Tensor, fmt: str):
    """(element codes, scale codes, tensor scale) by the definitions, in float64, scalar by scalar."""
    bs = 32 if fmt == "mxfp4" else 16
    flat = x.reshape(-1).to(torch.float32).tolist()
    flat += [0.0] * (-len(flat) % bs)
    g = 1.0
    if fmt == "nvfp4":
        amax_t = max(abs(v) for v in flat)
        g = float(torch.tensor(amax_t, dtype=torch.float32) / 2688.0) if amax_t > 0 else 1.0
    codes, scodes = [], []
    for b in range(0, len(flat), bs):
        blk = flat[b:b + bs]
        amax = max(abs(v) for v in blk)
        if fmt == "mxfp4":
            sc = 0 if amax == 0 else max(-127, math.floor(math.log2(amax)) - 2) + 127
            scale = 2.0 ** (sc - 127)
        else:
            sc = rne(amax / 6 / g, E4M3_POS)
            scale = float(torch.tensor(E4M3_POS[sc], dtype=torch.float32) * torch.tensor(g, dtype=torch.float32))
        scodes.append(sc)
        for v in blk:
            r = v / scale if scale > 0 else 0.0 * v
            c = rne(abs(r), E2M1_POS)  # codes 0..7 are the sorted magnitudes
            codes.append(c | (8 if math.copysign(1.0, r) < 0 else 0))
    return codes[: x.numel()], scodes, g


# ------------------------------------------------------------------ decode and quantizer
def test_tables_are_the_specs():
    fmts = {n: qengine.formats.get_format(n) for n in ("mxfp4", "nvfp4", "_e8m0", "_e4m3")}
    for n in FORMATS:
        assert [math.copysign(1, v) * abs(v) for v in fmts[n].values] == E2M1
        assert [math.copysign(1, v) for v in fmts[n].values] == [math.copysign(1, v) for v in E2M1]
    assert list(fmts["_e8m0"].values) == [e8m0(c) for c in range(255)]
    assert list(fmts["_e4m3"].values) == E4M3_POS
    assert E4M3_POS[-1] == 448.0 and e4m3(0x7F) != e4m3(0x7F)


def _cases():
    g = torch.Generator().manual_seed(3)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
                         -6.0] * 2) * 2.0  # amax 12 -> scale 2: every E2M1 midpoint, both signs
    tiny = torch.randn(64, generator=g) * 1e-39  # subnormal blocks (E8M0 clamps at 2**-127)
    mixed = torch.randn(33 * 7, generator=g) * torch.logspace(-30, 30, 33 * 7)
    zero_blocks = torch.zeros(96)
    zero_blocks[40] = -3.0
    zero_blocks[70] = -0.0
    return {"randn": torch.randn(37, 40, generator=g), "ties": ties, "tiny": tiny, "mixed": mixed,
            "huge": torch.randn(64, generator=g) * 1e38, "zero_blocks": zero_blocks, "neg_zero": -torch.zeros(48),
            "odd": torch.randn(7, 13, generator=g)}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(_cases()))
def test_quantizer_matches_reference(fmt, case):
    x = _cases()[case]
    q = qengine.quantize(x, fmt)
    codes, scodes, g = ref_quantize(x, fmt)
    assert codes_of(q).tolist() == codes
    assert q.scales.quantized.packed.tolist() == scodes
    assert float(q.scales.quantized.scales[0]) == (1.0 if fmt == "mxfp4" else g)
    # qengine's float32 decode equals the specs' float64 decode (rounded once to float32)
    dec = q.dequantize(torch.float32)
    ref = decode64(q)
    if fmt == "mxfp4":
        assert torch.equal(dec.view(torch.int32), ref.to(torch.float32).view(torch.int32))
    else:  # e2m1 * (e4m3 * g): 3 and 1.5 round once more than the float64 product
        assert torch.allclose(dec.to(torch.float64), ref, rtol=2 ** -23, atol=0)


def test_ties_round_to_even_and_saturate():
    q = qengine.quantize(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.9] + [0.0] * 24), "mxfp4")
    # amax 5.9 -> scale 1: ties to 0, 1, 1, 2, 2, 4, 4; 5.9 -> 6
    assert q.dequantize()[:8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    q = qengine.quantize(torch.tensor([7.9] + [0.0] * 31), "mxfp4")  # amax/scale in [4, 8): 7.9 saturates at 6
    assert q.dequantize()[0].item() == 6.0
    q = qengine.quantize(torch.tensor([-1e-9, -6.0] + [0.0] * 30), "mxfp4")
    assert math.copysign(1, q.dequantize()[0].item()) == -1.0  # the sign of a tiny negative is kept


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_input(fmt):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or Inf"):
            qengine.quantize(torch.tensor([1.0, bad]), fmt)
    with pytest.raises(ValueError, match="block size"):
        qengine.quantize(torch.randn(64), fmt, blocksize=128)


def test_mxfp4_equals_gguf_quantizer():
    quants = pytest.importorskip("gguf.quants")
    gguf = pytest.importorskip("gguf")
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 256, generator=g)
    raw = quants.quantize(w.numpy(), gguf.GGMLQuantizationType.MXFP4)  # [64, 256/32 * 17] bytes
    blocks = torch.from_numpy(raw.copy()).reshape(-1, 17)
    exps = blocks[:, 0].to(torch.int64)
    qs = blocks[:, 1:].to(torch.int64)
    gcodes = torch.cat([qs & 15, qs >> 4], 1).reshape(-1)  # gguf: low nibbles first, then high
    q = qengine.quantize(w, "mxfp4")
    assert torch.equal(q.scales.quantized.packed.to(torch.int64), exps)
    # gguf's kvalues are E2M1 doubled in the same bit order; a zero may differ in sign (gguf's
    # argmin picks +0), a tie picks gguf's first index (none in these weights): compare values
    assert torch.equal(torch.tensor(E2M1)[codes_of(q)], torch.tensor(E2M1)[gcodes])


# ------------------------------------------------------------------ kernels
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(48, 256), (33, 80), (7, 1024)])
def test_kernels_against_float64(fmt, shape):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g)
    q = qengine.quantize(w, fmt)
    w64 = decode64(q)
    for dtype in DTYPES:
        assert torch.allclose(q.dequantize(dtype).to(torch.float64), w64, rtol=2 ** -7, atol=0)
        for m in (1, 3, 16, 40):
            x = torch.randn(m, shape[1], generator=g).to(dtype)
            a = torch.randn(4, shape[1], generator=g).to(dtype) * 0.1
            b = torch.randn(shape[0], 4, generator=g).to(dtype) * 0.1
            for lora in (None, (a, b, 0.5)):
                ref = x.to(torch.float64) @ w64.T
                if lora is not None:
                    ref = ref + 0.5 * (x.to(torch.float64) @ a.to(torch.float64).T) @ b.to(torch.float64).T
                y = qengine.matmul(x, q, lora=lora).to(torch.float64)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                assert (y - ref).abs().max() <= tol * ref.abs().max() + tol, (dtype, m, lora is None)
    x = torch.randn(5, shape[1], generator=g, requires_grad=True)
    qengine.matmul(x, q).sum().backward()  # matmul_t
    assert torch.allclose(x.grad.to(torch.float64), w64.sum(0).expand(5, -1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_rows_longer_than_a_tile(dtype, isa_restore):
    """The fused GEMV's K tile holds 256 block scales: 32 chunks of 128 codes at NVFP4's block 16,
    so rows of 66 chunks take three tiles whose partial sums must add up, on every ISA."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(24, 66 * 128, generator=g)
    q = qengine.quantize(w, "nvfp4")
    w64 = decode64(q)
    x = torch.randn(3, w.shape[1], generator=g).to(dtype)
    ref = x.to(torch.float64) @ w64.T
    for isa in ISAS:
        qengine.set_cpu_isa(isa)
        y = qengine.matmul(x, q).to(torch.float64)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert (y - ref).abs().max() <= tol * ref.abs().max() + tol, isa


def _table_read_twin(kw):
    """kw with its nested mean -0.0 instead of +0.0: the same scales to the bit (adding -0.0
    changes no value, and +0.0 + -0.0 is +0.0), but the kernels then read the table (computed
    scales need a +0.0 mean)."""
    table, absmax, mean, nbs = kw.nested
    assert float(mean) == 0.0 and not math.copysign(1.0, float(mean)) < 0
    return kw._replace(nested=[table, absmax, torch.full_like(mean, -0.0), nbs])


@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize("fmt, uncovered", [("nvfp4", 0x90), ("mxfp4", 0xFF)])
def test_computed_scales_equal_the_table(fmt, uncovered, flush_denormal, isa_restore):
    """The fused GEMV computes NVFP4's E4M3 and MXFP4's E8M0 block scales from their codes
    (simd_avx512.h, ComputedScales) instead of reading the table: outputs equal, bit for bit,
    those of the same weight with the nested mean -0.0 (the table read, by VBMI bulk decode or
    gathers), on rows whose scales reach the subnormal codes and zero, over three K tiles, 1 to
    16 rows of x; also where a row holds a scale code the computation does not cover (a
    negative E4M3, E8M0's NaN code: that row reads the table) and with denormal inputs flushed
    (the computed scales need them kept)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 66 * 128, generator=g) * torch.logspace(-7, 1, 40).unsqueeze(1)
    w[3, 64:128] = 0.0  # all-zero blocks: scale code 0 (E8M0's subnormal 2**-127)
    kw = qengine.quantize(w, fmt).kernel_weight()
    assert (kw.scales == 0).any() and (fmt == "mxfp4" or ((kw.scales > 0) & (kw.scales < 8)).any())
    codes = kw.scales.clone()
    codes[5 * codes.numel() // 40 + 17] = uncovered  # in row 5
    odd = kw._replace(scales=codes)
    try:
        torch.set_flush_denormal(flush_denormal)
        for isa in ISAS:
            qengine.set_cpu_isa(isa)
            for weight in (kw, odd):
                twin = _table_read_twin(weight)
                for m in (1, 3, 8, 16):
                    for dtype in (torch.float32, torch.bfloat16):
                        x = torch.randn(m, w.shape[1], generator=g).to(dtype)
                        with torch.no_grad():
                            assert torch.equal(weight.matmul(x), twin.matmul(x)), (isa, m, dtype)
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_isas_equal_scalar(fmt, isa_restore):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(64, 512, generator=g)
    q = qengine.quantize(w, fmt)
    outs = {}
    for isa in ISAS:
        qengine.set_cpu_isa(isa)
        got = [qengine.quantize(w, fmt).packed, q.dequantize(torch.bfloat16).view(torch.int16)]
        for dtype in DTYPES:
            for m in (1, 5, 24):
                x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(dtype)
                got.append(qengine.matmul(x, q))
        outs[isa] = got
    base = outs["scalar"]
    for isa, got in outs.items():
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]), isa
        # Kernels sum in their own order, and bfloat16 x on AVX512-BF16 / AMX multiplies weights
        # rounded to bfloat16 (as dense bfloat16 F.linear): close to the magnitude of the sum
        # (half a bfloat16 unit of each weight, of each output), not equal.
        for (dtype, m), a, b in zip([(d, m) for d in DTYPES for m in (1, 5, 24)], got[2:], base[2:]):
            x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(dtype).float()
            mag = x.abs() @ q.dequantize().abs().t()
            assert ((a.float() - b.float()).abs() <= 2.0**-9 * mag + 2.0**-8 * b.float().abs() + 1e-6).all(), isa


# ------------------------------------------------------------------ state
@pytest.mark.parametrize("fmt", FORMATS)
def test_state_round_trips(fmt):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    layer = QuantLinear.from_linear(lin, format=fmt)
    x = torch.randn(3, 96)
    y = layer(x)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = QuantLinear(96, 40, format=fmt)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), y)
    assert fresh.quantized().scales.quantized.format.name == qengine.formats.get_format(fmt).scale_format
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), y)
    assert torch.equal(layer.to("cpu")(x), y)
    q = layer.quantized()
    q2 = type(q).from_state_dict(q.state_dict())
    assert torch.equal(q2.dequantize(), q.dequantize()) and q2.format.name == fmt
    with pytest.raises(ValueError, match="bitsandbytes"):
        layer.to_bnb_state_dict()
    # a scale byte outside the encoding (E8M0 0xff is NaN; E4M3 >= 0x7f NaN or negative)
    sd = q.state_dict()
    sd["scales.nested.packed"] = sd["scales.nested.packed"].clone()
    sd["scales.nested.packed"][0] = 255
    with pytest.raises(ValueError, match="codebook"):
        type(q).from_state_dict(sd)


def test_old_double_quant_state_dicts_still_load():
    q = qengine.quantize(torch.randn(64, 64), "nf4", 64, double_quant=True)
    assert type(q).from_state_dict(q.state_dict()).scales.quantized.format.name == "dynamic8"


@pytest.mark.parametrize("fmt, bits", [("mxfp4", 4.25), ("nvfp4", 4.5)])
def test_bits_per_param(fmt, bits):
    q = qengine.quantize(torch.randn(256, 512), fmt)
    extra = 0 if fmt == "mxfp4" else 32 / q.numel  # nvfp4's float32 tensor scale
    assert q.bits_per_param == bits + extra
    from qengine.cli.info import bits_per_param
    assert bits_per_param(q.format, (256, 512), 64, True) == q.bits_per_param


def test_quantize_model():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    x = torch.randn(2, 64)
    ref = model(x)
    qengine.quantize_model(model, format="nvfp4")
    assert isinstance(model[0], QuantLinear) and model[0].format.name == "nvfp4"
    assert (model(x) - ref).abs().max() < 0.1
