"""PagedAdamW (32-bit states) against torch.optim.AdamW: 200 steps on several shapes give the
same states bit for bit and parameters to float32 rounding; param groups, schedulers, maximize,
skipped parameters, half-precision parameters; every ISA and thread count gives the same bytes."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine.optim import PagedAdamW, PagedAdamW8bit

SHAPES = [(1,), (255,), (33, 17), (5, 7, 300), (70_001,)]
SUPPORTED = qengine.build_info()["supported_cpu_isas"]
EPS32 = torch.finfo(torch.float32).eps


# The torch references are many tiny ops; their thread team costs more than the work.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _pair(shapes, dtype=torch.float32):
    init = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(t.clone().to(dtype)) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    return ours, ref


def _set_grads(ours, ref, scale=1.0):
    for a, b in zip(ours, ref):
        g = torch.randn(a.shape) * scale
        a.grad = g.to(a.dtype)
        b.grad = a.grad.float()


@pytest.mark.parametrize("kwargs", [dict(lr=1e-3), dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                                    dict(lr=1e-2, betas=(0.3, 0.5), weight_decay=0.0, maximize=True)],
                         ids=["defaults", "wd0.1", "small_betas_maximize"])
def test_200_steps_match_torch_adamw(kwargs):
    ours, ref = _pair(SHAPES)
    opt, topt = PagedAdamW(ours, **kwargs), torch.optim.AdamW(ref, foreach=False, **kwargs)
    steps = 200
    for _ in range(steps):
        _set_grads(ours, ref)
        opt.step()
        topt.step()
    sd = opt.state_dict()
    for i, (a, b) in enumerate(zip(ours, ref)):
        # The states depend on the gradients only and are computed as torch does: same bits.
        assert torch.equal(sd["state"][i]["exp_avg"], topt.state[b]["exp_avg"])
        assert torch.equal(sd["state"][i]["exp_avg_sq"], topt.state[b]["exp_avg_sq"])
        assert int(sd["state"][i]["step"]) == steps
        # Parameters: each step may round differently by one float32 ulp (torch's vectorised
        # division order is not documented), so the gap grows at most like steps * ulp.
        bound = steps * 2 * EPS32 * float(b.detach().abs().max() + 1)
        assert float((a.detach() - b.detach()).abs().max()) <= bound


def test_param_groups_scheduler_and_skipped_params():
    ours, ref = _pair([(40, 30), (100,), (7,)])
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.05},  # noqa: E731
                         {"params": ps[2:], "lr": 3e-3, "betas": (0.5, 0.9), "maximize": True}]
    opt, topt = PagedAdamW(groups(ours)), torch.optim.AdamW(groups(ref), foreach=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=5, gamma=0.5)
    for step in range(30):
        _set_grads(ours, ref)
        if step % 3 == 0:  # a parameter without a gradient is skipped and its step count stays
            ours[1].grad = ref[1].grad = None
        torch.nn.utils.clip_grad_norm_(ours, 1.0)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        topt.step()
        sched.step()
        tsched.step()
    sd = opt.state_dict()
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert torch.equal(sd["state"][i]["exp_avg_sq"], topt.state[b]["exp_avg_sq"])
        assert float(sd["state"][i]["step"]) == float(topt.state[b]["step"])
        assert torch.allclose(a.detach(), b.detach(), rtol=0, atol=30 * 2 * EPS32 * 4)
    assert opt.param_groups[0]["lr"] == topt.param_groups[0]["lr"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_use_float32_maths(dtype):
    """States float32 as for float32 parameters; the parameter is the float32 update of its
    own value, rounded once per step (reference: torch's formula in float32, then the cast)."""
    ours, _ = _pair([(300, 11)], dtype)
    p = ours[0]
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    opt = PagedAdamW(ours, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m = torch.zeros(p.shape)
    v = torch.zeros(p.shape)
    ulp = torch.finfo(dtype).eps
    for step in range(1, 21):
        p.grad = torch.randn(p.shape).to(dtype)
        expected_in = p.detach().float().clone()
        opt.step()
        g = p.grad.float()
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
        expected = expected_in.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1**step)).to(dtype)
        # One float32 ulp of difference may flip a rounding to the half-precision grid.
        gap = (p.detach().float() - expected.float()).abs()
        assert bool((gap <= ulp * expected.float().abs() + 1e-30).all())
    sd = opt.state_dict()["state"][0]
    assert sd["exp_avg"].dtype == torch.float32
    assert torch.allclose(sd["exp_avg"], m, rtol=1e-6, atol=0)


