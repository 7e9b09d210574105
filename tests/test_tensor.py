"""QuantizedTensor: state dict round trips (torch.save, safetensors), corrupt state dicts,
device moves, copies and pickling."""

from __future__ import annotations

import copy
import io
import json
import pickle
import re

import pytest
import torch

import qengine
from cases import CB5, CB200, FORMAT_NAMES, fmt_of, make_input
from qengine import QuantizedTensor
from qengine.tensor import NestedScales

PREFIX = "model.layers.0.weight."


def assert_same_quantized(a: QuantizedTensor, b: QuantizedTensor):
    assert a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize
    assert a.per_row == b.per_row and a.double_quant == b.double_quant
    assert a.format == b.format
    assert tuple(a.format.values) == tuple(b.format.values)
    assert torch.equal(a.packed, b.packed)
    for pa, pb in ((a.scales, b.scales), (a.offsets, b.offsets)):
        if pa is None:
            assert pb is None
        elif isinstance(pa, NestedScales):
            assert isinstance(pb, NestedScales)
            assert torch.equal(pa.mean, pb.mean)
            assert_same_quantized(pa.quantized, pb.quantized)
        else:
            assert torch.equal(pa, pb)
    assert torch.equal(a.dequantize(), b.dequantize())


# ---------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_state_dict_round_trip(fmt, double_quant):
    x = make_input((33, 65), torch.bfloat16)
    q = qengine.quantize(x, fmt_of(fmt), 64, double_quant=double_quant)
    sd = q.state_dict(PREFIX)
    assert all(k.startswith(PREFIX) for k in sd)
    assert all(isinstance(t, torch.Tensor) for t in sd.values())
    for key in ("packed", "codebook", "quant_meta"):
        assert PREFIX + key in sd
    if double_quant:
        assert PREFIX + "scales.mean" in sd and PREFIX + "scales.nested.packed" in sd
    else:
        assert sd[PREFIX + "scales"].dtype == torch.float32
    has_offsets = any(k.startswith(PREFIX + "offsets") for k in sd)
    assert has_offsets == (qengine.get_format(fmt_of(fmt)).rule == "minmax")
    json.loads(bytes(sd[PREFIX + "quant_meta"].tolist()).decode())  # metadata is JSON
    assert_same_quantized(QuantizedTensor.from_state_dict(sd, PREFIX), q)


@pytest.mark.parametrize("shape, blocksize", [((1,), 32), ((7, 9), None), ((2, 3, 31), 32)])
def test_state_dict_round_trip_shapes(shape, blocksize):
    q = qengine.quantize(make_input(shape, torch.float16), "nf4", blocksize)
    r = QuantizedTensor.from_state_dict(q.state_dict())
    assert_same_quantized(r, q)
    assert r.per_row == (blocksize is None)


