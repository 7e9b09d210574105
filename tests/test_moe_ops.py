"""qengine::moe_experts (the grouped Mixture-of-Experts op) against the float64 reference in
moe_reference.py, with the dequantized expert weights as the reference's weights (so only the
kernel is compared): dtypes, odd shapes, gate layouts, activations, biases, LoRA, formats;
gradients against float64 autograd; opcheck; torch.compile; bad input."""

from __future__ import annotations

import pytest
import torch

import qengine  # noqa: F401  (registers the ops)
from cases import TORCH_JIT_DEPRECATION
from moe_reference import moe_reference
from qengine.nn import LoRAExperts, QuantExperts

GATES = {"concatenated": dict(gate=True), "interleaved": dict(gate=True, interleaved=True), "none": dict(gate=False)}
# Tolerances (relative Frobenius error against float64; measured worst over shapes, gate layouts
# and T = 33 in brackets). float32 [1.6e-7]: float32 accumulation over K <= 256 terms.
# bfloat16 [4.4e-3] / float16 [2.1e-4]: the intermediate act(gate) * up is rounded to x's dtype
# (the reference rounds it too, but a float32-vs-float64 difference flips the rounding of a few
# elements by one ulp: 2^-8 for bf16, 2^-11 for fp16) and the output is rounded once (half an ulp).
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _layer(E, H, I, gate="concatenated", act="silu", bias=False, format="nf4", blocksize=64, dq=True,
           transposed=False):
    n_up = 2 * I if gate != "none" else I
    gu, dn = torch.randn(E, n_up, H) * 0.1, torch.randn(E, H, I) * 0.1
    if transposed:
        gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    ub = torch.randn(E, n_up) * 0.1 if bias else None
    db = torch.randn(E, H) * 0.1 if bias else None
    return QuantExperts.from_weights(gu, dn, activation=act, up_bias=ub, down_bias=db, format=format,
                                     blocksize=blocksize, double_quant=dq, transposed=transposed, **GATES[gate])


def _up(m):
    return m.gate_up_proj if m.has_gate else m.up_proj


def _add_lora(m, which, dtype=torch.float32, r=3):
    """Adapters on "up", "down" or both, with random (nonzero) B so the side path counts."""
    for attr in (["gate_up_proj" if m.has_gate else "up_proj"] if which in ("up", "both") else []) + \
            (["down_proj"] if which in ("down", "both") else []):
        lora = LoRAExperts(getattr(m, attr), r=r, alpha=2 * r, dtype=dtype)
        with torch.no_grad():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape) * 0.1)
        setattr(m, attr, lora)
    return m


def _ref(m, x, idx, w, gate, act, round_to=None):
    up = _up(m)
    base_up = up.base_layer if isinstance(up, LoRAExperts) else up
    base_dn = m.down_proj.base_layer if isinstance(m.down_proj, LoRAExperts) else m.down_proj
    lora = (lambda h: (h.lora_A, h.lora_B) if isinstance(h, LoRAExperts) else None)
    scale = next((h.scaling for h in (up, m.down_proj) if isinstance(h, LoRAExperts)), 0.0)
    ub = getattr(m, "gate_up_proj_bias" if m.has_gate else "up_proj_bias", None) if m.has_bias else None
    db = getattr(m, "down_proj_bias", None) if m.has_bias else None
    return moe_reference(x, idx, w, base_up.dequantize(torch.float32), base_dn.dequantize(torch.float32),
                         m.intermediate_dim, gate, act, ub, db, lora(up), lora(m.down_proj), scale, round_to)


def _routing(T, E, k, dtype=torch.float32):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.int64)
    return idx, torch.rand(T, k).to(dtype)


def _check(m, x, idx, w, gate="concatenated", act="silu"):
    copies = [t.clone() for t in (x, idx, w)]
    y = m(x, idx, w)
    assert y.dtype == x.dtype and y.shape == x.shape
    for a, b in zip((x, idx, w), copies):
        assert torch.equal(a, b)  # inputs unchanged
    if x.shape[0] == 0:
        return
    with torch.no_grad():
        ref = _ref(m, x, idx, w, gate, act, round_to=None if x.dtype == torch.float32 else x.dtype)
    err = float((y.detach().double() - ref).norm() / ref.norm())
    assert err < TOL[x.dtype], err


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("H,I,bs", [(128, 64, 64), (96, 32, 32), (256, 128, 64), (97, 32, None)],
                         ids=["h128", "h96", "h256", "prime97x32-row"])
def test_forward_shapes_dtypes(dtype, T, H, I, bs):
    m = _layer(6, H, I, blocksize=bs)
    idx, w = _routing(T, 6, 2)
    _check(m, torch.randn(T, H).to(dtype), idx, w)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_one_to_all(k):
    m = _layer(4, 96, 32, blocksize=32)
    idx, w = _routing(9, 4, k)
    _check(m, torch.randn(9, 96), idx, w)


