"""gpt-oss experts (transformers' GptOssExperts: interleaved gate/up, the clamped swiglu of
_apply_gate, biases) in qengine's grouped op as activation swiglu_oai, and gpt-oss checkpoints
with MXFP4 experts (transformers' ``*_blocks`` / ``*_scales``) loaded by qengine.hf.load_model
without dequantizing: decode bit-equal to transformers' convert_moe_packed_tensors, logits
against transformers' model on the dequantized weights, generate, 5 QLoRA steps on the experts
with no expert weight ever dequantized. Tiny models from config, random init, no download."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import qengine
from qengine.moe import quantize_experts
from qengine.nn import LoRAExperts, QuantExperts, QuantExpertsWeight

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB, E, H, INTER = 128, 4, 64, 64


def _config(**kw):
    return transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
                                     num_experts_per_tok=2, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"], **kw)


def _model(seed=0):
    torch.manual_seed(seed)
    m = gpt_oss.GptOssForCausalLM(_config()).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _experts(model):
    return [layer.mlp.experts for layer in model.model.layers]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _reference(model):
    """transformers' float gpt-oss with every quantized expert weight of `model` dequantized."""
    ref = gpt_oss.GptOssForCausalLM(copy.deepcopy(model.config)).eval()
    ref.config._experts_implementation = "eager"
    state = {k: v for k, v in model.state_dict().items() if ".experts." not in k or k.endswith("_bias")}
    missing = ref.load_state_dict(state, strict=False).missing_keys
    assert all(".experts." in k for k in missing), missing
    for ex, rx in zip(_experts(model), _experts(ref)):
        for attr in ("gate_up_proj", "down_proj"):
            w = getattr(ex, attr)
            w = w.base_layer if isinstance(w, LoRAExperts) else w
            getattr(rx, attr).data.copy_(w.dequantize().transpose(1, 2))
    return ref


@pytest.mark.parametrize("fmt,bs,dq", [("nf4", 64, True), ("mxfp4", 32, False), ("int8", 64, False)])
def test_quantize_gpt_oss_experts_matches_transformers(fmt, bs, dq):
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 9))
    qengine.quantize_model(model, fmt, blocksize=bs, double_quant=dq, skip=["lm_head", "q_proj", "k_proj", "v_proj", "o_proj"],
                           progress=False)
    assert all(isinstance(ex.gate_up_proj, QuantExpertsWeight) for ex in _experts(model))
    assert model.config._experts_implementation == "qengine"
    ref = _reference(model)
    diff = (_logits(model, ids) - _logits(ref, ids)).abs().max().item()
    assert diff < 1e-4, diff


def test_swiglu_oai_op_gradients_and_clamp():
    """The op with activation swiglu_oai against torch autograd on the dequantized weights, with
    pre-activations beyond the clamp limit (7.0) on both sides."""
    torch.manual_seed(1)
    gu, dn = torch.randn(E, 2 * INTER, H) * 0.6, torch.randn(E, H, INTER) * 0.3
    ub, db = torch.randn(E, 2 * INTER), torch.randn(E, H) * 0.1
    mod = QuantExperts.from_weights(gu, dn, activation="swiglu_oai", interleaved=True, up_bias=ub, down_bias=db,
                                    format="nf4", blocksize=64)
    x = torch.randn(6, H, requires_grad=True)
    idx = torch.randint(0, E, (6, 2))
    w = torch.rand(6, 2, requires_grad=True)
    y = mod(x, idx, w)
    wu, wd = mod.gate_up_proj.dequantize(), mod.down_proj.dequantize()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.zeros(6, H)
    pre = []
    for t in range(6):
        for k in range(2):
            e = idx[t, k]
            a = x2[t] @ wu[e].t() + mod.gate_up_proj_bias[e]
            pre.append(a.detach())
            g, u = a[0::2].clamp(max=7.0), a[1::2].clamp(-7.0, 7.0)
            h = (u + 1) * (g * torch.sigmoid(g * 1.702))
            ref = ref.index_add(0, torch.tensor([t]), (w2[t, k] * (h @ wd[e].t() + mod.down_proj_bias[e]))[None])
    pre = torch.stack(pre)
    assert bool((pre > 7).any()) and bool((pre < -7).any())  # both clamps are exercised
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-5)
    gy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, mod.gate_up_proj_bias), gy)
    rx, rw, rb = torch.autograd.grad(ref, (x2, w2, mod.gate_up_proj_bias), gy)
    for a, b in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- MXFP4 checkpoints
