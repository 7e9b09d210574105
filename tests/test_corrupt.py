"""Damaged checkpoints: truncated, bit-flipped and shape-mismatched files of QuantizedTensor
state dicts (safetensors and torch.save, written by qengine._io) and bitsandbytes-layout
dicts. Each gives a ValueError naming the file, tensor or key (never a crash, never silently
different data)."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

import qengine
from qengine import QuantizedTensor
from qengine._io import load_tensors, save_tensors
from qengine.compat.bnb import from_bnb_state_dict, to_bnb_state_dict

SUFFIXES = [".safetensors", ".pt"]


def _q(fmt="nf4", dq=True, shape=(24, 64)):
    return qengine.quantize(torch.randn(shape), fmt, 64, double_quant=dq)


def _same_dict(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1), b[k].reshape(-1))
                                        for k in a)


def _load_q(path, prefix=""):
    return QuantizedTensor.from_state_dict(load_tensors(path), prefix)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("fmt", ["nf4", "uint8"])
def test_round_trip(tmp_path, suffix, fmt):
    q = _q(fmt)
    path = tmp_path / f"w{suffix}"
    save_tensors(q.state_dict("layer."), path)
    back = _load_q(path, "layer.")
    assert torch.equal(back.packed, q.packed) and torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    save_tensors(_q().state_dict(), path)
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    for size in sorted({0, 1, 7, 8, 9, 50, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1}):
        cut.write_bytes(data[:size])
        with pytest.raises(ValueError, match=re.escape(str(cut))):
            load_tensors(cut)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_bit_flips(tmp_path, suffix):
    """Every flipped bit is either reported (ValueError naming the file or the tensor whose
    CRC-32 fails) or harmless (the same tensors load, e.g. a zip timestamp)."""
    q = _q("uint4")
    sd = q.state_dict()
    path = tmp_path / f"w{suffix}"
    save_tensors(sd, path)
    data = bytearray(path.read_bytes())
    rng = random.Random(len(data))
    positions = list(range(0, min(len(data), 96))) + rng.sample(range(len(data)), 100)
    flipped = tmp_path / f"flip{suffix}"
    reported = harmless = 0
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(bad))
        try:
            loaded = load_tensors(flipped)
        except ValueError as e:
            assert str(flipped) in str(e)
            reported += 1
            continue
        assert _same_dict(loaded, sd), f"flip at byte {pos} loaded different tensors without an error"
        QuantizedTensor.from_state_dict(loaded)
        harmless += 1
    assert reported > len(positions) // 2  # most bytes matter


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_flipped_data_names_the_tensor(tmp_path, suffix):
    """A flip inside the packed codes (any code is a valid nf4 code) is caught by the CRC."""
    q = _q("nf4", dq=False, shape=(64, 64))
    q.packed[:] = 0xA5  # a byte pattern to find in the file (torch pads zip records with 0x5A)
    path = tmp_path / f"w{suffix}"
    save_tensors(q.state_dict("w."), path)
    data = bytearray(path.read_bytes())
    pos = data.find(bytes([0xA5]) * 64) + 17
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor 'w\.packed' fails its CRC-32"):
        load_tensors(path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_shape_mismatch(tmp_path, suffix):
    """The metadata of one tensor with the data of another: named by from_state_dict."""
    sd = _q(shape=(24, 64)).state_dict()
    other = _q(shape=(20, 64)).state_dict()
    sd["packed"] = other["packed"]
    path = tmp_path / f"w{suffix}"
    save_tensors(sd, path)
    with pytest.raises(ValueError, match=r"packed must have 768 elements"):
        _load_q(path)
    sd["packed"] = _q(shape=(24, 64)).packed
    sd["quant_meta"] = other["quant_meta"]
    save_tensors(sd, path)
    with pytest.raises(ValueError, match=r"packed must have 640 elements"):
        _load_q(path)


def test_foreign_files(tmp_path):
    """Files qengine did not write: checked structurally, errors name the file or key."""
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a dict"):
        load_tensors(tmp_path / "list.pt")
    torch.save({"packed": torch.zeros(3, dtype=torch.uint8), "quant_meta": "x"}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="'quant_meta' is a str"):
        load_tensors(tmp_path / "mixed.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_tensors(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "absent.pt")


# ---------------------------------------------------------------------------- bitsandbytes layout
def _bnb(dq=True):
    return to_bnb_state_dict(qengine.quantize(torch.randn(40, 64), "nf4", 64, double_quant=dq), "w")


def _with_meta(sd, **changes):
    key = "w.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()).decode())
    for k, v in changes.items():
        if v is _DROP:
            meta.pop(k, None)
        else:
            meta[k] = v
    sd = dict(sd)
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


_DROP = object()
BNB_CASES = {
    "nested_blocksize_zero": (lambda sd: _with_meta(sd, nested_blocksize=0), "nested_blocksize"),
    "nested_blocksize_text": (lambda sd: _with_meta(sd, nested_blocksize="x"), "malformed"),
    "nested_offset_nan": (lambda sd: _with_meta(sd, nested_offset=math.nan), "nested_offset"),
    "nested_offset_huge": (lambda sd: _with_meta(sd, nested_offset=1e39), "nested_offset"),
    "nested_offset_text": (lambda sd: _with_meta(sd, nested_offset="0.1"), "nested_offset"),
    "nested_offset_missing": (lambda sd: _with_meta(sd, nested_offset=_DROP), "nested_offset"),
    "shape_negative": (lambda sd: _with_meta(sd, shape=[-40, 64]), "invalid shape"),
    "shape_larger": (lambda sd: _with_meta(sd, shape=[41, 64]), r"w holds 1280 bytes"),
    "blocksize": (lambda sd: _with_meta(sd, blocksize=48), "unsupported blocksize"),
    "meta_not_json": (lambda sd: {**sd, "w.quant_state.bitsandbytes__nf4": torch.tensor([0xFF, 0x7B])},
                      "malformed"),
    "nested_absmax_nan": (lambda sd: {**sd, "w.nested_absmax": torch.full_like(sd["w.nested_absmax"], math.nan)},
                          r"w\.nested_absmax"),
    "nested_absmax_short": (lambda sd: {**sd, "w.nested_absmax": sd["w.nested_absmax"][:0]}, r"w\.nested_absmax"),
    "absmax_float": (lambda sd: {**sd, "w.absmax": sd["w.absmax"].float()}, r"w\.absmax must be uint8"),
    "packed_scalar": (lambda sd: {**sd, "w": torch.tensor(1.5)}, r"w holds 4 bytes"),
    "quant_map": (lambda sd: {**sd, "w.quant_map": sd["w.quant_map"].flip(0)}, r"w\.quant_map"),
    "missing_absmax": (lambda sd: {k: v for k, v in sd.items() if k != "w.absmax"}, r"w\.absmax"),
}
PLAIN_CASES = {
    "absmax_negative": (lambda sd: {**sd, "w.absmax": -sd["w.absmax"]}, r"w\.absmax contains"),
    "absmax_inf": (lambda sd: {**sd, "w.absmax": sd["w.absmax"] * math.inf}, r"w\.absmax contains"),
    "absmax_shape": (lambda sd: {**sd, "w.absmax": sd["w.absmax"][:-1]}, r"w\.absmax must be float32 \[40\]"),
}


@pytest.mark.parametrize("case", list(BNB_CASES))
def test_bnb_corrupt_nested(case):
    mutate, message = BNB_CASES[case]
    with pytest.raises(ValueError, match=message):
        from_bnb_state_dict(mutate(_bnb(True)), "w")


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_bnb_corrupt_plain(case):
    mutate, message = PLAIN_CASES[case]
    with pytest.raises(ValueError, match=message):
        from_bnb_state_dict(mutate(_bnb(False)), "w")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_bnb_file_bit_flips(tmp_path, suffix):
    """bitsandbytes-layout files written by save_tensors: every flip reported or harmless, and
    a file that loads converts (or is rejected by from_bnb_state_dict with a ValueError)."""
    sd = _bnb(True)
    path = tmp_path / f"bnb{suffix}"
    save_tensors(sd, path)
    data = bytearray(path.read_bytes())
    rng = random.Random(7)
    flipped = tmp_path / f"flip{suffix}"
    for pos in rng.sample(range(len(data)), 60):
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(bad))
        try:
            loaded = load_tensors(flipped)
        except ValueError:
            continue
        assert _same_dict(loaded, sd), f"flip at byte {pos} loaded different tensors without an error"
        from_bnb_state_dict(loaded, "w")