def test_state_dict_through_torch_save():
    q = qengine.quantize(make_input((100, 64), torch.float32), "uint4", 32, double_quant=True)
    buf = io.BytesIO()
    torch.save(q.state_dict(PREFIX), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert_same_quantized(QuantizedTensor.from_state_dict(sd, PREFIX), q)


@pytest.mark.parametrize("fmt", ["nf4", "cb200"])
def test_state_dict_through_safetensors(fmt):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    q = qengine.quantize(make_input((100, 64), torch.bfloat16), fmt_of(fmt), 64, double_quant=True)
    data = safetensors_torch.save(q.state_dict(PREFIX))
    sd = safetensors_torch.load(data)
    assert_same_quantized(QuantizedTensor.from_state_dict(sd, PREFIX), q)


def test_user_codebook_survives_the_state_dict():
    q = qengine.quantize(make_input((64,), torch.float32), CB200, 32)
    r = QuantizedTensor.from_state_dict(q.state_dict())
    assert tuple(r.format.values) == tuple(CB200.values)
    assert r.format.rule == "minmax" and r.format.bits == 8


def test_two_tensors_share_one_state_dict():
    a = qengine.quantize(make_input((64, 64), torch.float32), "nf4", 64)
    b = qengine.quantize(make_input((32, 32), torch.float32), "int8", 32)
    sd = {**a.state_dict("a."), **b.state_dict("b.")}
    assert_same_quantized(QuantizedTensor.from_state_dict(sd, "a."), a)
    assert_same_quantized(QuantizedTensor.from_state_dict(sd, "b."), b)


# ---------------------------------------------------------------------------- corrupt state dicts
def _sd(fmt="nf4", double_quant=False, shape=(10, 64), blocksize=64):
    q = qengine.quantize(make_input(shape, torch.float32), fmt_of(fmt), blocksize, double_quant=double_quant)
    return q, dict(q.state_dict(PREFIX))


def _meta(sd):
    return json.loads(bytes(sd[PREFIX + "quant_meta"].tolist()).decode())


def _set_meta(sd, meta):
    sd[PREFIX + "quant_meta"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def _raises_naming(sd, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        QuantizedTensor.from_state_dict(sd, PREFIX)


@pytest.mark.parametrize("key", ["packed", "codebook", "quant_meta", "scales"])
def test_missing_key(key):
    _, sd = _sd()
    del sd[PREFIX + key]
    _raises_naming(sd, PREFIX + key)


@pytest.mark.parametrize("key", ["offsets", "scales"])
def test_missing_minmax_part(key):
    _, sd = _sd("uint4")
    del sd[PREFIX + key]
    _raises_naming(sd, PREFIX + key)


@pytest.mark.parametrize("key", ["scales.mean", "scales.nested.packed", "scales.nested.scales",
                                 "scales.nested.codebook", "offsets.nested.packed", "offsets.mean"])
def test_missing_nested_key(key):
    _, sd = _sd("uint4", double_quant=True)
    del sd[PREFIX + key]
    _raises_naming(sd, PREFIX + key)


@pytest.mark.parametrize("key, dtype", [
    ("packed", torch.int8), ("packed", torch.int32), ("packed", torch.float32),
    ("scales", torch.float64), ("scales", torch.float16), ("scales", torch.int32),
    ("codebook", torch.float64), ("codebook", torch.float16),
    ("quant_meta", torch.int8),
])
def test_wrong_dtype(key, dtype):
    _, sd = _sd()
    sd[PREFIX + key] = sd[PREFIX + key].to(dtype)
    _raises_naming(sd, PREFIX + key)


@pytest.mark.parametrize("key, dtype", [("offsets", torch.float64), ("offsets.nested.packed", torch.int16),
                                        ("scales.mean", torch.float64), ("scales.nested.scales", torch.float16)])
def test_wrong_dtype_minmax_and_nested(key, dtype):
    _, sd = _sd("uint4", double_quant=key.count(".") > 0)
    sd[PREFIX + key] = sd[PREFIX + key].to(dtype)
    _raises_naming(sd, PREFIX + key)


@pytest.mark.parametrize("key, delta", [("packed", -1), ("packed", 1), ("scales", -1), ("scales", 1),
                                        ("codebook", -1), ("codebook", 1)])
def test_wrong_size(key, delta):
    _, sd = _sd()
    t = sd[PREFIX + key]
    sd[PREFIX + key] = t[:delta] if delta < 0 else torch.cat([t, t[:delta]])
    _raises_naming(sd, PREFIX + key)


@pytest.mark.parametrize("key, delta", [("offsets", -1), ("scales.nested.packed", 1), ("scales.nested.scales", 1),
                                        ("scales.mean", 1)])
def test_wrong_size_minmax_and_nested(key, delta):
    _, sd = _sd("uint4", double_quant=key != "offsets", shape=(300, 64), blocksize=32)
    t = sd[PREFIX + key].reshape(-1)
    sd[PREFIX + key] = t[:delta] if delta < 0 else torch.cat([t, t[:delta]])
    _raises_naming(sd, PREFIX + key)


GARBAGE_META = {
    "not_json": b"{this is not json",
    "not_utf8": b"\xff\xfe\x00garbage",
    "empty": b"",
    "json_list": b"[1, 2, 3]",
    "json_number": b"42",
    "wrong_version": None,  # filled below
    "missing_shape": None,
    "bad_dtype": None,
    "negative_shape": None,
    "zero_blocksize": None,
    "shape_not_list": None,
}


@pytest.mark.parametrize("case", list(GARBAGE_META))
def test_garbage_quant_meta(case):
    _, sd = _sd()
    raw = GARBAGE_META[case]
    if raw is not None:
        sd[PREFIX + "quant_meta"] = torch.tensor(list(raw), dtype=torch.uint8)
    else:
        meta = _meta(sd)
        if case == "wrong_version":
            meta["version"] = 999
        elif case == "missing_shape":
            del meta["shape"]
        elif case == "bad_dtype":
            meta["dtype"] = "float64"
        elif case == "negative_shape":
            meta["shape"] = [-10, 64]
        elif case == "zero_blocksize":
            meta["blocksize"] = 0
        elif case == "shape_not_list":
            meta["shape"] = "ten by sixty-four"
        _set_meta(sd, meta)
    _raises_naming(sd, PREFIX + "quant_meta")


def test_meta_inconsistent_with_tensors():
    """A shape that does not match the packed bytes is caught (by the size check of packed)."""
    _, sd = _sd()
    meta = _meta(sd)
    meta["shape"] = [11, 64]
    _set_meta(sd, meta)
    with pytest.raises(ValueError, match=re.escape(PREFIX)):
        QuantizedTensor.from_state_dict(sd, PREFIX)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int8", "uint4"])
def test_codebook_changed_for_builtin_format(fmt):
    _, sd = _sd(fmt)
    cb = sd[PREFIX + "codebook"].clone()
    cb[1] = (cb[0] + cb[1]) / 2  # still sorted-ish and in range: only the name tells
    sd[PREFIX + "codebook"] = cb
    _raises_naming(sd, PREFIX + "codebook")


def test_codebook_invalid_for_user_format():
    _, sd = _sd(CB5)
    cb = sd[PREFIX + "codebook"].clone()
    cb[0] = float("nan")
    sd[PREFIX + "codebook"] = cb
    _raises_naming(sd, PREFIX + "codebook")


@pytest.mark.parametrize("nibble", ["high", "low"])
@pytest.mark.parametrize("code", [15])
def test_int4_code_past_the_codebook(code, nibble):
    q, sd = _sd("int4")  # 15 values: code 15 is unused
    assert len(q.format.values) == 15
    packed = sd[PREFIX + "packed"].clone()
    packed[3] = (code << 4) | (packed[3] & 0x0F) if nibble == "high" else (packed[3] & 0xF0) | code
    sd[PREFIX + "packed"] = packed
    _raises_naming(sd, PREFIX + "packed")


@pytest.mark.parametrize("code", [5, 9, 15])
def test_short_user_codebook_code_past_the_end(code):
    _, sd = _sd(CB5)
    packed = sd[PREFIX + "packed"].clone()
    packed[-1] = (packed[-1] & 0xF0) | code
    sd[PREFIX + "packed"] = packed
    _raises_naming(sd, PREFIX + "packed")


def test_int8_code_255_is_corrupt():
    _, sd = _sd("int8")  # 255 values: code 255 is unused
    packed = sd[PREFIX + "packed"].clone()
    packed[17] = 255
    sd[PREFIX + "packed"] = packed
    _raises_naming(sd, PREFIX + "packed")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scales(bad):
    _, sd = _sd()
    s = sd[PREFIX + "scales"].clone()
    s[2] = bad
    sd[PREFIX + "scales"] = s
    _raises_naming(sd, PREFIX + "scales")


def test_non_tensor_value():
    _, sd = _sd()
    sd[PREFIX + "scales"] = sd[PREFIX + "scales"].tolist()
    _raises_naming(sd, PREFIX + "scales")


def test_from_state_dict_does_not_modify_the_dict():
    _, sd = _sd("uint4", double_quant=True)
    before = {k: v.clone() for k, v in sd.items()}
    QuantizedTensor.from_state_dict(sd, PREFIX)
    assert sd.keys() == before.keys()
    assert all(torch.equal(sd[k], before[k]) for k in sd)


# ---------------------------------------------------------------------------- movement, copies
def test_to_same_device_is_identity():
    q = qengine.quantize(make_input((64,), torch.float32), "nf4", 32)
    assert q.to("cpu") is q
    assert q.to(torch.device("cpu")) is q
    assert q.cpu() is q
    assert q.device == torch.device("cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("double_quant", [False, True])
def test_to_cuda_and_back(double_quant):
    q = qengine.quantize(make_input((100, 64), torch.float16), "uint4", 64, double_quant=double_quant)
    g = q.to("cuda")
    assert g.device.type == "cuda" and g.packed.is_cuda
    assert torch.equal(g.dequantize().cpu(), q.dequantize())
    back = g.cpu()
    assert_same_quantized(back, q)
    sd = g.state_dict()
    assert_same_quantized(QuantizedTensor.from_state_dict(sd).cpu(), q)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("fmt", ["nf4", "uint8", "cb5"])
def test_deepcopy(fmt, double_quant):
    q = qengine.quantize(make_input((50, 33), torch.float32), fmt_of(fmt), 32, double_quant=double_quant)
    c = copy.deepcopy(q)
    assert_same_quantized(c, q)
    assert c.packed.data_ptr() != q.packed.data_ptr()
    expected = q.dequantize().clone()
    c.packed.zero_()  # the copy is independent
    assert torch.equal(q.dequantize(), expected)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("fmt", ["fp4", "uint4", "cb200"])
def test_pickle(fmt, double_quant):
    q = qengine.quantize(make_input((50, 33), torch.bfloat16), fmt_of(fmt), 32, double_quant=double_quant)
    r = pickle.loads(pickle.dumps(q))  # QuantizedTensor is documented as picklable: failing is a bug
    assert isinstance(r, QuantizedTensor)
    assert_same_quantized(r, q)


def test_repr_mentions_the_essentials():
    q = qengine.quantize(make_input((8, 64), torch.float32), "nf4", None, double_quant=True)
    s = repr(q)
    assert "nf4" in s and "(8, 64)" in s and "double_quant=True" in s
