"""quantize_model(method="gptq" | "search" | "gptq+search", calibration=...): the capture block by
block (H equal to X^T X of the float model's inputs, shared by layers reading one input),
RTN's layout, lower error than RTN on a tiny Llama trained here on the shipped demo text,
sequential and not, the whole-model fallback, MoE experts calibrated per expert, and bad
input. Checkpoints and the CLI: test_calibrate_io.py."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from torch import nn

import qengine
from qengine.calibrate.blockwise import blockwise
from qengine.calibrate.capture import calibration_batches, find_blocks
from qengine.calibrate.evaluate import layer_errors
from qengine.nn import QuantLinear

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

DEMO = os.path.join(os.path.dirname(qengine.__file__), "assets", "demo_text.txt")
SEQ = 64
PROJ = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of small ops (GPTQ's column sweep, a tiny model's forward); on a loaded 2-core
    machine each op split over threads waits for a descheduled worker. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(seed=0, **over):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(over)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def stream():
    from qengine.text_data import ByteTokenizer, read_texts, tokenize_corpus

    return tokenize_corpus(read_texts(DEMO), ByteTokenizer())


@pytest.fixture(scope="module")
def split(stream):
    """(calibration windows [24, 64], held-out windows [the rest, 64]) of the demo text."""
    n = stream.numel() // SEQ
    windows = stream[: n * SEQ].reshape(n, SEQ)
    return windows[:24], windows[24:]


@pytest.fixture(scope="module")
def trained(stream):
    """A tiny Llama trained 60 steps on the demo text (trained weights, as real models have:
    correlated activations of unequal energy, which is where GPTQ beats round-to-nearest)."""
    model = _llama(seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, stream.numel() - SEQ, (8,), generator=gen)
        ids = torch.stack([stream[s:s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quantized(model, method, calib=None, **kw):
    m = copy.deepcopy(model)
    extra = {} if calib is None else {"calibration": calib}
    return qengine.quantize_model(m, "int4", 64, True, progress=False, method=method, **extra, **kw)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------- capture
def test_blockwise_capture_equals_float_inputs_xtx():
    # Non-sequential capture on a model whose down_proj input (1024 wide) is summed as strips:
    # every H equals X^T X (float64) of the layer's inputs in a plain forward, and q/k/v (and
    # gate/up) share one H object.
    model = _llama(seed=2, intermediate_size=1024)
    ids = torch.randint(0, 259, (6, 40))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    want, handles = {}, []
    for n in names:
        def hook(mod, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            want[n] = want.get(n, 0) + x.T @ x
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids[:2])
        model(input_ids=ids[2:])
    for h in handles:
        h.remove()
    got, owners = {}, {}

    def record(nms, hooks):
        for n in nms:
            got[n], rows = hooks.hessian(n)
            owners[n] = hooks.owner(n)
            assert rows == ids.numel()
        return 0

    batches = calibration_batches([ids[:2], ids[2:]], model)
    with torch.no_grad():
        blockwise(model, find_blocks(model, names), names, [], batches, True, False, record, lambda e, hooks: None)
    assert set(got) == set(names)
    for n in names:
        assert torch.allclose(got[n].double(), want[n], rtol=1e-4, atol=1e-3 * float(want[n].diagonal().max())), n
    assert owners["model.layers.0.self_attn.k_proj"] == owners["model.layers.0.self_attn.v_proj"] == \
        "model.layers.0.self_attn.q_proj"
    assert got["model.layers.1.mlp.up_proj"] is got["model.layers.1.mlp.gate_proj"]


# ---------------------------------------------------------------------------- quality and layout
def test_gptq_has_rtn_layout_and_lower_error(trained, split):
    calib, held = split
    rtn = _quantized(trained, "rtn")
    gptq = _quantized(trained, "gptq", calib)
    for name in (f"model.layers.{i}.{p}" for i in range(2) for p in PROJ):
        a, b = gptq.get_submodule(name), rtn.get_submodule(name)
        assert isinstance(a, QuantLinear)
        sa, sb = a.quantized().state_dict(), b.quantized().state_dict()
        assert {k: (v.shape, v.dtype) for k, v in sa.items()} == {k: (v.shape, v.dtype) for k, v in sb.items()}
        assert a.quantized().bits_per_param == b.quantized().bits_per_param
    assert qengine.memory_report(gptq)["total"]["bytes"] == qengine.memory_report(rtn)["total"]["bytes"]
    ref = _logits(trained, held)
    assert _rel(_logits(gptq, held), ref) < 0.9 * _rel(_logits(rtn, held), ref)
    # Per layer, on the float model's inputs (robust: each layer isolated from the others).
    weights = {m: {n: mod.quantized() for n, mod in q.named_modules() if isinstance(mod, QuantLinear)}
               for m, q in (("rtn", rtn), ("gptq", gptq))}
    errs = layer_errors(trained, weights, held)
    assert all(e["gptq"] < e["rtn"] for e in errs.values()), errs


@pytest.mark.parametrize("method", ["search", "gptq+search"])
def test_other_methods_beat_rtn(trained, split, method):
    calib, held = split
    ref = _logits(trained, held)
    rtn = _rel(_logits(_quantized(trained, "rtn"), held), ref)
    assert _rel(_logits(_quantized(trained, method, calib), held), ref) < rtn


def test_sequential_and_not_both_work(trained, split):
    calib, held = split
    ref = _logits(trained, held)
    rtn = _rel(_logits(_quantized(trained, "rtn"), held), ref)
    seq = _quantized(trained, "gptq", calib)
    non = _quantized(trained, "gptq", calib, sequential=False)
    assert non._qengine_method["sequential"] is False and seq._qengine_method["sequential"] is True
    for m in (seq, non):
        assert _rel(_logits(m, held), ref) < rtn
    first = "model.layers.0.self_attn.q_proj"  # block 0 sees the same (float) inputs either way
    assert torch.equal(seq.get_submodule(first).quantized().packed, non.get_submodule(first).quantized().packed)
    last = "model.layers.1.mlp.down_proj"
    assert not torch.equal(seq.get_submodule(last).quantized().packed, non.get_submodule(last).quantized().packed)


def test_calibration_forms_agree(trained, split):
    # A tensor of ids, a dict with an attention mask, an iterable of batches and a callable
    # returning one: the same codes (a [N, T] batch is chunked alike in every form).
    calib = split[0][:12]
    forms = [calib, {"input_ids": calib, "attention_mask": torch.ones_like(calib)}, [calib[:6], calib[6:]],
             lambda: iter([calib[:6], calib[6:]])]
    packed = []
    for form in forms:
        q = _quantized(trained, "gptq", form)
        packed.append(torch.cat([m.quantized().packed for m in q.modules() if isinstance(m, QuantLinear)]))
    # Same chunks, same sums: equal codes. Other chunks sum H in another order (float32), so
    # only nearly equal codes are promised between the two groups.
    assert torch.equal(packed[0], packed[1]) and torch.equal(packed[2], packed[3])
    assert (packed[0] != packed[2]).float().mean() < 0.01


def test_whole_model_fallback_for_sequential_models(caplog):
    torch.manual_seed(0)
    mix = torch.randn(48, 48) / 7 + torch.eye(48)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 32))
    calib, held = torch.randn(512, 48) @ mix, torch.randn(256, 48) @ mix
    with caplog.at_level(logging.INFO, logger="qengine"):
        q = qengine.quantize_model(copy.deepcopy(model), "int4", 32, False, progress=False, method="gptq",
                                   calibration=[calib[:256], calib[256:]])
    assert "no decoder-block list" in caplog.text
    assert q._qengine_method["sequential"] is False and q._qengine_method["calibration_tokens"] == 512
    rtn = qengine.quantize_model(copy.deepcopy(model), "int4", 32, False, progress=False)
    with torch.no_grad():
        ref = model(held)
        assert _rel(q(held), ref) < _rel(rtn(held), ref)


def test_experts_without_data_are_rtn_and_with_data_better():
    from qengine.calibrate import gptq_quantize_experts

    E, N, K = 3, 24, 128
    w = torch.randn(E, N, K)
    for dq in (False, True):
        rtn = qengine.quantize(w.reshape(E * N, K).contiguous(), "nf4", 64, dq)
        for H in (None, torch.diag(torch.rand(K) + 0.1)):  # no tokens, or uncorrelated inputs: nearest codes
            q = gptq_quantize_experts(w, [(H, 10)] * E, "nf4", 64, dq)
            a, b = q.state_dict(), rtn.state_dict()
            # Double quant: RTN's nested scales; codes nearest for the decoded scales (RTN's for
            # the scales before nesting), as gptq_quantize's.
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b if not (dq and k == "packed"))
    rtn = qengine.quantize(w.reshape(E * N, K).contiguous(), "nf4", 64, True)
    mixes = [torch.randn(K, K) / K**0.5 + 0.3 * torch.eye(K) for _ in range(E)]
    calib = [torch.randn(512, K) @ m for m in mixes]
    held = [torch.randn(512, K) @ m for m in mixes]
    q = gptq_quantize_experts(w, [(x.T @ x, 512) for x in calib], "nf4", 64, True)
    deq, deq_rtn = q.dequantize().view(E, N, K), rtn.dequantize().view(E, N, K)
    for e in range(E):
        assert (held[e] @ (w[e] - deq[e]).T).norm() < 0.9 * (held[e] @ (w[e] - deq_rtn[e]).T).norm()


def test_moe_experts_calibrated_per_expert(caplog):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qengine.nn import QuantExpertsWeight

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                         num_experts_per_tok=2)
    model = Qwen3MoeForCausalLM(cfg).eval()
    # ~500 tokens per expert: GPTQ needs several times more samples than inputs (64) to generalise.
    ids, held = torch.randint(0, 256, (32, 32)), torch.randint(0, 256, (8, 32))
    rtn = qengine.quantize_model(copy.deepcopy(model), "nf4", 64, progress=False)
    with caplog.at_level(logging.INFO, logger="qengine"):
        q = qengine.quantize_model(copy.deepcopy(model), "nf4", 64, progress=False, method="gptq", calibration=ids)
    assert "round-to-nearest" not in caplog.text
    experts = [n for n, m in q.named_modules() if isinstance(m, QuantExpertsWeight)]
    assert len(experts) == 4 and q.config._experts_implementation == "qengine"
    for n in experts:
        a, b = q.get_submodule(n).quantized(), rtn.get_submodule(n).quantized()
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        assert not torch.equal(a.packed, b.packed)
    # Per expert, on the held-out tokens the float model routes to it (random init: the logits
    # of a model this small move with every routing flip, so each expert is measured alone).
    caps = {}
    hooks = [layer.mlp.experts.register_forward_pre_hook(lambda mod, args, i=i: caps.__setitem__(i, args[:2]))
             for i, layer in enumerate(model.model.layers)]
    _logits(model, held)
    for h in hooks:
        h.remove()
    errs = {a: {"gptq": 0.0, "rtn": 0.0} for a in ("gate_up_proj", "down_proj")}
    for i, (x, index) in caps.items():
        exp, act = model.model.layers[i].mlp.experts, torch.nn.functional.silu
        for e in range(4):
            xe = x[(index == e).any(-1)]
            g, u = (xe @ exp.gate_up_proj[e].detach().T).chunk(2, dim=-1)
            for attr, inp in (("gate_up_proj", xe), ("down_proj", act(g) * u)):
                w = getattr(exp, attr)[e].detach()
                for name, m in (("gptq", q), ("rtn", rtn)):
                    deq = m.get_submodule(f"model.layers.{i}.mlp.experts.{attr}").dequantize(torch.float32)[e]
                    errs[attr][name] += float((inp @ (w - deq).T).square().sum())
    # Random init: the down projection's inputs are nearly uncorrelated, where GPTQ gains little.
    assert errs["gate_up_proj"]["gptq"] < 0.95 * errs["gate_up_proj"]["rtn"], errs
    assert errs["down_proj"]["gptq"] < errs["down_proj"]["rtn"], errs


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("calibration, message", [
    (torch.randn(2, 16), "token ids"),
    (torch.randint(0, 259, (2, 3, 4)), "shape"),
    (torch.randint(0, 259, (2, 0)), "non-empty"),
    (torch.full((2, 8), 300), "vocabulary"),
    ([torch.randint(0, 259, (2, 8)), "text"], "calibration batch 1"),
    ([], "no batches"),
])
def test_bad_calibration_batches(calibration, message):
    model = _llama()
    with pytest.raises((ValueError, TypeError), match=message):
        qengine.quantize_model(model, progress=False, method="gptq", calibration=calibration)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_bad_method_arguments():
    model, ids = _llama(), torch.randint(0, 259, (2, 8))
    for kw, message in [({"method": "gptq"}, "needs calibration data"),
                        ({"method": "gptq+search"}, "needs calibration data"),
                        ({"method": "rtn", "calibration": ids}, "uses no calibration data"),
                        ({"method": "search", "act_order": True}, "act_order=True applies to GPTQ"),
                        ({"method": "awq", "calibration": ids}, "method must be one of"),
                        ({"method": "gptq", "calibration": ids, "damp": -1.0}, "damp"),
                        ({"method": "gptq", "calibration": ids, "sparsity": "2:4"}, "method='rtn' only")]:
        with pytest.raises(ValueError, match=message):
            qengine.quantize_model(model, progress=False, **kw)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_nan_activations_name_the_layer_and_leave_the_model_unchanged():
    model = _llama()
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[3, 5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*not finite"):
        qengine.quantize_model(model, progress=False, method="gptq", calibration=torch.randint(0, 259, (2, 16)))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before
                                                 if before[k].isfinite().all())


def test_no_data_reached_a_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.used(x)

    model = Net()
    with pytest.raises(ValueError, match="no calibration data reached unused"):
        qengine.quantize_model(model, "int4", 32, progress=False, method="gptq", calibration=torch.randn(8, 16))
    assert isinstance(model.used, nn.Linear)
