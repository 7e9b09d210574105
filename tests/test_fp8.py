"""fp8_e4m3 (FP8 E4M3 weight-only, scale amax / 448 per block or row): the table against E4M3
decoded from its bits here, the codes against torch's float8_e4m3fn cast and an independent
float64 round-to-nearest-even, decode against float64 and torch's own decode bit for bit, every
kernel (dequantize, matmul small and large batch, LoRA, matmul_t) against float64, bits per
parameter, state round trips, and codes with no value (NaN) refused on load."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import qengine
from qengine.nn import QuantLinear
from reference import e4m3, same_bits
from support import matmul_bound

FMT = "fp8_e4m3"
ISAS = qengine.build_info()["supported_cpu_isas"]


# ------------------------------------------------------------------ the spec, from bits, in float64
E4M3 = [e4m3(c) for c in range(256)]
POS = torch.tensor(E4M3[:127], dtype=torch.float64)  # sorted magnitudes; index = code, mantissa parity = code parity
MIDS = (POS[:-1] + POS[1:]) / 2


def rne_codes(r: torch.Tensor) -> torch.Tensor:
    """E4M3 codes (int64) of float64 r: nearest magnitude, ties to the even code, saturating at
    448, the sign bit from r's sign (-0.0 -> 0x80)."""
    v = r.abs()
    idx = torch.searchsorted(MIDS, v, side="left")  # midpoints strictly below v
    tie = (idx < len(MIDS)) & (MIDS[idx.clamp(max=len(MIDS) - 1)] == v) & (idx % 2 == 1)
    return (idx + tie.to(idx.dtype)) | (torch.signbit(r).to(torch.int64) << 7)


