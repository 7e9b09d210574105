"""Layers and quantized tensors whose state was replaced after it was built (attribute
assignment, `.data = ...`) are checked against what they cached (the packed byte count, the
quant_storage dtype, one-element means, the mask's size) before anything reaches a native
call: a clear ValueError / TypeError naming the tensor, never a prefix of the wrong bytes read
as codes or an unnamed torch error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qengine
from qengine.nn import LoRALinear, QuantExperts, QuantLinear


def _layer(**kwargs) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(128, 64), "nf4", 64, True, **kwargs)


def _calls(layer):
    """Every way a layer hands its packed codes on: forward (fused small batch, large batch),
    dequantize, state_dict."""
    return {"forward_2": lambda: layer(torch.randn(2, 128)), "forward_40": lambda: layer(torch.randn(40, 128)),
            "dequantize": layer.dequantize, "state_dict": layer.state_dict}


@pytest.mark.parametrize("replace", [
    lambda p: nn.Parameter(torch.cat([p.detach(), p.detach()]), requires_grad=False),  # longer
    lambda p: nn.Parameter(torch.randint(0, 99, (p.numel() + 1,), dtype=torch.int32), requires_grad=False),
    lambda p: nn.Parameter(torch.stack([p.detach(), p.detach()], 1)[:, 0], requires_grad=False),  # strided
], ids=["doubled", "one_more", "strided"])
def test_int32_storage_packed_replaced_by_another_size(replace):
    """With quant_storage=int32, _packed_uint8 used to cut a longer replacement to the cached
    byte count (running on the wrong codes, silently) or fail inside .view with no name."""
    layer = _layer(quant_storage=torch.int32)
    torch.manual_seed(1)
    x = torch.randn(2, 128)
    expected = layer(x)
    good = layer.weight_packed
    layer.weight_packed = replace(good)
    for name, call in _calls(layer).items():
        with pytest.raises(ValueError, match=r"weight_packed must be a contiguous torch.int32 tensor of 1024 "
                                             r"elements \(4096 bytes"):
            call()
    layer.weight_packed = good
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("storage", [torch.uint8, torch.int32], ids=["uint8", "int32"])
def test_packed_replaced_by_another_dtype(storage):
    """The same bytes in another integer dtype used to be read as a prefix of its bytes."""
    layer = _layer(quant_storage=storage)
    other = torch.int16 if storage == torch.uint8 else torch.int64
    raw = layer.weight_packed.detach().view(torch.uint8)
    layer.weight_packed.data = torch.cat([raw, raw]).view(other)  # `.data =`, keeping the parameter
    for name, call in _calls(layer).items():
        with pytest.raises(TypeError, match=rf"weight_packed must be {storage} \(this layer's quant_storage\), "
                                            rf"got {other}"):
            call()


def test_lora_layer_over_a_replaced_base():
    layer = _layer()
    torch.manual_seed(2)
    lora = LoRALinear(layer, r=4)
    layer.weight_packed.data = layer.weight_packed.detach().view(torch.int16).clone()
    x = torch.randn(3, 128, requires_grad=True)
    with pytest.raises(TypeError, match="weight_packed must be torch.uint8"):
        lora(x)


def test_experts_with_a_replaced_packed_weight():
    torch.manual_seed(3)
    experts = QuantExperts.from_weights(torch.randn(4, 64, 64), torch.randn(4, 64, 32))
    x = torch.randn(5, 64)
    idx, w = torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    expected = experts(x, idx, w)
    good = experts.down_proj.weight_packed
    experts.down_proj.weight_packed = nn.Parameter(good.detach().view(torch.int16).clone(), requires_grad=False)
    with pytest.raises(TypeError, match="weight_packed must be torch.uint8"):
        experts(x, idx, w)
    experts.down_proj.weight_packed = good
    assert torch.equal(experts(x, idx, w), expected)


def test_replaced_nested_means_are_named():
    """A double-quantized mean is one element; a replacement of another size used to fail in
    torch's reshape / broadcasting with no name."""
    torch.manual_seed(4)
    sparse = QuantLinear.from_linear(nn.Linear(128, 64), "nf4", 64, True, sparsity="2:4")
    sparse.weight_scales_mean = torch.zeros(2)
    with pytest.raises(ValueError, match="weight_scales_mean must have 1 element"):
        sparse(torch.randn(2, 128))
    affine = QuantLinear.from_linear(nn.Linear(128, 64), "uint4", 64, True)
    affine.weight_offsets_mean = torch.zeros(2)
    with pytest.raises(ValueError, match="weight_offsets_mean must have 1 element"):
        affine(torch.randn(2, 128))

    q = qengine.quantize(torch.randn(64, 128), "uint4", 64, True)
    for part in (q.scales, q.offsets):
        good = part.mean
        part.mean = torch.zeros(2)
        for call in (q.dequantize, lambda: qengine.matmul(torch.randn(2, 128), q)):
            with pytest.raises(ValueError, match="mean must be a one-element tensor"):
                call()
        part.mean = good
    q.dequantize()


@pytest.mark.parametrize("replace", [lambda m: m[: m.numel() // 2].clone(), lambda m: torch.cat([m, m]),
                                     lambda m: m.to(torch.int16)], ids=["shorter", "longer", "int16"])
def test_replaced_mask_is_named(replace):
    """A stored pruning mask of another size used to fail in torch's masked_fill (shorter) or
    silently mask by the first bits of whatever it held (longer, wider)."""
    torch.manual_seed(5)
    mask = torch.rand(64, 128) > 0.5
    q = qengine.quantize(torch.randn(64, 128) * mask, "uint4", 64, False, mask=mask)
    expected = q.dequantize()
    good = q.mask
    q.mask = replace(good)
    for call in (q.dequantize, lambda: q.dequantize(out=torch.empty(64, 128)),
                 lambda: qengine.matmul(torch.randn(2, 128), q)):
        with pytest.raises(ValueError, match=r"mask must be uint8 \[1024\] for a tensor of shape \(64, 128\)"):
            call()
    q.mask = good
    assert torch.equal(q.dequantize(), expected)