def _run_bytes(cls, dtype, shapes, steps=4, **kwargs):
    torch.manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    opt = cls(ps, lr=1e-2, weight_decay=0.1, page_elements=4096, **kwargs)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape).to(dtype)
        opt.step()
    sd = opt.state_dict()
    return [p.detach().clone() for p in ps], [t for st in sd["state"].values() for k, t in sorted(st.items())]


# The SIMD spans are compiled per (maximize, 1 - beta1 < 0.5): every combination.
FLAGS = [dict(), dict(maximize=True), dict(betas=(0.3, 0.9)), dict(betas=(0.3, 0.9), maximize=True)]


@pytest.mark.parametrize("isa", [i for i in SUPPORTED if i != "scalar"])
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flags", FLAGS, ids=["defaults", "maximize", "beta1_0.3", "beta1_0.3_maximize"])
def test_isa_bytes_equal_scalar(isa, cls, dtype, flags, isa_restore):
    shapes = [(333, 170), (1000,), (5, 7, 300), (1,)]  # spans split over pages, partial blocks
    qengine.set_cpu_isa("scalar")
    ref = _run_bytes(cls, dtype, shapes, **flags)
    qengine.set_cpu_isa(isa)
    got = _run_bytes(cls, dtype, shapes, **flags)
    for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit], ids=["32bit", "8bit"])
def test_thread_count_does_not_change_bytes(cls, threads_restore):
    shapes = [(2000, 700), (333,)]  # > one thread chunk
    qengine.set_num_threads(1)
    ref = _run_bytes(cls, torch.float32, shapes, steps=2)
    qengine.set_num_threads(3)
    got = _run_bytes(cls, torch.float32, shapes, steps=2)
    for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
        assert torch.equal(a, b)


def test_closure_and_zero_grad():
    p = torch.nn.Parameter(torch.randn(10))
    opt = PagedAdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss.detach()

    losses = [float(opt.step(closure)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]


def _run_on(device, cls, dtype, budget=None, steps=4):
    torch.manual_seed(5)
    shapes = [(333, 170), (1000,), (5, 7, 300), (1,)]
    init = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(steps)]
    ps = [torch.nn.Parameter(t.to(device)) for t in init]
    opt = cls(ps, lr=1e-2, weight_decay=0.1, page_elements=4096, budget_bytes=budget)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(device)
        opt.step()
    sd = opt.state_dict()
    return [p.detach().cpu() for p in ps] + [t.cpu() for st in sd["state"].values() for k, t in sorted(st.items())]


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_bytes_equal_cpu_with_and_without_device_budget(cls, dtype):
    ref = _run_on("cpu", cls, dtype)
    for budget in (None, 2 * 8 * 4096):  # a device cache of two 32-bit pages: pages go to pinned host memory
        got = _run_on("cuda", cls, dtype, budget)
        for a, b in zip(ref, got):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@pytest.mark.parametrize("isa", SUPPORTED)
def test_every_isa_runs_its_own_simd_step(isa, isa_restore):
    """The AdamW step takes the SIMD spans of the ISA's family: every AVX-512 table (with or
    without BF16, and AMX, which only the gemm family uses) the AVX-512 spans, not the scalar
    fallback."""
    qengine.set_cpu_isa(isa)
    expected = "avx512" if isa.startswith("avx512") or isa == "amx" else isa
    assert qengine._C.adamw_cpu_spans() == expected
