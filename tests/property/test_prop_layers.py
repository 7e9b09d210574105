"""Properties of qengine.nn.QuantLinear and LoRALinear / qengine.add_lora over generated layer
sizes, formats (incl. user codebooks), block sizes, double quant, 2:4 sparsity, weights, input
batches, dtypes and views: forward equals float64 x @ W^T + b (+ scale * x A^T B^T) within the
matmul accumulation bound, LoRA gradients equal float64 autograd's within the same kind of
bound, bad inputs raise the documented error, inputs are unchanged, and state dicts (also
through safetensors) load into a fresh layer with equal bytes and equal outputs."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import qengine
import reference as R
from checks import check_raises, matmul_bound, underflow
from profiles import PROFILE
from qengine.nn import LoRALinear, QuantLinear
from sparse_reference import ref_sparse_dequantize
from strategies import BAD_DTYPES, blocksizes, formats, make_values, make_view, unchanged, value_specs

DIM = st.sampled_from([1, 4, 7, 16, 31, 33, 64, 100, 128, 129, 260]) | st.integers(1, 200)
BATCH = st.lists(st.sampled_from([0, 1, 2, 3, 5, 16, 17]), min_size=0, max_size=2).map(tuple)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def _weight(n, k, fmt, wspec):
    wspec.log2_scale = max(-8, min(8, wspec.log2_scale))
    w = make_values(wspec, (n, k), torch.float32)
    if qengine.get_format(fmt).rule == "minmax":
        w = w.clamp(-1e30, 1e30)
    return w


def _dense_reference(w, fmt, bs, dq, sparse):
    """float64 [n, k] of the weight as the layer stores it (reference quantize -> dequantize)."""
    if sparse:
        return ref_sparse_dequantize(w, fmt, bs, dq, torch.float32).double()
    return R.dequantize(R.quantize(w, fmt, bs, dq), torch.float32).double()


def _check_close(y, ref, bound, dtype, what):
    y64 = y.detach().double().reshape(ref.shape)
    over = torch.isinf(y64) & (ref.abs() + bound >= torch.finfo(dtype).max)
    err = (y64 - ref).abs()
    assert ((err <= bound) | over).all(), f"{what}: max error {err[~over].max().item():.3g}"


def _bytes_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


@PROFILE
@given(n=DIM, k=DIM, fmt=formats(), bs=blocksizes(allow_invalid=False), dq=st.booleans(), bias=st.booleans(),
       sparse=st.sampled_from([False, False, True]), wspec=value_specs(allow_nonfinite=False, allow_huge=False),
       batch=BATCH, xdtype=st.sampled_from(FLOATS + BAD_DTYPES[:2]), xview=st.sampled_from(["contiguous", "strided"]),
       x_case=st.sampled_from(["good"] * 6 + ["wrong_k", "scalar"]), compute=st.sampled_from([None, None, "f32"]),
       via=st.sampled_from(["dict", "safetensors"]), xseed=st.integers(0, 2**31 - 1))
def test_quant_linear_forward_and_state(n, k, fmt, bs, dq, bias, sparse, wspec, batch, xdtype, xview, x_case,
                                        compute, via, xseed):
    if sparse and k % 4:
        k += 4 - k % 4
    w = _weight(n, k, fmt, wspec)
    lin = nn.Linear(k, n, bias=bias)
    g = torch.Generator().manual_seed(xseed)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    lin_before = {key: t.clone() for key, t in lin.state_dict().items()}
    layer = QuantLinear.from_linear(lin, fmt, bs, dq, compute_dtype=torch.float32 if compute else None,
                                    sparsity="2:4" if sparse else None)
    assert all(torch.equal(t, lin_before[key]) for key, t in lin.state_dict().items()), "from_linear modified linear"
    kx = k + 1 if x_case == "wrong_k" else k
    x = torch.randn(*batch, kx, generator=g) if x_case != "scalar" else torch.tensor(1.5)
    x = x.to(xdtype) if xdtype.is_floating_point else (x * 10).to(xdtype)
    x = make_view(x, xview) if x.dim() else x
    xb, xs = x.clone(), x.stride()
    if x_case != "good":
        check_raises((ValueError, rf"x must be a tensor \[\.\.\., in_features={k}\]"), layer, x)
    elif xdtype not in FLOATS:
        expect = r"compute_dtype|float32" if compute else r"x must be float32, float16 or bfloat16"
        if compute:  # x is cast to the compute dtype first: accepted, computed in float32
            layer(x)
        else:
            check_raises((TypeError, expect), layer, x)
    else:
        y = layer(x)
        assert y.shape == (*batch, n) and y.dtype == xdtype
        cdt = torch.float32 if compute else xdtype
        w64 = _dense_reference(w, fmt, bs, dq, sparse)
        x64 = x.to(cdt).double().reshape(-1, k)
        ref, extra = x64 @ w64.t(), torch.zeros(())
        if bias:
            b64 = lin.bias.detach().double()
            ref, extra = ref + b64, b64.abs()
        # The bias is added to the product already rounded to the compute dtype: one more rounding.
        bound = matmul_bound(x64, w64, cdt, extra, roundings=3 if bias else 2)
        if cdt != xdtype:  # computed in float32, returned in x's dtype
            bound = bound + 2 * HALF[xdtype] * (x64.abs() @ w64.abs().t() + extra) + underflow(x64, xdtype)
        _check_close(y, ref, bound, xdtype, "QuantLinear forward")
    assert unchanged(x, xb, xs), "QuantLinear modified its input"

    # State dict -> a fresh layer (constructed from the options alone): equal bytes, equal output.
    sd = layer.state_dict()
    if via == "safetensors":
        sd = st_load(st_save({key: t.contiguous() for key, t in sd.items()}))
    fresh = QuantLinear(k, n, bias=bias, format=fmt, blocksize=bs, double_quant=dq,
                        compute_dtype=torch.float32 if compute else None)
    fresh.load_state_dict(sd)
    assert _bytes_equal(fresh.state_dict(), layer.state_dict()), "state dict round trip changed bytes"
    xin = torch.randn(3, k, generator=g)
    assert torch.equal(fresh(xin), layer(xin)), "the reloaded layer computes something else"


HALF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@PROFILE
@given(n=DIM, k=DIM, fmt=formats(), bs=blocksizes(allow_invalid=False), dq=st.booleans(), bias=st.booleans(),
       quant=st.sampled_from([True, True, False]), wspec=value_specs(allow_nonfinite=False, allow_huge=False),
       batch=BATCH, xdtype=st.sampled_from(FLOATS), rank=st.integers(1, 8), alpha=st.sampled_from([1, 8, 16.0, 32]),
       via_add_lora=st.booleans(), ldtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
       xseed=st.integers(0, 2**31 - 1))
def test_lora_forward_and_gradients(n, k, fmt, bs, dq, bias, quant, wspec, batch, xdtype, rank, alpha, via_add_lora,
                                    ldtype, xseed):
    rank = min(rank, n, k)
    w = _weight(n, k, fmt, wspec)
    g = torch.Generator().manual_seed(xseed)
    lin = nn.Linear(k, n, bias=bias, dtype=xdtype if not quant else torch.float32)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    base = QuantLinear.from_linear(lin, fmt, bs, dq) if quant else lin
    if via_add_lora:
        model = qengine.add_lora(nn.Sequential(base), r=rank, alpha=alpha, target_modules=["0"], dtype=ldtype)
        layer = model[0]
        assert isinstance(layer, LoRALinear) and layer.base_layer is base
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"0.lora_A", "0.lora_B"}, f"add_lora left {sorted(trainable)} trainable"
    else:
        layer = LoRALinear(base, r=rank, alpha=alpha, dtype=ldtype)
    with torch.no_grad():  # B starts at zero (the layer equals its base); give it values
        layer.lora_B.copy_(torch.randn(n, rank, generator=g) * 0.1)
    a64, b64 = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    scale = alpha / rank
    x = torch.randn(*batch, k, generator=g).to(xdtype)
    xb = x.clone()
    y = layer(x)
    assert y.shape == (*batch, n) and y.dtype == xdtype

    w64 = _dense_reference(w, fmt, bs, dq, False) if quant else lin.weight.detach().double()
    x64 = x.double().reshape(-1, k)
    side_mag = scale * (x64.abs() @ a64.abs().t()) @ b64.abs().t()
    ref = x64 @ w64.t() + scale * (x64 @ a64.t()) @ b64.t()
    extra = side_mag
    if bias:
        bb = lin.bias.detach().double()
        ref, extra = ref + bb, extra + bb.abs()
    bound = matmul_bound(x64, w64, xdtype, extra, roundings=3)
    if layer.lora_A.dtype != torch.float32:  # the adapter computes in its own (half) dtype
        adt = layer.lora_A.dtype
        bound = bound + 3 * HALF[adt] * side_mag + underflow(x64, adt)
    _check_close(y, ref, bound, xdtype, "LoRA forward")
    assert unchanged(x, xb, xb.stride()), "LoRALinear modified its input"

    if y.numel() == 0 or not torch.isfinite(y).all():
        return
    gy = torch.randn(y.shape, generator=g).to(xdtype)
    y.backward(gy)
    # float64 autograd of the same function
    a_ref = a64.clone().requires_grad_(True)
    b_ref = b64.clone().requires_grad_(True)
    g64 = gy.double().reshape(-1, n)
    (scale * (x64 @ a_ref.t()) @ b_ref.t() * g64).sum().backward()
    m = x64.shape[0]
    # x and the output gradient are cast to the adapter's dtype, the products rounded in it:
    # up to 6 roundings when that differs from x's dtype
    eps = (3 if layer.lora_A.dtype == xdtype else 6) * max(HALF[xdtype], HALF[layer.lora_A.dtype])
    ga_mag = scale * (g64.abs() @ b64.abs()).t() @ x64.abs()  # [r, k]
    gb_mag = scale * g64.abs().t() @ (x64.abs() @ a64.abs().t())  # [n, r]
    for got, want, mag, what in ((layer.lora_A.grad, a_ref.grad, ga_mag, "A"),
                                 (layer.lora_B.grad, b_ref.grad, gb_mag, "B")):
        assert got is not None and got.dtype == layer.lora_A.dtype, f"no gradient for lora_{what}"
        tol = (8 * max(m, n, k, 1) ** 0.5 * 2.0**-24 + eps) * mag + (m + 1) * torch.finfo(xdtype).smallest_normal
        gerr = (got.double() - want).abs()
        assert (gerr <= tol).all(), f"lora_{what} gradient: max error {gerr.max().item():.3g}"
    if quant:
        assert base.weight_packed.grad is None