@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gate_layouts_activations_biases(gate, act, bias):
    m = _layer(4, 96, 32, gate=gate, act=act, bias=bias, blocksize=32)
    idx, w = _routing(7, 4, 2)
    _check(m, torch.randn(7, 96), idx, w, gate, act)


@pytest.mark.parametrize("which", ["up", "down", "both"])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["concatenated", "none"])
def test_lora(which, lora_dtype, dtype, gate):
    m = _add_lora(_layer(4, 128, 64, gate=gate, bias=True), which, lora_dtype)
    idx, w = _routing(7, 4, 2)
    _check(m, torch.randn(7, 128).to(dtype), idx, w, gate)


@pytest.mark.parametrize("format,bs,dq", [
    # gate_up experts are 64x128 = 8192 elements, down experts 128x32 = 4096. Double quant groups
    # 256 scales: at block 64, gate_up experts hold 128 blocks (experts 1, 3 start inside a nested
    # group: NOT aligned); at block 32 they hold 256 blocks (aligned; down: 128, not aligned).
    ("nf4", 64, True), ("nf4", 32, True), ("nf4", 64, False), ("fp4", 64, True), ("fp4", 128, False),
    ("int8", 64, False), ("int8", 64, True),
    ("uint4", 64, False), ("uint4", 64, True), ("uint8", 64, False), ("int4", None, False), ("uint8", None, False)])
@pytest.mark.parametrize("dtype,T", [(torch.float32, 11), (torch.bfloat16, 11), (torch.bfloat16, 60)])
def test_formats(format, bs, dq, dtype, T):
    """T = 60 bfloat16 tokens, top-2 of 5: experts with 17 rows or more take the gemm family's
    kernel where the CPU has one (8-bit codes where it has VBMI), the rest the GEMV."""
    m = _layer(5, 128, 32, format=format, blocksize=bs, dq=dq)  # up: 64x128 = 8192 elems, down: 128x32
    assert _up(m).format.name == format and _up(m).double_quant == dq
    idx, w = _routing(T, 5, 2)
    _check(m, torch.randn(T, 128).to(dtype), idx, w)


def test_transposed_weights_quantize_to_the_same_layer():
    E, H, I = 4, 96, 32
    gu, dn = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    a = QuantExperts.from_weights(gu, dn, blocksize=32)
    b = QuantExperts.from_weights(gu.transpose(1, 2), dn.transpose(1, 2), blocksize=32, transposed=True)
    assert torch.equal(a.gate_up_proj.dequantize(), b.gate_up_proj.dequantize())
    assert torch.equal(a.down_proj.dequantize(), b.down_proj.dequantize())


def test_duplicate_expert_in_one_token_counts_twice():
    m = _layer(4, 96, 32, blocksize=32)
    x = torch.randn(3, 96)
    idx = torch.tensor([[1, 1], [2, 2], [0, 3]])
    w = torch.tensor([[0.3, 0.5], [1.0, -1.0], [0.4, 0.6]])
    _check(m, x, idx, w)
    y = m(x, idx, w)
    single = m(x[:1], torch.tensor([[1]]), torch.tensor([[0.8]]))
    torch.testing.assert_close(y[:1], single, rtol=1e-5, atol=1e-6)  # 0.3 + 0.5 of the same expert
    assert float(y[1].abs().max()) < 1e-6  # +1 and -1 of one expert cancel


def test_int32_index_equals_int64():
    m = _layer(4, 96, 32, blocksize=32)
    x = torch.randn(5, 96)
    idx, w = _routing(5, 4, 2)
    assert torch.equal(m(x, idx, w), m(x, idx.to(torch.int32), w))


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("gate,act", [("concatenated", "silu"), ("interleaved", "gelu_tanh"), ("none", "gelu"),
                                      ("concatenated", "relu")])
def test_gradients_against_float64_autograd(gate, act):
    m = _add_lora(_layer(4, 96, 32, gate=gate, act=act, bias=True, blocksize=32), "both")
    idx = torch.tensor([[0, 1], [1, 1], [3, 0], [2, 1], [0, 3]])
    x = torch.randn(5, 96, requires_grad=True)
    w = torch.rand(5, 2, requires_grad=True)
    g = torch.randn(5, 96)
    (m(x, idx, w) * g).sum().backward()
    up, dn = _up(m), m.down_proj
    params = {"x": x, "w": w, "up_bias": m.gate_up_proj_bias if m.has_gate else m.up_proj_bias,
              "down_bias": m.down_proj_bias, "up_A": up.lora_A, "up_B": up.lora_B, "down_A": dn.lora_A,
              "down_B": dn.lora_B}
    got = {k: p.grad.clone() for k, p in params.items()}
    d = {k: p.detach().double().requires_grad_() for k, p in params.items()}
    ref = moe_reference(d["x"], idx, d["w"], up.base_layer.dequantize(torch.float32),
                        dn.base_layer.dequantize(torch.float32), 32, gate, act, d["up_bias"], d["down_bias"],
                        (d["up_A"], d["up_B"]), (d["down_A"], d["down_B"]), up.scaling)
    (ref * g.double()).sum().backward()
    for k in params:
        assert got[k] is not None and float(got[k].abs().max()) > 0, k
        err = float((got[k].double() - d[k].grad).norm() / d[k].grad.norm())
        assert err < 1e-4, (k, err)


