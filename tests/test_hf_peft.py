"""PEFT interop: peft's LoRA on top of qengine's QuantLinear through PEFT's custom-module
mechanism (qengine.compat.peft). Skipped when peft or transformers is not installed."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine.nn import LoRALinear, QuantLinear
from support import train_causal_lm

peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra of torch-qengine)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra of torch-qengine)")
from qengine.compat.peft import LoraQuantLinear, register  # noqa: E402


def _model():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return qengine.quantize_model(transformers.LlamaForCausalLM(cfg), progress=False)


# peft reads transformers' deprecated is_gradient_checkpointing alias (a warning between those
# two packages, not about qengine); only that warning is silenced.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_on_quantlinear_matches_qengine_lora():
    model = _model()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        base_logits = model(ids).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    register(config)
    pm = peft.get_peft_model(model, config)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantLinear) and isinstance(layer.base_layer, QuantLinear)
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, base_logits)  # B starts at zero
        layer.lora_B["default"].weight.normal_(0, 0.1)
    # The same adapter through qengine's fused LoRALinear gives the same layer output.
    ours = LoRALinear(layer.base_layer, r=4, alpha=8)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), ours(x), rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    losses = train_causal_lm(pm, ids, [p for p in pm.parameters() if p.requires_grad], 4)
    assert losses[-1] < losses[0]
    with pytest.raises(TypeError, match="re-quantize"):
        pm.merge_and_unload()


# ---------------------------------------------------------------------------- a plain LoraConfig
# With bitsandbytes, PEFT finds its Linear4bit by itself; with qengine it must too: no register().

def _train_plain(pm, ids, steps=4):
    """Trains pm's trainable parameters on one batch; returns (losses, state dict before)."""
    before = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    return train_causal_lm(pm, ids, [p for p in pm.parameters() if p.requires_grad], steps), before


def _check_only_lora_changed(pm, before, lora_key=lambda k: "lora_" in k):
    after = pm.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(lora_key(k) for k in changed), sorted(changed)[:5]
    frozen = [k for k in before if ".base_layer." in k]  # the QuantLinear state under each adapter
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # bitwise unchanged


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_plain_lora_config_needs_no_register():
    model = _model()
    ids = torch.randint(0, 128, (2, 10))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(model, config)
    assert not config._custom_modules  # found through PEFT's LoRA dispatch, not a per-config mapping
    layers = [m for m in pm.modules() if isinstance(m, LoraQuantLinear)]
    assert len(layers) == 4 and all(isinstance(m.base_layer, QuantLinear) for m in layers)
    losses, before = _train_plain(pm, ids)
    assert losses[-1] < losses[0]
    _check_only_lora_changed(pm, before)
    with pytest.raises(TypeError, match="re-quantize"):
        pm.merge_and_unload()

    # A user's own LoraConfig._register_custom_module mapping for QuantLinear still wins.
    class Mine(LoraQuantLinear):
        pass

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    config._register_custom_module({QuantLinear: Mine})
    pm = peft.get_peft_model(_model(), config)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, Mine)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_plain_lora_config_all_linear():
    # "all-linear" takes nn.Linear (bitsandbytes' layers subclass it); QuantLinear counts too,
    # except the output layer (here quantized as well), as PEFT leaves out a float lm_head.
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                   tie_word_embeddings=False)
    model = qengine.quantize_model(transformers.LlamaForCausalLM(cfg), skip=(), progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    wrapped = {n.removeprefix("base_model.model.model.") for n, m in pm.named_modules()
               if isinstance(m, LoraQuantLinear)}
    expected = {f"layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert wrapped == expected
    assert isinstance(pm.base_model.model.lm_head, QuantLinear)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_plain_dora_config():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    pm = peft.get_peft_model(_model(), config)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantLinear)
    w = layer.base_layer.dequantize(torch.float32).double()
    mag = layer.lora_magnitude_vector["default"].weight.double()
    assert torch.allclose(mag, w.norm(dim=1), rtol=1e-5)  # DoRA's per-row norm of the quantized base
    losses, before = _train_plain(pm, torch.randint(0, 128, (2, 10)))
    assert losses[-1] < losses[0]
    _check_only_lora_changed(pm, before)
    assert any("lora_magnitude_vector" in k and not torch.equal(v, before[k]) for k, v in pm.state_dict().items())


# ---------------------------------------------------------------------------- the fused side path
def _peft_layer(**config):
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config})
    pm = peft.get_peft_model(_model(), config)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.weight.normal_(0, 0.2)
    return pm, layer


def _peft_own(layer, x, **kwargs):
    """PEFT's own forward of the layer (the side path beside the quantized matmul)."""
    return super(LoraQuantLinear, layer).forward(x, **kwargs)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 40])  # the small-batch kernel, the large-batch path
