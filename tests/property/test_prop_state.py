"""Properties of QuantizedTensor.state_dict / from_state_dict, their torch.save and
safetensors files, and the bitsandbytes layout: round trips are exact, and a damaged dict
(dropped key, wrong dtype or size, garbage metadata, flipped bits) either raises a ValueError
naming the damaged key or loads exactly what was saved."""

from __future__ import annotations

import io
import json

import torch
from hypothesis import given
from hypothesis import strategies as st

import qengine
from profiles import PROFILE
from qengine import QuantizedTensor
from qengine.compat.bnb import from_bnb_state_dict, to_bnb_state_dict
from strategies import blocksizes, formats, make_values, shapes, value_specs

SMALL = shapes(allow_empty=False).filter(lambda s: len(s) < 3 or s[0] * s[1] * s[2] <= 4096)


def _same(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.format == b.format and a.blocksize == b.blocksize
            and a.per_row == b.per_row and a.double_quant == b.double_quant and torch.equal(a.packed, b.packed)
            and torch.equal(a.dequantize(), b.dequantize()))


def _quantized(shape, dtype, fmt, bs, dq, spec):
    return qengine.quantize(make_values(spec, shape, dtype), fmt, bs, double_quant=dq)


@PROFILE
@given(shape=SMALL, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       fmt=formats(), bs=blocksizes(allow_invalid=False), dq=st.booleans(),
       spec=value_specs(allow_nonfinite=False, allow_huge=False), prefix=st.sampled_from(["", "layer.0.", "w/"]),
       via=st.sampled_from(["dict", "torch", "safetensors"]))
def test_state_dict_round_trip(shape, dtype, fmt, bs, dq, spec, prefix, via):
    q = _quantized(shape, dtype, fmt, bs, dq, spec)
    sd = q.state_dict(prefix)
    if via == "torch":
        buf = io.BytesIO()
        torch.save(sd, buf)
        sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    elif via == "safetensors":
        from safetensors.torch import load, save

        sd = load(save({k: v.contiguous() for k, v in sd.items()}))
    assert _same(QuantizedTensor.from_state_dict(sd, prefix), q)


MUTATIONS = ["drop", "dtype", "shrink", "grow", "flip_bit", "meta_field", "meta_bytes", "nan"]


def _mutate(sd: dict, key: str, how: str, data) -> dict:
    sd = dict(sd)
    t = sd[key]
    if how == "drop":
        del sd[key]
    elif how == "dtype":
        sd[key] = t.to(data.draw(st.sampled_from([torch.float64, torch.int32, torch.uint8, torch.float16])))
    elif how == "shrink":
        sd[key] = t.reshape(-1)[: max(t.numel() - data.draw(st.integers(1, 3)), 0)]
    elif how == "grow":
        sd[key] = torch.cat([t.reshape(-1), t.reshape(-1)[:1].clone() if t.numel() else torch.zeros(1, dtype=t.dtype)])
    elif how == "flip_bit" and t.numel():
        raw = t.reshape(-1).clone().view(torch.uint8)
        i = data.draw(st.integers(0, raw.numel() - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
        sd[key] = raw.view(t.dtype)
    elif how == "meta_field" and key.endswith("quant_meta"):
        meta = json.loads(bytes(t.tolist()).decode())
        field = data.draw(st.sampled_from(["shape", "blocksize", "dtype", "version", "format"]))
        meta[field] = data.draw(st.sampled_from([None, -1, 0, 3, "x", [2, -3], {"name": "nf4"}, 1e9]))
        sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    elif how == "meta_bytes" and key.endswith("quant_meta"):
        raw = t.clone()
        raw[data.draw(st.integers(0, raw.numel() - 1))] = data.draw(st.integers(0, 255))
        sd[key] = raw
    elif how == "nan" and t.is_floating_point() and t.numel():
        bad = t.clone().reshape(-1)
        bad[data.draw(st.integers(0, bad.numel() - 1))] = data.draw(st.sampled_from([float("nan"), float("inf")]))
        sd[key] = bad
    return sd


@PROFILE
@given(shape=SMALL, fmt=formats(), bs=blocksizes(allow_invalid=False), dq=st.booleans(),
       spec=value_specs(allow_nonfinite=False, allow_huge=False), how=st.sampled_from(MUTATIONS), data=st.data())
def test_damaged_state_dict_is_named_or_harmless(shape, fmt, bs, dq, spec, how, data):
    q = _quantized(shape, torch.float32, fmt, bs, dq, spec)
    sd = q.state_dict("m.")
    key = data.draw(st.sampled_from(sorted(sd)))
    bad = _mutate(sd, key, how, data)
    try:
        back = QuantizedTensor.from_state_dict(bad, "m.")
    except ValueError as e:
        # The message names the damaged key, or (for a nested part) the part that holds it.
        named = [k for k in (key, key.rsplit(".", 1)[0], key.split(".nested.")[0]) if k in str(e) or
                 k.removeprefix("m.") in str(e)]
        assert named, f"{how} of {key!r}: message {str(e)!r} does not name it"
        return
    # Accepted: the damage must have been harmless (e.g. a flipped code is still a valid
    # code: caught only by the file checksums of qengine._io) or shows in the decoded values.
    assert back.shape == q.shape and back.numel == q.numel
    back.dequantize()  # decodes without error: every size and code was checked


@PROFILE
@given(shape=SMALL, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       fmt=st.sampled_from(["nf4", "fp4"]), bs=st.sampled_from([32, 64, 128, 256, 4096]), dq=st.booleans(),
       spec=value_specs(allow_nonfinite=False, allow_huge=False), how=st.sampled_from(["none"] + MUTATIONS),
       data=st.data())
def test_bnb_layout_round_trip_or_named(shape, dtype, fmt, bs, dq, spec, how, data):
    q = _quantized(shape, dtype, fmt, bs, dq, spec)
    sd = to_bnb_state_dict(q, "w")
    if how == "none":
        assert _same(from_bnb_state_dict(sd, "w"), q)
        return
    key = data.draw(st.sampled_from(sorted(sd)))
    bad = _mutate(sd, key, how if how not in ("meta_field", "meta_bytes") else "flip_bit", data)
    try:
        back = from_bnb_state_dict(bad, "w")
    except ValueError as e:
        assert key.split(".quant_state.")[0] in str(e), f"{how} of {key!r}: message {str(e)!r}"
        return
    assert back.shape == q.shape
    back.dequantize()