@pytest.mark.parametrize("format,dq", [("nf4", True), ("int8", False), ("uint4", True)])
def test_gradients_past_the_small_batch_rows(format, dq):
    """Expert 0 gets 20 rows (its products run on its own float32 copy), the others at most 16
    (products on the codes): both kinds of expert against float64 autograd."""
    m = _add_lora(_layer(4, 96, 32, bias=True, blocksize=32, format=format, dq=dq), "both")
    idx = torch.stack([torch.tensor([0, 1 + t % 3]) for t in range(20)])
    x = torch.randn(20, 96, requires_grad=True)
    w = torch.rand(20, 2, requires_grad=True)
    g = torch.randn(20, 96)
    (m(x, idx, w) * g).sum().backward()
    up, dn = _up(m), m.down_proj
    params = {"x": x, "w": w, "up_A": up.lora_A, "up_B": up.lora_B, "down_A": dn.lora_A, "down_B": dn.lora_B,
              "up_bias": m.gate_up_proj_bias, "down_bias": m.down_proj_bias}
    got = {k: p.grad.clone() for k, p in params.items()}
    d = {k: p.detach().double().requires_grad_() for k, p in params.items()}
    ref = moe_reference(d["x"], idx, d["w"], up.base_layer.dequantize(torch.float32),
                        dn.base_layer.dequantize(torch.float32), 32, "concatenated", "silu", d["up_bias"],
                        d["down_bias"], (d["up_A"], d["up_B"]), (d["down_A"], d["down_B"]), up.scaling)
    (ref * g.double()).sum().backward()
    for k in params:
        err = float((got[k].double() - d[k].grad).norm() / d[k].grad.norm())
        assert err < 1e-4, (k, err)


def test_backward_never_dequantizes_a_whole_stacked_matrix():
    """The backward's largest allocation is one expert's float32 matrix (expert 0 has 40 rows,
    past the small-batch rows), never the stacked [E, N, K] one (16 times that)."""
    E, H, I = 16, 256, 128
    m = _layer(E, H, I, blocksize=64)
    x = torch.randn(40, H, requires_grad=True)
    idx = torch.stack([torch.tensor([0, 1 + t % (E - 1)]) for t in range(40)])
    y = m(x, idx, torch.rand(40, 2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        y.sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    one_expert = 2 * I * H * 4
    assert one_expert <= largest < 2 * one_expert, (largest, one_expert)


def test_gradients_bfloat16_inputs_keep_dtypes():
    m = _add_lora(_layer(4, 96, 32, blocksize=32), "both", torch.bfloat16)
    x = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)
    idx, w = _routing(4, 4, 2, torch.bfloat16)
    w.requires_grad_()
    m(x, idx, w).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert _up(m).lora_A.grad.dtype == torch.bfloat16 and float(m.down_proj.lora_B.grad.abs().max()) > 0


def _op_args(m, x, idx, w):
    up, dn = _up(m), m.down_proj
    us, uo = (up.base_layer if isinstance(up, LoRAExperts) else up).kernel_state()
    ds, do = (dn.base_layer if isinstance(dn, LoRAExperts) else dn).kernel_state()
    ub = m.gate_up_proj_bias if m.has_bias else None
    db = m.down_proj_bias if m.has_bias else None
    la = (lambda h: (h.lora_A, h.lora_B) if isinstance(h, LoRAExperts) else (None, None))
    meta = [m.num_experts, m.intermediate_dim, 4, 32, 4, 32, *m._qengine_moe]
    return (x, idx, w, us, ds, uo, do, ub, db, *la(up), *la(dn), up.scaling if isinstance(up, LoRAExperts) else 0.0,
            meta)


def test_opcheck():
    m = _add_lora(_layer(4, 96, 32, bias=True, blocksize=32), "both")
    idx, w = _routing(5, 4, 2)
    args = _op_args(m, torch.randn(5, 96, requires_grad=True), idx, w.requires_grad_())
    torch.library.opcheck(torch.ops.qengine.moe_experts.default, args)


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
def test_compile_fullgraph_equals_eager():
    m = _add_lora(_layer(4, 96, 32, bias=True, blocksize=32), "both")
    x = torch.randn(6, 96)
    idx, w = _routing(6, 4, 2)
    eager = m(x, idx, w)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, idx, w), eager, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [-1, 4, 100])
