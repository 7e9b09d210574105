"""Things a user could not have guessed, made explicit: QuantizedTensor.to(dtype), LoRA on LoRA,
re-quantizing a quantized model, requires_grad on packed codes, double backward, out= into a
tensor that requires grad, thread counts, codebook bit widths, NaN gradients in 8-bit optimizer
blocks, the timing and bits-per-parameter columns of the CLI."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import qengine
from qengine.cli import info as cli_info
from qengine.nn import LoRALinear, QuantLinear
from qengine.tensor import NESTED_BLOCKSIZE, PackedParameter
from support import Block


def _model():
    return nn.Sequential(Block(64, 128), Block(64, 128))


# ---------------------------------------------------------------------------- (a) to(dtype)
@pytest.mark.parametrize("dq", [False, True])
def test_to_a_dtype_raises_and_says_what_to_do(dq):
    q = qengine.quantize(torch.randn(32, 64), "nf4", 64, double_quant=dq)
    packed = q.packed.clone()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        with pytest.raises(TypeError, match=r"devices only.*dequantize\(dtype="):
            q.to(dtype)
    assert torch.equal(q.packed, packed) and q.dtype == torch.float32
    assert q.dequantize(torch.float16).dtype == torch.float16  # the way the message points to


def test_to_a_device_keeps_working():
    q = qengine.quantize(torch.randn(32, 64), "uint4", 64, double_quant=True)
    assert q.to("cpu") is q and q.to(torch.device("cpu")) is q and q.cpu() is q
    m = q.to("meta")
    assert m.device.type == "meta" and m.scales.quantized.device.type == "meta" and m.offsets.mean.device.type == "meta"
    with pytest.raises(TypeError, match="takes a device"):
        q.to("float16")


# ---------------------------------------------------------------------------- (b) add_lora twice
def test_add_lora_on_a_model_with_lora_names_the_layer():
    model = qengine.add_lora(qengine.quantize_model(_model(), progress=False), r=4)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"already has a LoRA adapter \(0\.up_proj and 3 more\)"):
        qengine.add_lora(model, r=4)  # before: "no layer of the model matches target_modules=None"
    with pytest.raises(ValueError, match=r"1\.down_proj already has a LoRA adapter"):
        qengine.add_lora(model, r=8, target_modules=["1.down_proj"])
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing wrapped twice
    assert not any(isinstance(m.base_layer, LoRALinear) for m in model.modules() if isinstance(m, LoRALinear))


def test_add_lora_names_an_adapted_layer_among_the_targets():
    model = qengine.add_lora(qengine.quantize_model(_model(), progress=False), r=4, target_modules=["0.up_proj"])
    with pytest.raises(ValueError, match=r"0\.up_proj already has a LoRA adapter"):
        qengine.add_lora(model, r=4, target_modules=["up_proj"])  # before: 1.up_proj wrapped, 0.up_proj skipped
    assert isinstance(model[1].up_proj, QuantLinear)
    # The default targets are the layers without an adapter (documented): the others get one.
    qengine.add_lora(model, r=2)
    assert all(isinstance(m, LoRALinear) and isinstance(m.base_layer, QuantLinear)
               for m in (model[0].up_proj, model[0].down_proj, model[1].up_proj, model[1].down_proj))
    assert model[0].up_proj.r == 4 and model[1].up_proj.r == 2


# ---------------------------------------------------------------------------- (c) quantize_model twice
@pytest.mark.parametrize("other", [dict(format="int8"), dict(blocksize=128), dict(double_quant=False),
                                   dict(blocksize=None)], ids=["format", "blocksize", "double_quant", "per_row"])
def test_quantize_model_again_with_other_settings_raises(other):
    model = qengine.quantize_model(_model(), progress=False)
    packed = model[0].up_proj.weight_packed
    key, value = next(iter(other.items()))
    with pytest.raises(ValueError, match=r"0\.up_proj is already quantized") as e:
        qengine.quantize_model(model, progress=False, **other)
    msg = str(e.value)
    settings = {"format": "format='nf4'", "blocksize": "blocksize=64", "double_quant": "double_quant=True"}
    assert settings.get(key, "blocksize=64") in msg  # the layer's setting ...
    assert (f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}") in msg  # ... and the requested one
    assert model[0].up_proj.weight_packed is packed and model[0].up_proj.format.name == "nf4"


def test_quantize_model_again_with_the_same_settings_is_a_no_op():
    model = qengine.quantize_model(_model(), "int4", 128, False, skip=["1"], progress=False)
    packed = model[0].up_proj.weight_packed
    assert isinstance(model[1].up_proj, nn.Linear)
    qengine.quantize_model(model, "int4", 128, False, skip=[], progress=False)
    assert model[0].up_proj.weight_packed is packed  # not re-quantized
    assert isinstance(model[1].up_proj, QuantLinear) and model[1].up_proj.format.name == "int4"  # the rest converted
    with pytest.raises(ValueError, match="compute_dtype"):
        qengine.quantize_model(model, "int4", 128, False, compute_dtype=torch.bfloat16, progress=False)


# ---------------------------------------------------------------------------- (d) requires_grad on packed codes
def test_requires_grad_on_a_quantized_model_names_the_packed_weight():
    model = qengine.quantize_model(_model(), progress=False)
    with pytest.raises(RuntimeError, match=r"weight_packed .*cannot require grad.*mark_only_lora_trainable"):
        model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="weight_packed"):
        model[0].up_proj.weight_packed.requires_grad_()
    model.requires_grad_(False)  # freezing is fine
    # What the message suggests works.
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    model(torch.randn(3, 64)).sum().backward()
    assert model[0].up_proj.bias.grad is not None


def test_packed_weight_stays_a_parameter_through_copies_and_moves():
    layer = QuantLinear.from_linear(nn.Linear(64, 32))
    p = layer.weight_packed
    assert isinstance(p, nn.Parameter) and isinstance(p, PackedParameter) and not p.requires_grad
    assert any(q is p for q in layer.parameters())  # FSDP2 shards parameters
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), layer.to(torch.bfloat16)):
        assert type(other.weight_packed) is PackedParameter and other.weight_packed.dtype == torch.uint8
        assert torch.equal(other.weight_packed, p)
    sd = layer.state_dict()
    assert type(sd["weight.packed"]) is torch.Tensor  # plain tensors in the state dict
    fresh = QuantLinear(64, 32)
    fresh.load_state_dict(sd)
    assert type(fresh.weight_packed) is PackedParameter and torch.equal(fresh.weight_packed, p)


# ---------------------------------------------------------------------------- (e) double backward
@pytest.mark.parametrize("rows", [3, 40], ids=["kernel", "dense"])
def test_double_backward_through_matmul_is_refused_clearly(rows):
    q = qengine.quantize(torch.randn(32, 64), "nf4", 64, double_quant=True)
    x = torch.randn(rows, 64, requires_grad=True)
    y = qengine.matmul(x, q)
    g, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g_plain, = torch.autograd.grad(qengine.matmul(x, q).square().sum(), x)
    assert torch.equal(g.detach(), g_plain)  # first order is unchanged
    with pytest.raises(NotImplementedError, match=r"qengine\.matmul .*double backward"):
        torch.autograd.grad(g.square().sum(), x)


def test_double_backward_through_quantlinear_is_refused_clearly():
    layer = QuantLinear.from_linear(nn.Linear(64, 32))
    x = torch.randn(2, 64, requires_grad=True)
    g, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"qengine\.matmul"):
        g.sum().backward()


# ---------------------------------------------------------------------------- (f) out= that requires grad
@pytest.mark.parametrize("sparsity", [None, "2:4"])
@pytest.mark.parametrize("via", ["method", "function"])
def test_dequantize_out_into_a_leaf_that_requires_grad_is_refused(via, sparsity):
    q = qengine.quantize(torch.randn(16, 64), "nf4", 64, sparsity=sparsity)
    t = torch.randn(16, 64, requires_grad=True)
    before = t.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        q.dequantize(out=t) if via == "method" else qengine.dequantize(q, out=t)
    assert torch.equal(t.detach(), before)
    nonleaf = t * 2
    with pytest.raises(RuntimeError, match="requires grad"):
        q.dequantize(out=nonleaf)
    with torch.no_grad():  # e.g. initialising a parameter: allowed, as torch's in-place ops are
        q.dequantize(out=t)
    assert torch.equal(t.detach(), q.dequantize())


# ---------------------------------------------------------------------------- (g) threads
@pytest.mark.parametrize("n", [0, -3, qengine.MAX_NUM_THREADS + 1, 10**6, 2**40])
def test_set_num_threads_out_of_range(n):
    before = qengine.build_info()["num_threads"]
    with pytest.raises(ValueError, match=f"from 1 to {qengine.MAX_NUM_THREADS}"):
        qengine.set_num_threads(n)
    assert qengine.build_info()["num_threads"] == before


@pytest.mark.parametrize("n", [True, 2.0, "2"])
def test_set_num_threads_needs_an_int(n):
    with pytest.raises(TypeError, match="must be an int"):
        qengine.set_num_threads(n)


_ENV_PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import qengine
print(json.dumps({"threads": qengine.build_info()["num_threads"],
                  "warnings": [(w.category.__name__, str(w.message)) for w in caught
                               if "QENGINE_NUM_THREADS" in str(w.message)]}))
"""