def reference(x: torch.Tensor, bs: int):
    """(codes uint8, scales float32, float64 decode) by the rule, written out: scale = amax / 448
    in float32, codes = torch's cast of clamp(x / scale) (0 where the scale is 0, sign kept)."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = torch.cat([flat, flat.new_zeros(-n % bs)]).reshape(-1, bs)
    scales = blocks.abs().amax(1) / torch.tensor(448.0)
    sc = scales[:, None]
    ratio = torch.where(sc > 0, blocks / torch.where(sc > 0, sc, 1.0), blocks * 0.0)
    codes = ratio.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1)[:n]
    # the same codes by an independent float64 round-to-nearest-even of the float32 quotient
    assert torch.equal(codes.to(torch.int64), rne_codes(ratio.to(torch.float64)).reshape(-1)[:n])
    dec = torch.tensor(E4M3, dtype=torch.float64)[codes.to(torch.int64)] * scales.to(torch.float64).repeat_interleave(bs)[:n]
    return codes, scales, dec.reshape(x.shape)


def cases():
    g = torch.Generator().manual_seed(3)
    # amax 448 -> scale exactly 1 (or 896 -> 2): every midpoint of E4M3 (subnormal ones too), a float32
    # step either side of it, both signs
    mids = MIDS.to(torch.float32)
    up, down = torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(0.0))
    ties = torch.cat([torch.tensor([448.0]), mids, up, down, -mids, -up, -down, torch.tensor([-0.0, 0.0])])
    ties = torch.cat([ties, ties.new_zeros(-ties.numel() % 64)])
    near_max = (448.0 - torch.rand(256, generator=g) * 40) * torch.exp2(torch.randint(-8, 8, (256,), generator=g))
    wide = torch.randn(40, 64, generator=g) * torch.logspace(-44, 37, 40)[:, None]  # float32 subnormal blocks too
    zero_blocks = torch.zeros(192)
    zero_blocks[70] = -3.0
    zero_blocks[140] = -0.0
    return {"randn": torch.randn(37, 96, generator=g), "ties": ties, "ties_x2": ties * 2, "near_max": near_max,
            "wide": wide, "tiny": torch.randn(128, generator=g) * 1e-43, "zero_blocks": zero_blocks,
            "odd": torch.randn(7, 13, generator=g)}


# ------------------------------------------------------------------ table, quantizer, decode
def test_table_is_e4m3_in_bit_order():
    fmt = qengine.get_format(FMT)
    assert fmt.bits == 8 and fmt.rule == "absmax" and len(fmt.values) == 256 and FMT in qengine.available_formats()
    torch_values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64).tolist()
    for c, v in enumerate(fmt.values):
        if c in (0x7F, 0xFF):  # NaN in the spec (and torch); the table holds 0.0, never produced
            assert math.isnan(E4M3[c]) and math.isnan(torch_values[c]) and v == 0.0
        else:
            assert v == E4M3[c] == torch_values[c] and math.copysign(1, v) == math.copysign(1, E4M3[c])
    assert max(fmt.values) == 448.0 and E4M3[1] == 2.0 ** -9


@pytest.mark.parametrize("case", list(cases()))
@pytest.mark.parametrize("bs", [32, 64, 4096, None])
def test_codes_are_torch_cast_and_decode_is_exact(case, bs):
    x = cases()[case]
    q = qengine.quantize(x, FMT, blocksize=bs)
    k = x.shape[-1] if bs is None else bs
    codes, scales, dec64 = reference(x, k)
    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, codes)
    assert same_bits(q.scales, scales)
    assert not bool(((q.packed == 0x7F) | (q.packed == 0xFF)).any())
    out = q.dequantize(torch.float32)
    assert same_bits(out, dec64.to(torch.float32))  # float64 e4m3 * scale, rounded once
    # torch's own decode of the same bytes
    mine = q.packed.view(torch.float8_e4m3fn).float()
    padded = torch.cat([mine, mine.new_zeros(-mine.numel() % k)]).reshape(-1, k)
    assert same_bits(out, (padded * q.scales[:, None]).reshape(-1)[: x.numel()].reshape(x.shape))
    for dtype in (torch.bfloat16, torch.float16):
        assert same_bits(q.dequantize(dtype), dec64.to(torch.float32).to(dtype))


def test_ties_to_even_and_saturation():
    x = torch.tensor([448.0, 432.0, 440.0, 17.0, 19.0, 2.0 ** -10, 3 * 2.0 ** -10, -(2.0 ** -10), -1e-30] + [0.0] * 23)
    q = qengine.quantize(x, FMT, blocksize=32)  # scale 1.0
    assert q.scales.tolist() == [1.0]
    # 432: 416|448 -> 448 (mantissa 6, even); 17: 16|18 -> 16; 19: 18|20 -> 20; 2**-10: 0|2**-9 -> 0;
    # 3 * 2**-10: 2**-9|2**-8 -> 2**-8; a tiny negative is -0 (0x80)
    assert q.dequantize()[:9].tolist() == [448.0, 448.0, 448.0, 16.0, 20.0, 0.0, 2.0 ** -8, -0.0, -0.0]
    assert q.packed[7].item() == 0x80 and q.packed[8].item() == 0x80
    # a scale that rounds down makes amax / scale exceed 448 by a float32 step: saturates at 448
    amax = torch.tensor(448.0 * 3 + 1)
    scale = amax / 448
    assert float(amax / scale) >= 448.0
    assert qengine.quantize(amax.reshape(1), FMT, blocksize=None).packed.item() == 0x7E


# ------------------------------------------------------------------ kernels
def _weight(n, k, bs, dq):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g)
    q = qengine.quantize(w, FMT, blocksize=bs, double_quant=dq)
    if dq:  # the decoded float32 scales times E4M3, in float64
        scales = q.scales.values().to(torch.float64).repeat_interleave(q.blocksize)[: q.numel]
        w64 = (torch.tensor(E4M3, dtype=torch.float64)[q.packed.long()] * scales).to(torch.float32)
    else:
        w64 = reference(w, q.blocksize)[2].to(torch.float32)
    return q, w64.reshape(n, k).to(torch.float64)


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape, bs", [((37, 96), 32), ((48, 256), 64), ((33, 80), None), ((7, 1024), 128)])
def test_dequantize_and_quant_linear_against_float64(shape, bs, dq):
    n, k = shape
    q, w64 = _weight(n, k, bs, dq)
    assert same_bits(q.dequantize(torch.float32).double(), w64)
    bias = torch.randn(n)
    layer = QuantLinear.from_quantized(q, bias.clone())
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 5, 40):
            x = torch.randn(m, k, generator=g).to(dtype)
            a = (torch.randn(4, k, generator=g) * 0.1).to(dtype)
            b = (torch.randn(n, 4, generator=g) * 0.1).to(dtype)
            x64, a64, b64 = x.double(), a.double(), b.double()
            for lora in (None, (a, b, 0.5)):
                y = (layer(x) if lora is None else layer(x, lora=lora)).double()
                ref = x64 @ w64.T + bias.to(dtype).double()
                side = 0.5 * (x64 @ a64.T) @ b64.T if lora is not None else 0.0
                extra = 0.0 if lora is None else 0.5 * (x64.abs() @ a64.abs().T) @ b64.abs().T
                bound = matmul_bound(x64, w64, dtype, extra) + (2.0 ** -8 if dtype == torch.bfloat16 else 1e-6) * (
                    bias.abs().double() + 1)
                assert bool(((y - ref - side).abs() <= bound).all()), (dtype, m, lora is None)
    x = torch.randn(5, k, requires_grad=True)  # matmul_t
    qengine.matmul(x, q).backward(torch.ones(5, n))
    assert torch.allclose(x.grad.double(), w64.sum(0).expand(5, -1), rtol=1e-5, atol=1e-4 * math.sqrt(n))


def test_isas_equal_scalar(isa_restore):
    q, _ = _weight(64, 512, 64, False)
    x = torch.randn(5, 512)
    outs = {}
    for isa in ISAS:
        qengine.set_cpu_isa(isa)
        outs[isa] = (qengine.quantize(q.dequantize(), FMT, 64).packed, q.dequantize(torch.bfloat16),
                     qengine.matmul(x, q), qengine.matmul(x[:1], q))
    for isa, got in outs.items():
        assert torch.equal(got[0], outs["scalar"][0]) and same_bits(got[1], outs["scalar"][1]), isa
        for a, b in zip(got[2:], outs["scalar"][2:]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), isa


def test_sparse24_and_mask():
    w = torch.randn(16, 128)
    q = qengine.quantize(w, FMT, blocksize=64, sparsity="2:4")
    dense = q.dequantize()
    assert bool((dense.reshape(-1, 4) != 0).sum(1).le(2).all())
    x = torch.randn(3, 128)
    assert torch.allclose(qengine.matmul(x, q), x @ dense.T, rtol=1e-5, atol=1e-4)
    mask = torch.rand(16, 128) > 0.5
    qm = qengine.quantize(w, FMT, blocksize=64, mask=mask)
    assert qm.mask is None and bool((qm.dequantize()[~mask] == 0).all())


# ------------------------------------------------------------------ storage
@pytest.mark.parametrize("bs, bits", [(32, 9.0), (64, 8.5), (4096, 8.0078125), (None, 8.0625)])
def test_bits_per_param(bs, bits):
    q = qengine.quantize(torch.randn(256, 512), FMT, blocksize=bs)
    assert q.bits_per_param == bits  # 8 + 32 / blocksize (per row: 32 / 512); the E4M3 table is not stored
    dq = qengine.quantize(torch.randn(256, 512), FMT, blocksize=bs, double_quant=True)
    nblocks = q.nblocks
    assert dq.nbytes == 256 * 512 + nblocks + 4 * -(-nblocks // 256) + 4 * 256 + 4  # dynamic8 codes, absmax, table, mean


@pytest.mark.parametrize("bs, dq", [(64, False), (64, True), (None, False)])
def test_state_round_trips(bs, dq):
    lin = nn.Linear(96, 37)
    layer = QuantLinear.from_linear(lin, format=FMT, blocksize=bs, double_quant=dq)
    x = torch.randn(3, 96)
    y = layer(x)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = QuantLinear(96, 37, format=FMT, blocksize=bs, double_quant=dq)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), y)
    q, q2 = layer.quantized(), fresh.quantized()
    assert torch.equal(q2.packed, q.packed) and q2.format.name == FMT and q2.per_row == (bs is None)
    q3 = type(q).from_state_dict(q.state_dict())
    assert same_bits(q3.dequantize(), q.dequantize())


def test_quantize_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    w0 = model[0].weight.detach().clone()
    x = torch.randn(2, 64)
    ref = model(x)
    qengine.quantize_model(model, format=FMT, double_quant=False, skip=())
    assert isinstance(model[0], QuantLinear) and model[0].format.name == FMT
    assert torch.equal(model[0].quantized().packed, qengine.quantize(w0, FMT, 64).packed)
    assert (model(x) - ref).abs().max() < 0.05


# ------------------------------------------------------------------ bad input
def test_bad_input():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or Inf"):
            qengine.quantize(torch.tensor([1.0, bad] * 32), FMT)
    with pytest.raises(ValueError):
        qengine.quantize(torch.randn(64), FMT, blocksize=48)
    q = qengine.quantize(torch.randn(8, 64), FMT)
    for nan_code in (0x7F, 0xFF):
        sd = q.state_dict()
        sd["packed"] = sd["packed"].clone()
        sd["packed"][5] = nan_code
        with pytest.raises(ValueError, match="NaN"):
            type(q).from_state_dict(sd)
        layer = QuantLinear.from_quantized(q)
        lsd = layer.state_dict()
        lsd["weight.packed"] = lsd["weight.packed"].clone()
        lsd["weight.packed"][0] = nan_code
        with pytest.raises(ValueError, match="NaN"):
            QuantLinear(64, 8, bias=False, format=FMT).load_state_dict(lsd)
    sd = q.state_dict()
    sd["codebook"] = sd["codebook"] / 448  # not the spec's table
    with pytest.raises(ValueError, match="codebook"):
        type(q).from_state_dict(sd)
