"""add_lora(init="correct"): the activation-weighted low-rank side path lowers the held-out output
error of a quantized layer against the plain quantized layer and against LoftQ's init."""

from __future__ import annotations

import copy

import pytest
import torch

import qengine
from qengine.calibrate.correct import correction_factors
from qengine.loftq import loftq
from qengine.nn import LoRALinear
from support import Tiny


def _inputs(n, k, g):
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)  # correlated channels of unequal energy
    return torch.randn(n, k, generator=g) @ mix, torch.randn(n // 4, k, generator=g) @ mix


def test_one_layer_beats_plain_and_loftq_on_held_out_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g)
    x, x_test = _inputs(2048, 128, g)
    mix = torch.randn(128, 128, generator=g)
    x, x_test = x @ mix, x_test @ mix
    r, s = 8, 2.0
    q = qengine.quantize(w, "nf4", blocksize=64, double_quant=True)
    A, B = correction_factors(w, q.dequantize(), x.T @ x, r, s)
    ql, Al, Bl = loftq(w, r, s, "nf4", 64, True, iters=5)

    def err(w_hat):
        return float((x_test @ (w - w_hat).T).norm() / (x_test @ w.T).norm())

    plain, ours, theirs = err(q.dequantize()), err(q.dequantize() + s * B @ A), err(ql.dequantize() + s * Bl @ Al)
    assert ours < 0.8 * plain and ours < theirs
    # with H = I the fit is LoftQ's first step: the best rank-r weight-space fit
    A0, B0 = correction_factors(w, q.dequantize(), None, r, s)
    assert (w - q.dequantize() - s * B0 @ A0).norm() <= (w - q.dequantize() - s * B @ A).norm()


def test_add_lora_correct_lowers_held_out_model_error_frozen_and_trains():
    torch.manual_seed(0)
    ref = Tiny(vocab=64, d=64, h=128).eval()
    calib, held = torch.randint(0, 64, (16, 32)), torch.randint(0, 64, (8, 32))
    plain = qengine.quantize_model(copy.deepcopy(ref), "int4", 64, True, progress=False)
    model = qengine.add_lora(copy.deepcopy(plain), r=8, init="correct", calibration=calib, reference=ref)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4
    with torch.no_grad():
        want = ref(held)
        e_plain = float((plain(held) - want).norm())
        e_ours = float((model(held) - want).norm())
    assert e_ours < 0.9 * e_plain
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p is m for p, m in zip(trainable, qengine.lora_parameters(model)))


def test_bad_input():
    torch.manual_seed(0)
    ref = Tiny(vocab=64, d=64, h=128).eval()
    ids = torch.randint(0, 64, (4, 16))
    q = qengine.quantize_model(copy.deepcopy(ref), "nf4", 64, True, progress=False)
    with pytest.raises(TypeError, match="reference"):
        qengine.add_lora(copy.deepcopy(q), r=4, init="correct", calibration=ids)
    with pytest.raises(ValueError, match="calibration"):
        qengine.add_lora(copy.deepcopy(q), r=4, init="correct", reference=ref)
    with pytest.raises(ValueError, match="init='correct'"):
        qengine.add_lora(copy.deepcopy(q), r=4, calibration=ids)
    with pytest.raises(ValueError, match="QuantLinear"):
        qengine.add_lora(copy.deepcopy(ref), r=4, init="correct", calibration=ids, reference=ref,
                         target_modules=["up_proj"])
    with pytest.raises(ValueError, match="rank"):
        correction_factors(torch.randn(8, 8), torch.randn(8, 8), None, 9)
    with pytest.raises(ValueError, match="H must be"):
        correction_factors(torch.randn(8, 8), torch.randn(8, 8), torch.eye(4), 2)