def _import_with_env(value: str) -> dict:
    env = dict(os.environ, QENGINE_NUM_THREADS=value)
    r = subprocess.run([sys.executable, "-c", _ENV_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value", ["abc", "0", "-3", "4x"])
def test_malformed_num_threads_env_warns(value):
    res = _import_with_env(value)
    used = min(os.cpu_count() or 1, qengine.MAX_NUM_THREADS)
    assert res["threads"] == used
    assert len(res["warnings"]) == 1
    category, message = res["warnings"][0]
    assert category == "RuntimeWarning"
    assert f"QENGINE_NUM_THREADS={value!r}" in message and f"using {used} threads" in message


def test_valid_num_threads_env_is_used_silently():
    assert _import_with_env("1") == {"threads": 1, "warnings": []}


# ---------------------------------------------------------------------------- (h) codebook bits
def test_codebook_of_17_values_needs_bits_8():
    values = torch.linspace(-1, 1, 17, dtype=torch.float64).tolist()
    with pytest.raises(ValueError, match="17 values does not fit 4 bits.*pass bits=8"):
        qengine.codebook(values)
    with pytest.raises(ValueError, match="2 to 16 values"):
        qengine.codebook(values, bits=4)
    assert qengine.codebook(values, bits=8).bits == 8
    assert qengine.codebook(values[:16]).bits == 4


# ---------------------------------------------------------------------------- (i) NaN gradients, 8-bit states
def _nan_run(opt_cls):
    p = nn.Parameter(torch.randn(700))
    opt = opt_cls([p], lr=1e-3)
    p.grad = torch.randn(700)
    opt.step()
    g = torch.randn(700)
    g[300] = float("nan")
    p.grad = g
    opt.step()
    at_step = torch.isnan(p.detach()).nonzero().flatten().tolist()
    p.grad = torch.randn(700)
    opt.step()
    after = torch.isnan(p.detach()).nonzero().flatten().tolist()
    return at_step, after


def test_nan_gradient_poisons_its_8bit_block_from_the_next_step():
    """Documented behaviour (PagedAdamW8bit's docstring): the NaN element at once, then its
    whole 256-element block (elements 256..511 of this 700-element parameter), nothing else."""
    at_step, after = _nan_run(qengine.optim.PagedAdamW8bit)
    assert at_step == [300]
    assert after == list(range(256, 512))
    at_step, after = _nan_run(qengine.optim.PagedAdamW)  # float32 states: the element only, as torch's AdamW
    assert at_step == [300] and after == [300]


# ---------------------------------------------------------------------------- (j) `qengine formats` timing
def test_formats_times_a_median_after_a_warm_up(monkeypatch, capsys):
    calls = []
    real = cli_info.quantize

    def counting(w, *a, **k):
        calls.append(tuple(w.shape))
        return real(w, *a, **k)

    monkeypatch.setattr(cli_info, "quantize", counting)
    args = type("Args", (), {"seed": 0, "shape": (32, 128), "blocksize": 64})()
    assert cli_info.cmd_formats(args) == 0
    rows = 2 * 8  # 8 formats, with and without double quant
    assert calls.count((32, 128)) == rows * (1 + cli_info.TIMING_REPEATS)
    assert f"median of {cli_info.TIMING_REPEATS} calls" in capsys.readouterr().out


# ---------------------------------------------------------------------------- (k) bits per parameter
def _stored_bytes_formula(numel, bits, table_len, blocksize, minmax, double_quant):
    """codes + codebook + per part (scales, offsets): float32 per block, or with double quant
    1 byte per block + float32 absmax per 256 blocks + the 256-value dynamic8 table + a mean."""
    nblocks = -(-numel // blocksize)
    part = (nblocks + 4 * -(-nblocks // 256) + 4 * 256 + 4) if double_quant else 4 * nblocks
    return -(-numel * bits // 8) + 4 * table_len + (2 if minmax else 1) * part


@pytest.mark.parametrize("fmt, dq, expected", [
    ("nf4", False, 4.5000305), ("nf4", True, 4.1274738), ("uint4", True, 4.2549171), ("int8", True, 8.1279297),
])
def test_bits_per_param_of_a_4096x4096_weight(fmt, dq, expected):
    w = torch.randn(4096, 4096)
    q = qengine.quantize(w, fmt, 64, double_quant=dq)
    f = qengine.get_format(fmt)
    assert NESTED_BLOCKSIZE == 256
    formula = 8.0 * _stored_bytes_formula(w.numel(), f.bits, len(f.values), 64, f.rule == "minmax", dq) / w.numel()
    assert q.bits_per_param == formula
    assert cli_info.bits_per_param(f, (4096, 4096), 64, dq) == formula
    assert formula == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int8", "uint4", "uint8", "dynamic8"])
def test_info_helper_matches_quantize_on_an_odd_shape(fmt, dq):
    q = qengine.quantize(torch.randn(333, 129), fmt, 64, double_quant=dq)
    assert cli_info.bits_per_param(qengine.get_format(fmt), (333, 129), 64, dq) == q.bits_per_param


def test_info_prints_the_shape_and_the_exact_figures(capsys):
    assert cli_info.cmd_info(None) == 0
    out = capsys.readouterr().out
    assert "4096x4096 weight at block 64" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ")}
    for name, plain, dq in [("nf4", "4.500", "4.127"), ("int8", "8.500", "8.128"), ("uint4", "5.000", "4.255"),
                            ("uint8", "9.000", "8.255")]:
        assert f"{plain} /  {dq}" in lines[name]