def test_expert_index_out_of_range(bad):
    m = _layer(4, 96, 32, blocksize=32)
    x, w = torch.randn(3, 96), torch.rand(3, 2)
    idx = torch.tensor([[0, 1], [2, bad], [3, 0]])
    copies = (x.clone(), idx.clone(), w.clone())
    with pytest.raises(ValueError, match="top_k_index"):
        m(x, idx, w)
    assert all(torch.equal(a, b) for a, b in zip((x, idx, w), copies))


def _bad_cases():
    x, idx, w = torch.randn(3, 96), torch.tensor([[0, 1], [2, 3], [3, 0]]), torch.rand(3, 2)
    return {
        "index-float": ((x, idx.float(), w), TypeError, "top_k_index"),
        "index-1d": ((x, idx[:, 0], w), ValueError, "top_k_index"),
        "index-rows": ((x, idx[:2], w[:2]), ValueError, "top_k_index"),
        "weights-shape": ((x, idx, w[:, :1]), ValueError, "top_k_weights"),
        "weights-int": ((x, idx, torch.ones(3, 2, dtype=torch.int64)), TypeError, "top_k_weights"),
        "hidden-3d": ((x[None], idx, w), ValueError, "hidden_states"),
        "hidden-int": ((x.to(torch.int32), idx, w), TypeError, "hidden_states"),
        "hidden-size": ((torch.randn(3, 64), idx, w), ValueError, "hidden_states has 64 features"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_arguments(case):
    m = _layer(4, 96, 32, blocksize=32)
    args, exc, match = _bad_cases()[case]
    copies = [a.clone() for a in args]
    with pytest.raises(exc, match=match):
        m(*args)
    assert all(torch.equal(a, b) for a, b in zip(args, copies))


def test_bad_lora_and_bias_shapes():
    m = _add_lora(_layer(4, 96, 32, bias=True, blocksize=32), "both")
    x = torch.randn(3, 96, requires_grad=True)
    idx, w = _routing(3, 4, 2)
    args = list(_op_args(m, x, idx, w))
    for pos, bad, match in [(9, m.gate_up_proj.lora_A[:, :2], "LoRA shapes"),  # A rank != B rank
                            (12, m.down_proj.lora_B[:3], "LoRA shapes"),
                            (7, m.gate_up_proj_bias[:, :10], "bias must have shape"),
                            (8, m.down_proj_bias[:2], "bias must have shape")]:
        a = list(args)
        a[pos] = bad
        with pytest.raises(ValueError, match=match):
            torch.ops.qengine.moe_experts(*a)
    a = list(args)
    a[10] = None  # lora_a without lora_b
    with pytest.raises(ValueError, match="together"):
        torch.ops.qengine.moe_experts(*a)


def test_blocksize_must_divide_an_expert():
    with pytest.raises(ValueError, match="blocksize"):
        QuantExperts.from_weights(torch.randn(4, 2 * 31, 97), torch.randn(4, 97, 31), blocksize=64)
    m = _layer(4, 96, 32, blocksize=32)
    args = list(_op_args(m, torch.randn(3, 96), *_routing(3, 4, 2)))
    args[-1] = list(args[-1])
    args[-1][3] = 7 * 64  # 64x96 = 6144 elements per expert, not a multiple of 448
    with pytest.raises(ValueError, match="blocksize"):
        torch.ops.qengine.moe_experts(*args)


def test_odd_expert_size_needs_whole_bytes():
    gu, dn = torch.randn(3, 2 * 31, 97) * 0.1, torch.randn(3, 97, 31) * 0.1  # 97x31: an odd element count
    with pytest.raises(ValueError, match="whole bytes"):
        QuantExperts.from_weights(gu, dn, blocksize=None, double_quant=False)
    m = QuantExperts.from_weights(gu, dn, format="int8", blocksize=None, double_quant=False)  # primes at 8 bits
    idx, w = _routing(7, 3, 2)
    _check(m, torch.randn(7, 97), idx, w)


@pytest.mark.cuda
def test_cuda_equals_reference():
    m = _add_lora(_layer(4, 96, 32, bias=True, blocksize=32), "both")
    x = torch.randn(7, 96)
    idx, w = _routing(7, 4, 2)
    with torch.no_grad():
        ref = _ref(m, x, idx, w, "concatenated", "silu")
        y = m.to("cuda")(x.cuda(), idx.cuda(), w.cuda())
    assert y.device.type == "cuda"
    assert float((y.cpu().double() - ref).norm() / ref.norm()) < 1e-5
