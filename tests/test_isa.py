"""Every CPU kernel variant (and every thread count) produces the bytes of the scalar kernels:
packed codes, scales and offsets bit for bit (the sign of a zero included), dequantized
outputs bit for bit."""

from __future__ import annotations

import pytest
import torch

import qengine
import reference as ref
from cases import DTYPES, FORMAT_NAMES, fmt_of, make_input

SUPPORTED = qengine.build_info()["supported_cpu_isas"]
SIMD_ISAS = [isa for isa in SUPPORTED if isa != "scalar"]


def _datasets(dtype):
    g = torch.Generator().manual_seed(99)
    ties = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, 0.0, -0.0, 0.75]).repeat(256)  # codebook points, +-0
    mixed = torch.randn(4097, generator=g) * torch.logspace(-20, 20, 4097)
    zeros = torch.zeros(3 * 64 + 17)
    zeros[100] = 0.5
    data = {
        "randn_500x77": make_input((500, 77), dtype),  # > 16k elements: split across threads
        "randn_1025x33": make_input((1025, 33), dtype),
        "ties": ties.to(dtype),
        "zeros": zeros.to(dtype),
        "neg_zeros": (-zeros).to(dtype),
        "mixed_magnitudes": mixed.to(dtype) if dtype == torch.float32 else (torch.randn(4097, generator=g) * 100).to(dtype),
    }
    if dtype == torch.float32:
        data["subnormal"] = torch.randn(777, generator=g) * 1e-40
    return data


def _snapshot(x, fmt, blocksize, double_quant):
    """All bytes of a quantize + dequantize, as int tensors (bit patterns)."""
    q = qengine.quantize(x, fmt, blocksize, double_quant=double_quant)
    out = {"packed": q.packed.clone()}
    for name, part in (("scales", q.scales), ("offsets", q.offsets)):
        if part is None:
            continue
        if double_quant:
            out[name + ".nested.packed"] = part.quantized.packed.clone()
            out[name + ".nested.scales"] = part.quantized.scales.view(torch.int32).clone()
            out[name + ".mean"] = part.mean.reshape(1).view(torch.int32).clone()
        else:
            out[name] = part.view(torch.int32).clone()
    for dtype, bits in ((torch.float32, torch.int32), (torch.float16, torch.int16), (torch.bfloat16, torch.int16)):
        out[f"dequantize_{dtype}"] = q.dequantize(dtype).reshape(-1).view(bits).clone()
    return out


def _diff(a: dict, b: dict) -> list[str]:
    problems = []
    for key in a:
        if not torch.equal(a[key], b[key]):
            bad = (a[key] != b[key]).nonzero().reshape(-1)
            problems.append(f"{key}: {bad.numel()} differ, first at {bad[:4].tolist()} "
                            f"(scalar {a[key][bad[:4]].tolist()}, got {b[key][bad[:4]].tolist()})")
    return problems


def test_build_info_lists_isas():
    info = qengine.build_info()
    assert "scalar" in SUPPORTED
    assert info["cpu_isa"] in SUPPORTED


def test_set_cpu_isa(isa_restore):
    for isa in SUPPORTED:
        qengine.set_cpu_isa(isa)
        assert qengine.build_info()["cpu_isa"] == isa
    with pytest.raises(ValueError):
        qengine.set_cpu_isa("avx9000")


@pytest.mark.skipif(not SIMD_ISAS, reason="this CPU supports only the scalar kernels")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_isas_match_scalar(fmt, dtype, isa_restore):
    f = fmt_of(fmt)
    rule = qengine.get_format(f).rule
    failures = []
    for name, x in _datasets(dtype).items():
        if rule == "minmax" and name == "mixed_magnitudes":
            x = x.abs()  # keep max - min finite
        for blocksize, dq in ((32, False), (64, True), (4096, False), (None, True)):
            qengine.set_cpu_isa("scalar")
            expected = _snapshot(x, f, blocksize, dq)
            for isa in SIMD_ISAS:
                qengine.set_cpu_isa(isa)
                for p in _diff(expected, _snapshot(x, f, blocksize, dq)):
                    failures.append(f"{isa} {name} bs={blocksize} dq={dq}: {p}")
    assert not failures, f"{len(failures)} mismatches vs scalar:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("isa", SUPPORTED)
def test_each_isa_matches_reference(isa, isa_restore):
    """Independent of the scalar kernels: each ISA against tests/reference.py."""
    qengine.set_cpu_isa(isa)
    for fmt in ("nf4", "fp4", "int8", "uint4", "cb200"):
        for dtype in DTYPES:
            x = make_input((300, 65), dtype)
            q = qengine.quantize(x, fmt_of(fmt), 64)
            r = ref.quantize(x, fmt_of(fmt), 64)
            assert torch.equal(q.packed, r.packed), (isa, fmt, dtype)
            assert ref.same_bits(q.scales, r.scales, signed_zeros=qengine.get_format(fmt_of(fmt)).rule == "absmax")
            assert torch.equal(q.dequantize(), ref.dequantize(r)), (isa, fmt, dtype)


@pytest.mark.parametrize("fmt", ["nf4", "int8", "uint4", "cb5"])
def test_thread_count_does_not_change_bytes(fmt, threads_restore):
    x = make_input((1024, 257), torch.bfloat16)
    results = []
    for n in (1, 2, 3, 7):
        qengine.set_num_threads(n)
        assert qengine.build_info()["num_threads"] == n
        results.append((n, _snapshot(x, fmt_of(fmt), None, True), _snapshot(x, fmt_of(fmt), 64, False)))
    for n, a, b in results[1:]:
        assert not _diff(results[0][1], a), f"{n} threads: {_diff(results[0][1], a)[:3]}"
        assert not _diff(results[0][2], b), f"{n} threads: {_diff(results[0][2], b)[:3]}"


@pytest.mark.parametrize("n", [0, -1])
def test_set_num_threads_rejects_nonpositive(n, threads_restore):
    with pytest.raises(ValueError):
        qengine.set_num_threads(n)
