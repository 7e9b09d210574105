"""The matmul kernels' one-pass weight check (_checks.weight_ok) accepts exactly what the named
checks (check_weight) accept: every single fault that check_weight raises on makes weight_ok
False, and every valid weight passes both."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine._checks import check_weight, weight_ok

N, K = 24, 160  # 3840 weights: 60 blocks of 64


def weight_args(fmt: str, double_quant: bool) -> dict:
    torch.manual_seed(0)
    q = qengine.quantize(torch.randn(N, K), fmt, 64, double_quant=double_quant)
    kw = q.kernel_weight()
    return {"packed": kw.packed, "table": kw.table, "scales": kw.scales, "nested": list(kw.nested),
            "offsets": kw.offsets, "bits": kw.bits, "blocksize": kw.blocksize, "numel": N * K}


CASES = [("nf4", False), ("nf4", True), ("uint8", False), ("uint4", True)]


def faults(args: dict):
    """(name, args with one fault) for every tensor and number check_weight looks at."""
    def with_(**changes):
        return {**args, **changes}

    tensors = {"packed": args["packed"], "table": args["table"], "scales": args["scales"]}
    if args["offsets"] is not None:
        tensors["offsets"] = args["offsets"]
    for name, t in tensors.items():
        wrong = torch.float64 if t.dtype != torch.float64 else torch.float32
        yield f"{name} dtype", with_(**{name: t.to(wrong)})
        yield f"{name} one element short", with_(**{name: t[:-1]})
        yield f"{name} one element long", with_(**{name: torch.cat([t, t[:1]])})
        yield f"{name} strided", with_(**{name: torch.stack([t, t], 1)[:, 0]})
        yield f"{name} on meta", with_(**{name: t.to("meta")})
        yield f"{name} not a tensor", with_(**{name: t.tolist()})
    yield "bits 3", with_(bits=3)
    yield "bits 2", with_(bits=2)
    yield "blocksize 0", with_(blocksize=0)
    yield "numel -1", with_(numel=-1)
    yield "numel + 1", with_(numel=args["numel"] + 1)
    if args["nested"]:
        table, absmax, mean, nbs = args["nested"]
        yield "nested of 3", with_(nested=[table, absmax, mean])
        for i, (name, t) in enumerate((("nested table", table), ("nested absmax", absmax), ("nested mean", mean))):
            for fault, bad in (("dtype", t.double()), ("short", t[:-1]), ("meta", t.to("meta")),
                               ("strided", torch.stack([t, t], -1)[..., 0])):
                nested = list(args["nested"])
                nested[i] = bad
                yield f"{name} {fault}", with_(nested=nested)
        yield "nested blocksize 0", with_(nested=[table, absmax, mean, torch.tensor(0)])
        yield "nested blocksize doubled", with_(nested=[table, absmax, mean, nbs * 2])
        yield "plain scales with nested parts", with_(scales=args["scales"].float())
    else:
        yield "float scales called nested", with_(nested=[args["table"], args["scales"], args["scales"][:1],
                                                          torch.tensor(64)])


@pytest.mark.parametrize("fmt,double_quant", CASES)
def test_valid_weights_pass_both(fmt, double_quant):
    args = weight_args(fmt, double_quant)
    assert weight_ok(**args)
    check_weight(**args)


@pytest.mark.parametrize("fmt,double_quant", CASES)
def test_every_fault_check_weight_names_fails_weight_ok(fmt, double_quant):
    args = weight_args(fmt, double_quant)
    seen = 0
    for name, bad in faults(args):
        try:
            check_weight(**bad)
        except (TypeError, ValueError):
            assert not weight_ok(**bad), f"weight_ok passed a weight check_weight rejects: {name}"
            seen += 1
        else:  # a change check_weight allows (a strided 1-element tensor): weight_ok must allow it too
            assert weight_ok(**bad), f"weight_ok rejected a weight check_weight accepts: {name}"
    assert seen >= 20