def test_one_adapter_runs_fused_and_matches_peft(dtype, rows):
    """One active vanilla adapter: the side path fused into QuantLinear's kernel, within float
    rounding of PEFT's own forward; gradients of x, A and B likewise."""
    pm, layer = _peft_layer(lora_dropout=0.1)
    layer.eval()  # dropout in eval is the identity: fused
    x = torch.randn(2, rows, 64).to(dtype)
    assert layer._fused_forward(x, (), {}) is not None
    outs, grads = [], []
    for run in (layer, lambda t: _peft_own(layer, t)):
        xi = x.clone().requires_grad_()
        y = run(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        y.backward(g)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        outs.append(y.detach().double())
        grads.append([xi.grad.double(), a.grad.double().clone(), b.grad.double().clone()])
        a.grad = b.grad = None
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert outs[0].dtype == outs[1].dtype
    assert torch.allclose(outs[0], outs[1], rtol=tol, atol=tol * outs[1].abs().max().item())
    for got, want in zip(*grads):
        assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # peft's note on a base without bias
def test_peft_forward_runs_where_fusing_does_not_apply():
    """Every case the fused path does not cover runs PEFT's own forward, bit for bit."""
    x = torch.randn(2, 5, 64)
    pm, layer = _peft_layer(lora_dropout=0.5)  # dropout while training
    layer.train()
    assert layer._fused_forward(x, (), {}) is None
    pm, layer = _peft_layer(lora_bias=True)
    assert layer._fused_forward(x, (), {}) is None
    pm, layer = _peft_layer(use_dora=True)
    assert layer._fused_forward(x, (), {}) is None
    pm, layer = _peft_layer()
    assert layer._fused_forward(x, (), {}) is not None
    assert layer._fused_forward(x, (), {"adapter_names": ["default"] * 2}) is None
    with pm.disable_adapter():
        assert layer._fused_forward(x, (), {}) is None
        assert torch.equal(layer(x), layer.base_layer(x))
    pm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    layer.set_adapter(["default", "other"])
    assert layer._fused_forward(x, (), {}) is None
    with torch.no_grad():
        assert torch.equal(layer(x), _peft_own(layer, x))
    layer.set_adapter("default")
    handle = layer.lora_A["default"].register_forward_hook(lambda m, i, o: None)
    assert layer._fused_forward(x, (), {}) is None
    handle.remove()
    assert layer._fused_forward(x, (), {}) is not None


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_saved_adapter_loads_onto_quantized_model(tmp_path):
    # PeftModel.from_pretrained builds its LoraConfig from JSON: no register() could reach it.
    import copy

    model = _model()
    twin = copy.deepcopy(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(twin, tmp_path)
    assert any(isinstance(m, LoraQuantLinear) for m in loaded.modules())
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pm(ids).logits)


def test_failed_install_names_the_call(monkeypatch, caplog):
    import qengine.compat.peft as cp

    def broken():
        raise TypeError("peft changed")

    monkeypatch.setattr(cp, "install", broken)
    with caplog.at_level("WARNING", logger="qengine"):
        cp._install_on_import()
    assert "qengine.compat.peft.register(config)" in caplog.text


_FRESH = r"""
import sys
{first}
import qengine
assert callable(qengine.compat.bnb.to_bnb_state_dict)  # an attribute after a bare `import qengine`
assert ("peft" in sys.modules) == {peft_first}, "import qengine (or qengine.compat) must not import peft"
import importlib.util
assert importlib.util.find_spec("peft") is not None  # a probe that imports nothing (transformers' is_peft_available)
import peft, torch
from peft.tuners.lora.model import LoraModel
assert getattr(LoraModel._create_new_module, "_qengine", False), "dispatch not installed"
model = torch.nn.Sequential(qengine.nn.QuantLinear.from_linear(torch.nn.Linear(64, 32)))
pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0"]))
assert type(pm.base_model.model[0]).__name__ == "LoraQuantLinear"
assert callable(qengine.compat.peft.register)
print("ok")
"""


@pytest.mark.slow  # two fresh interpreters importing torch, transformers and peft
@pytest.mark.parametrize("peft_first", [False, True], ids=["qengine_then_peft", "peft_then_qengine"])
def test_fresh_interpreter_either_import_order(peft_first):
    """The hook registers when peft finishes importing (or at once if it already has), and
    qengine.compat / compat.peft / compat.bnb are attributes after a bare `import qengine`."""
    import subprocess
    import sys

    code = _FRESH.format(first="import peft" if peft_first else "", peft_first=peft_first)
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning:qengine", "-c", code], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
