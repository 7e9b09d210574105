"""qengine.nn.QuantLinear: forward against a float64 reference, state dicts (qengine and
bitsandbytes layouts, safetensors), movement without re-quantizing, quant_storage, bad input."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import qengine
import reference as R
from cases import TORCH_JIT_DEPRECATION, fmt_of
from qengine.nn import QuantLinear

LAYERS = [(96, 256, 64), (33, 200, 32), (40, 192, None)]  # (out, in, blocksize); None: per row


def _ref_forward(layer_w, bias, fmt, bs, dq, x):
    w64 = R.dequantize(R.quantize(layer_w, fmt_of(fmt), bs, dq), torch.float32).to(torch.float64)
    y = x.to(torch.float64) @ w64.t()
    return y + bias.to(torch.float64) if bias is not None else y, w64


def _bound(x, w64, dtype):
    mag = x.to(torch.float64).abs() @ w64.abs().t() + 1.0
    eps = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    return (8 * math.sqrt(x.shape[-1]) * 2.0**-24 + 2 * eps) * mag


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l[0]}x{l[1]}-{l[2] or 'row'}")
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("m", [1, 20])
def test_forward_matches_reference(layer, fmt, dq, m):
    n, k, bs = layer
    lin = nn.Linear(k, n)
    ql = QuantLinear.from_linear(lin, fmt, bs, dq)
    x = torch.randn(2, m, k)
    ref, w64 = _ref_forward(lin.weight.detach(), lin.bias.detach(), fmt, bs, dq, x)
    y = ql(x)
    assert y.shape == (2, m, n) and y.dtype == torch.float32
    assert ((y.to(torch.float64) - ref).abs() <= _bound(x, w64, torch.float32)).all()
    assert torch.equal(ql.dequantize(torch.float32), w64.to(torch.float32))


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_compute_dtype_and_output_dtype(compute_dtype, x_dtype):
    lin = nn.Linear(128, 48)
    ql = QuantLinear.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(5, 128).to(x_dtype)
    y = ql(x)
    assert y.dtype == x_dtype  # output in the input's dtype, whatever it was computed in
    ref, w64 = _ref_forward(lin.weight.detach(), lin.bias.detach(), "nf4", 64, True, x)
    used = compute_dtype or x_dtype
    assert ((y.to(torch.float64) - ref).abs() <= 4 * _bound(x, w64, used)).all()


def test_from_linear_leaves_linear_unchanged_and_keeps_bias_float():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    ql = QuantLinear.from_linear(lin)
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in before.items())
    assert ql.bias.dtype == torch.bfloat16 and ql.bias.requires_grad
    assert not ql.weight_packed.requires_grad and ql.weight_packed.dtype == torch.uint8
    assert ql.weight_dtype == torch.bfloat16


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["nf4", "uint4"])
@pytest.mark.parametrize("dq", [False, True])
def test_state_dict_round_trip_exact(fmt, dq, tmp_path):
    from safetensors.torch import load_file, save_file

    ql = QuantLinear.from_linear(nn.Linear(200, 24), fmt, 64, dq)
    sd = ql.state_dict()
    assert "weight.quant_meta" in sd and "bias" in sd
    fresh = QuantLinear(200, 24)  # an nf4 skeleton: the state dict says what it holds
    fresh.load_state_dict(sd)
    assert _state_equal(fresh.state_dict(), sd)
    save_file(sd, tmp_path / "layer.safetensors")
    again = QuantLinear(200, 24, format="fp4", double_quant=False)
    again.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert _state_equal(again.state_dict(), sd)
    x = torch.randn(3, 200)
    assert torch.equal(again(x), ql(x))


def test_load_does_not_alias_the_state_dict():
    ql = QuantLinear.from_linear(nn.Linear(128, 16))
    sd = {k: v.clone() for k, v in ql.state_dict().items()}
    fresh = QuantLinear(128, 16)
    fresh.load_state_dict(sd)
    sd["weight.packed"].zero_()
    assert torch.equal(fresh.state_dict()["weight.packed"], ql.state_dict()["weight.packed"])


def test_movement_deepcopy_pickle_never_requantize(monkeypatch):
    ql = QuantLinear.from_linear(nn.Linear(256, 64), quant_storage=torch.int32)
    x = torch.randn(4, 256)
    y = ql(x)
    sd = ql.state_dict()

    def boom(*a, **k):
        raise AssertionError("re-quantized")

    monkeypatch.setattr(qengine.nn.quant_linear, "quantize", boom)
    monkeypatch.setattr(qengine.functional.QuantizedTensor, "_quantize_flat", boom)
    for other in (copy.deepcopy(ql), pickle.loads(pickle.dumps(ql)), ql.to("cpu"), ql.cpu().cpu()):
        assert _state_equal(other.state_dict(), sd)
        assert torch.equal(other(x), y)
    half = copy.deepcopy(ql).to(torch.bfloat16)  # casts the bias only
    assert half.bias.dtype == torch.bfloat16
    assert half.weight_scales_absmax.dtype == torch.float32 and half.weight_table.dtype == torch.float32
    assert half.weight_packed.dtype == torch.int32
    assert torch.equal(half.state_dict()["weight.packed"], sd["weight.packed"])
    half.double()  # a float64 cast must not reach the quantization state either
    assert half.weight_scales_mean.dtype == torch.float32


@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_quant_storage_views_same_bytes(storage):
    lin = nn.Linear(100, 7)  # 700 codes = 350 bytes: not a multiple of 4 or 8 (padded)
    base = QuantLinear.from_linear(lin, "nf4", 32, True)
    ql = QuantLinear.from_linear(lin, "nf4", 32, True, quant_storage=storage)
    assert ql.weight_packed.dtype == storage and ql.weight_packed.dim() == 1
    assert _state_equal(ql.state_dict(), base.state_dict())  # stored as uint8, unpadded
    x = torch.randn(3, 100)
    assert torch.equal(ql(x), base(x))


def test_quant_storage_bit_patterns_survive_integer_views():
    # Bytes 0xFF.. viewed as float32 would be NaN; as integers every pattern is kept.
    lin = nn.Linear(64, 8)
    ql = QuantLinear.from_linear(lin, quant_storage=torch.int32)
    with torch.no_grad():
        ql.weight_packed.view(torch.uint8)[:8] = torch.tensor([0xFF, 0xFF, 0xC0, 0x7F, 0xFF, 0xFF, 0x80, 0xFF],
                                                              dtype=torch.uint8)
    moved = copy.deepcopy(ql).to(torch.float16)
    assert torch.equal(moved.weight_packed, ql.weight_packed)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
def test_float_quant_storage_rejected(storage):
    with pytest.raises(TypeError, match="quant_storage"):
        QuantLinear.from_linear(nn.Linear(64, 8), quant_storage=storage)


def test_extra_repr_and_bytes():
    ql = QuantLinear.from_linear(nn.Linear(1024, 512), "nf4", 64, True)
    text = repr(ql)
    assert "format=nf4" in text and "blocksize=64" in text and f"bytes={ql.weight_nbytes}" in text
    q = ql.quantized()
    assert ql.weight_nbytes == q.nbytes  # the module holds exactly the QuantizedTensor's bytes


def test_bad_input():
    ql = QuantLinear.from_linear(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="in_features"):
        ql(torch.randn(2, 63))
    with pytest.raises(TypeError):
        ql(torch.randn(2, 64).to(torch.int32))
    with pytest.raises(TypeError):
        QuantLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError):
        QuantLinear(0, 8)
    with pytest.raises(ValueError, match="blocksize"):
        QuantLinear(64, 8, blocksize=48)
    with pytest.raises(TypeError, match="compute_dtype"):
        QuantLinear(64, 8, compute_dtype=torch.int8)


def test_mismatched_or_corrupt_state_dict():
    ql = QuantLinear.from_linear(nn.Linear(128, 16))
    sd = ql.state_dict()
    with pytest.raises(ValueError, match="shape"):
        QuantLinear(128, 32).load_state_dict(sd)
    bad = dict(sd)
    bad["weight.codebook"] = bad["weight.codebook"].flip(0)
    with pytest.raises(ValueError, match="codebook"):
        QuantLinear(128, 16).load_state_dict(bad)
    bad = dict(sd)
    bad["weight.packed"] = bad["weight.packed"][:-1]
    with pytest.raises(ValueError, match="packed"):
        QuantLinear(128, 16).load_state_dict(bad)
    with pytest.raises(ValueError, match="not a quantized state"):
        QuantLinear(128, 16).load_state_dict(nn.Linear(128, 16).state_dict())
    missing = {k: v for k, v in sd.items() if k != "bias"}
    with pytest.raises(RuntimeError, match="bias"):
        QuantLinear(128, 16).load_state_dict(missing)
    extra = dict(sd, **{"weight.unknown": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="weight.unknown"):
        QuantLinear(128, 16).load_state_dict(extra)


# ----------------------------------------------------------------------------- bitsandbytes
BNB_CASES = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def _bnb_layer(bnb, lin, quant_type, dq):
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32,
                          compress_statistics=dq, quant_type=quant_type)
    m.load_state_dict(lin.state_dict())
    return m.to("cpu")  # quantizes, as bitsandbytes does when a layer moves to its device


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("case", BNB_CASES, ids=lambda c: f"{c[0]}-{'dq' if c[1] else 'nodq'}")
def test_bnb_saved_state_dict_loads_and_matches_bnb(bnb, case):
    quant_type, dq = case
    lin = nn.Linear(256, 96)
    bl = _bnb_layer(bnb, lin, quant_type, dq)
    sd = bl.state_dict()
    assert f"weight.quant_state.bitsandbytes__{quant_type}" in sd
    ql = QuantLinear(256, 96)
    ql.load_state_dict(sd)
    assert ql.format.name == quant_type and ql.double_quant == dq
    assert torch.equal(ql.weight_packed, sd["weight"].reshape(-1))  # the very bytes, not re-quantized
    for m in (1, 24):
        x = torch.randn(m, 256)
        with torch.compiler.set_stance("force_eager"), torch.no_grad():
            ref = bl(x)
        y = ql(x)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5), (y - ref).abs().max()


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("case", BNB_CASES, ids=lambda c: f"{c[0]}-{'dq' if c[1] else 'nodq'}")
def test_export_to_bnb_matches(bnb, case):
    quant_type, dq = case
    ql = QuantLinear.from_linear(nn.Linear(128, 40), quant_type, 64, dq)
    sd = ql.to_bnb_state_dict()
    w = bnb.nn.Params4bit.from_prequantized(
        data=sd["weight"], quantized_stats={k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")},
        requires_grad=False, device="cpu")
    bl = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, quant_type=quant_type)
    bl.weight = w
    bl.bias = nn.Parameter(sd["bias"])
    x = torch.randn(6, 128)
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        ref = bl(x)
    assert torch.allclose(ql(x), ref, rtol=1e-5, atol=1e-5)
    back = QuantLinear(128, 40)
    back.load_state_dict(sd)
    assert _state_equal(back.state_dict(), ql.state_dict())


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
def test_bnb_model_state_dict_round_trip(bnb):
    from qengine.compat.bnb import bnb_model_state_dict, load_bnb_model_state_dict

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.LayerNorm(32))
    bnb_sd = {}
    for i in (0, 2):  # a bitsandbytes-quantized model's state dict, layer by layer
        bnb_sd.update({f"{i}.{k}": v for k, v in _bnb_layer(bnb, model[i], "nf4", True).state_dict().items()})
    bnb_sd.update({f"3.{k}": v for k, v in model[3].state_dict().items()})
    target = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.LayerNorm(32))
    load_bnb_model_state_dict(target, bnb_sd)
    assert isinstance(target[0], QuantLinear) and isinstance(target[2], QuantLinear)
    out = bnb_model_state_dict(target)
    assert out.keys() == bnb_sd.keys()
    assert all(torch.equal(out[k].reshape(-1), bnb_sd[k].reshape(-1)) for k in out)
    with pytest.raises(ValueError, match="lacks"):
        load_bnb_model_state_dict(nn.Sequential(nn.Linear(64, 128)), {f"5.{k}": v for k, v in bnb_sd.items()
                                                                     if k.startswith("0.")})


@pytest.mark.cuda
def test_cuda_moves_packed_state_and_matches_cpu():
    lin = nn.Linear(256, 64)
    ql = QuantLinear.from_linear(lin, quant_storage=torch.int32)
    lora = qengine.nn.LoRALinear(copy.deepcopy(ql), r=4)
    x = torch.randn(3, 256)
    y = ql(x)
    moved = copy.deepcopy(ql).cuda()
    assert moved.weight_packed.is_cuda and moved.weight_scales_absmax.is_cuda and moved.weight_table.is_cuda
    assert torch.allclose(moved(x.cuda()).cpu(), y, rtol=1e-5, atol=1e-4)
    assert _state_equal({k: v.cpu() for k, v in moved.cpu().state_dict().items()}, ql.state_dict())
    assert torch.allclose(lora.cuda()(x.cuda()).cpu(), y, rtol=1e-5, atol=1e-4)


def test_forward_follows_every_way_of_replacing_the_state():
    """forward reuses the kernel arguments it built for the current state: assigning a state
    tensor, swapping it through torch.func.functional_call (as torch.export does), or writing
    it in place must each be seen by the next call."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 48, bias=False), "nf4", 64, double_quant=False)
    x = torch.randn(3, 128)
    base = layer(x)
    doubled = {"weight_scales": layer.weight_scales * 2}
    torch.testing.assert_close(torch.func.functional_call(layer, doubled, (x,)), 2 * base)
    torch.testing.assert_close(layer(x), base)  # the module's own state again after the call
    layer.weight_scales = layer.weight_scales * 3  # plain assignment of a buffer
    torch.testing.assert_close(layer(x), 3 * base)
    with torch.no_grad():
        layer.weight_scales.mul_(2)  # in place: the same tensor object
    torch.testing.assert_close(layer(x), 6 * base)
    moved = copy.deepcopy(layer).to("cpu")
    torch.testing.assert_close(moved(x), 6 * base)
