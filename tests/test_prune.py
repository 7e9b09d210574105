"""qengine.prune: patterns against float64 references, Wanda scores from collected input
norms, in-place model pruning, exact zeros after quantization in every format and layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qengine
from cases import FORMAT_NAMES, fmt_of, make_input


def ref_unstructured(s: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Kept = all but the round(sparsity * n) smallest scores (ties: the lower index pruned)."""
    flat = s.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    drop = set(order[: round(sparsity * len(flat))])
    return torch.tensor([i not in drop for i in range(len(flat))]).reshape(s.shape)


def ref_24(s: torch.Tensor) -> torch.Tensor:
    rows = s.reshape(-1, 4).tolist()
    out = []
    for r in rows:
        keep = sorted(range(4), key=lambda i: (-r[i], i))[:2]
        out.append([i in keep for i in range(4)])
    return torch.tensor(out).reshape(s.shape)


@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 8), (64, 256)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_matches_reference(shape, sparsity):
    w = make_input(shape, torch.float32)
    before = w.clone()
    pruned, mask = qengine.prune(w, sparsity)
    assert torch.equal(w, before)  # never modified
    assert torch.equal(mask, ref_unstructured(w.double().abs(), sparsity))
    assert torch.equal(pruned, torch.where(mask, w, 0.0))
    assert int((~mask).sum()) == round(sparsity * w.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_24_keeps_exactly_the_two_largest(dtype):
    w = make_input((9, 20), dtype)
    w.reshape(-1, 4)[0] = torch.tensor([1.0, -1.0, 1.0, 0.5])  # a tie: the lower positions kept
    pruned, mask = qengine.prune(w, 0.5, "2:4")
    assert bool((mask.reshape(-1, 4).sum(1) == 2).all())
    assert torch.equal(mask, ref_24(w.double().abs()))
    assert mask.reshape(-1, 4)[0].tolist() == [True, True, False, False]
    assert pruned.dtype == dtype and torch.equal(pruned, torch.where(mask, w, torch.zeros((), dtype=dtype)))


def test_row_pattern():
    w = make_input((10, 6), torch.float32)
    pruned, mask = qengine.prune(w, 0.3, "row")
    norms = w.double().pow(2).sum(1)
    dropped = sorted(range(10), key=lambda i: (norms[i].item(), i))[:3]
    expect = torch.ones(10, 6, dtype=torch.bool)
    expect[dropped] = False
    assert torch.equal(mask, expect) and torch.equal(pruned, torch.where(mask, w, 0.0))


def test_wanda_scores_from_collected_norms():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(5, 8) * torch.linspace(0.1, 3.0, 8) for _ in range(3)]
    norms = qengine.collect_input_norms(model, batches)
    x = torch.cat(batches).double()
    assert torch.allclose(norms["0"].double(), x.pow(2).sum(0).sqrt(), rtol=1e-6)
    h = torch.relu(x @ model[0].weight.double().t() + model[0].bias.double())
    assert torch.allclose(norms["2"].double(), h.pow(2).sum(0).sqrt(), rtol=1e-5)
    assert not model[0]._forward_pre_hooks  # hooks removed
    w0 = model[0].weight.detach().clone()
    masks = qengine.prune(model, 0.5, "2:4", input_norms=norms, skip=["2"])
    assert set(masks) == {"0"}
    assert torch.equal(masks["0"], ref_24(w0.double().abs() * norms["0"].double()))
    assert torch.equal(model[0].weight.detach(), torch.where(masks["0"], w0, 0.0))  # in place


def test_explicit_scores_and_model_dicts():
    w = make_input((4, 8), torch.float32)
    scores = torch.rand(4, 8)
    _, mask = qengine.prune(w, 0.25, scores=scores)
    assert torch.equal(mask, ref_unstructured(scores.double(), 0.25))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_pruned_then_quantized_is_exactly_zero(fmt, pattern, double_quant):
    w = make_input((12, 72), torch.float32, "positive")  # positive: no block has a zero on its grid
    pruned, mask = qengine.prune(w, 0.5, pattern)
    layouts = [None, "2:4"] if pattern == "2:4" else [None]
    for sparsity in layouts:
        q = qengine.quantize(pruned, fmt_of(fmt), 32, double_quant=double_quant, sparsity=sparsity, mask=mask)
        for dtype in (torch.float32, torch.bfloat16):
            d = q.dequantize(dtype)
            assert bool((d[~mask] == 0).all()), (sparsity, dtype)
        q2 = qengine.QuantizedTensor.from_state_dict(q.state_dict())
        assert torch.equal(q2.dequantize(), q.dequantize())
        x = torch.randn(3, 72)
        y_ref = x.double() @ q.dequantize().double().t()
        assert torch.allclose(qengine.matmul(x, q).double(), y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int8", "cb5"])
def test_formats_with_a_zero_need_no_mask(fmt):
    w = make_input((6, 64), torch.float32)
    pruned, mask = qengine.prune(w, 0.6)
    q = qengine.quantize(pruned, fmt_of(fmt), 64, mask=mask)
    assert q.mask is None  # nothing stored: zeros encode exactly
    assert bool((qengine.quantize(pruned, fmt_of(fmt), 64).dequantize()[~mask] == 0).all())


def test_mask_stored_only_where_needed():
    w = make_input((6, 64), torch.float32, "positive")
    pruned, mask = qengine.prune(w, 0.5)
    q = qengine.quantize(pruned, "uint4", 64, mask=mask)
    assert q.mask is not None and q.nbytes == qengine.quantize(pruned, "uint4", 64).nbytes + 6 * 64 // 8
    assert qengine.quantize(w, "uint4", 64, mask=torch.ones_like(mask)).mask is None


def test_bad_input():
    w = torch.randn(4, 8)
    for bad in (-0.1, 1.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="sparsity"):
            qengine.prune(w, bad)
    with pytest.raises(ValueError, match="sparsity must be 0.5"):
        qengine.prune(w, 0.3, "2:4")
    with pytest.raises(ValueError, match="divisible by 4"):
        qengine.prune(torch.randn(4, 6), 0.5, "2:4")
    with pytest.raises(ValueError, match="pattern"):
        qengine.prune(w, 0.5, "3:4")
    with pytest.raises(ValueError, match="shape"):
        qengine.prune(w, 0.5, scores=torch.rand(8, 4))
    with pytest.raises(ValueError, match="input_norms"):
        qengine.prune(w, 0.5, input_norms=torch.rand(4))
    with pytest.raises(TypeError, match="float"):
        qengine.prune(torch.ones(4, 8, dtype=torch.int32), 0.5)
    with pytest.raises(ValueError, match="shape"):
        qengine.quantize(w, "nf4", 32, mask=torch.ones(8, 4, dtype=torch.bool))
    model = nn.Linear(6, 3)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="divisible by 4"):
        qengine.prune(model, 0.5, "2:4")
    assert torch.equal(model.weight, before)