def _mxfp4_pack(n, k, gen):
    """Random transformers-layout MXFP4 experts: blocks [E, n, k/32, 16], scales [E, n, k/32]
    (scale bytes near 2**-3, so the model's activations stay moderate)."""
    blocks = torch.randint(0, 256, (E, n, k // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(121, 126, (E, n, k // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


def _write_mxfp4_checkpoint(path, seed=0):
    """A tiny gpt-oss with MXFP4 experts, as transformers' gpt-oss checkpoints store it, and the
    float model transformers gets by dequantizing it (convert_moe_packed_tensors, float32)."""
    model = _model(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"))}
    tensors.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    for i, ex in enumerate(_experts(model)):
        for attr, (n, k) in (("gate_up_proj", (2 * INTER, H)), ("down_proj", (H, INTER))):
            blocks, scales = _mxfp4_pack(n, k, gen)
            key = f"model.layers.{i}.mlp.experts.{attr}"
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
            getattr(ex, attr).data.copy_(mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    path.mkdir()
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                       "model.embed_tokens",
                                                                                       "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg))
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    model.config._experts_implementation = "eager"
    return model


def _bits(t):
    return t.contiguous().view(torch.int32)


def test_mxfp4_decode_bit_equal_to_transformers():
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 255, (3, 8, 4), dtype=torch.uint8, generator=gen)  # every E8M0 code but 255
    scales[0, 0, :4] = torch.tensor([0, 1, 127, 254], dtype=torch.uint8)
    w = qengine.hf.gpt_oss.mxfp4_experts_weight(blocks, scales)
    assert (w.num_experts, w.expert_out_features, w.in_features, w.format.name) == (3, 8, 128, "mxfp4")
    ref = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    assert torch.equal(_bits(w.dequantize()), _bits(ref))


def test_mxfp4_bad_input():
    blocks = torch.zeros(2, 4, 2, 16, dtype=torch.uint8)
    scales = torch.full((2, 4, 2), 127, dtype=torch.uint8)
    scales[1, 2, 1] = 255
    with pytest.raises(ValueError, match="255"):
        qengine.hf.gpt_oss.mxfp4_experts_weight(blocks, scales)
    with pytest.raises(ValueError, match=r"\[E, N, K/32, 16\]"):
        qengine.hf.gpt_oss.mxfp4_experts_weight(blocks[..., :8], scales)


@pytest.fixture
def no_expert_dequantize(monkeypatch):
    """Fails any dequantization of an expert-sized weight (one expert's matrix or more)."""
    smallest = min(2 * INTER * H, H * INTER)
    real = torch.ops.qengine.dequantize_blockwise

    def guarded(packed, table, scales, offsets, bits, blocksize, n, dtype):
        if n >= smallest:
            raise AssertionError(f"dequantized {n} elements (an expert weight)")
        return real(packed, table, scales, offsets, bits, blocksize, n, dtype)

    def refuse(self, *a, **k):
        raise AssertionError("QuantExpertsWeight.dequantize called")

    monkeypatch.setattr(torch.ops.qengine, "dequantize_blockwise", guarded)
    monkeypatch.setattr(QuantExpertsWeight, "dequantize", refuse)


def test_load_mxfp4_checkpoint_forward_generate_qlora(tmp_path, no_expert_dequantize):
    ref = _write_mxfp4_checkpoint(tmp_path / "g")
    model = qengine.hf.load_model(tmp_path / "g")
    for ex in _experts(model):
        assert isinstance(ex.gate_up_proj, QuantExpertsWeight) and ex.gate_up_proj.format.name == "mxfp4"
        assert ex.gate_up_proj.weight_packed.dtype == torch.uint8
    assert model.config._experts_implementation == "qengine"
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    out, expect = _logits(model, ids), _logits(ref, ids)
    diff = (out - expect).abs().max().item()
    print(f"max |logit difference| vs transformers' dequantized gpt-oss: {diff:.3g} (logits up to "
          f"{expect.abs().max().item():.3g})")
    assert diff < 1e-4 * max(1.0, expect.abs().max().item())
    gen = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, ref.generate(ids[:1, :5], max_new_tokens=4, do_sample=False))
    # QLoRA on the experts (and attention), 5 steps: the quantized codes never change
    packed = [ex.gate_up_proj.weight_packed.clone() for ex in _experts(model)]
    qengine.add_lora(model, r=4, target_modules=["q_proj", "v_proj", "gate_up_proj", "down_proj"], experts=True)
    assert all(isinstance(ex.gate_up_proj, LoRAExperts) for ex in _experts(model))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    ex = _experts(model)[0]
    assert ex.gate_up_proj.lora_B.abs().sum() > 0 and ex.down_proj.lora_B.abs().sum() > 0
    assert all(torch.equal(p, ex.gate_up_proj.base_layer.weight_packed) for p, ex in zip(packed, _experts(model)))
