"""Paging and checkpoints of the paged AdamW optimizers: with a resident budget of a quarter
of the states, training gives the same bytes as without paging while the resident state bytes
never exceed the budget; state_dict / load_state_dict resume bit for bit, also across budgets
and from/to torch.optim.AdamW (32-bit)."""

from __future__ import annotations

import io

import pytest
import torch

from qengine.optim import PagedAdamW, PagedAdamW8bit

CLASSES = [PagedAdamW, PagedAdamW8bit]
IDS = ["32bit", "8bit"]
SHAPES = [(64, 100), (3000,), (7,), (40, 40, 3), (1000,)]
PAGE = 1024  # small pages: every parameter spans or shares several


# The torch references are many tiny ops; their thread team costs more than the work.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _train(opt, params, steps, first=0):
    for step in range(first, first + steps):
        for p, g in zip(params, _grads(step)):
            p.grad = None if (step % 4 == 3 and p.numel() == 7) else g  # a skipped parameter too
        opt.step()


def _state_bytes(opt):
    return [t for st in opt.state_dict()["state"].values() for _, t in sorted(st.items())]


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_quarter_budget_gives_identical_results_and_stays_under_budget(cls, tmp_path):
    ref_params = _params()
    ref = cls(ref_params, lr=1e-2, weight_decay=0.1, page_elements=PAGE)
    _train(ref, ref_params, 12)

    params = _params()
    full = ref.state_bytes()
    budget = full // 4
    opt = cls(params, lr=1e-2, weight_decay=0.1, page_elements=PAGE, budget_bytes=budget, spill_dir=str(tmp_path))
    _train(opt, params, 12)
    stats = opt.memory_stats()
    assert stats["state_bytes"] == full
    assert stats["peak_resident_bytes"] <= budget
    assert stats["resident_bytes"] <= budget
    assert stats["evictions"] > 0 and stats["loads"] > 0
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    for a, b in zip(_state_bytes(opt), _state_bytes(ref)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("budget", [None, 3 * 8 * PAGE], ids=["resident", "paged"])
def test_resume_from_state_dict_is_bit_identical(cls, budget):
    ref_params = _params()
    ref = cls(ref_params, lr=1e-2, page_elements=PAGE)
    _train(ref, ref_params, 10)

    params = _params()
    opt = cls(params, lr=1e-2, page_elements=PAGE, budget_bytes=budget)
    _train(opt, params, 6)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = cls(resumed, lr=123.0, page_elements=PAGE, budget_bytes=budget)  # lr comes from the checkpoint
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-2
    _train(opt2, resumed, 4, first=6)
    for a, b in zip(resumed, ref_params):
        assert torch.equal(a, b)
    for a, b in zip(_state_bytes(opt2), _state_bytes(ref)):
        assert torch.equal(a, b)


def test_torch_adamw_checkpoints_load_both_ways():
    torch_params, ours_params = _params(), _params()
    t = torch.optim.AdamW(torch_params, lr=1e-2, foreach=False)
    _train(t, torch_params, 5)
    ours = PagedAdamW(ours_params, lr=1e-2)
    ours.load_state_dict(t.state_dict())
    for p, q in zip(ours_params, torch_params):
        p.data.copy_(q.detach())
    _train(ours, ours_params, 5, first=5)
    _train(t, torch_params, 5, first=5)
    sd = ours.state_dict()
    for i, (p, q) in enumerate(zip(ours_params, torch_params)):
        assert torch.equal(sd["state"][i]["exp_avg_sq"], t.state[q]["exp_avg_sq"])
        assert torch.allclose(p, q, rtol=0, atol=1e-5)
    back = torch.optim.AdamW(_params(), lr=1e-2, foreach=False)
    back.load_state_dict(sd)
    assert torch.equal(back.state_dict()["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])


def test_added_param_group_grows_the_last_page():
    a = _params()
    opt = PagedAdamW8bit(a[:2], lr=1e-2, page_elements=PAGE)
    _train_subset(opt, a[:2], 3)
    opt.add_param_group({"params": a[2:], "lr": 5e-3})
    ref_params = _params()
    ref = PagedAdamW8bit(ref_params[:2], lr=1e-2, page_elements=PAGE)
    _train_subset(ref, ref_params[:2], 3)
    ref.add_param_group({"params": ref_params[2:], "lr": 5e-3})
    _train(opt, a, 3, first=3)
    _train(ref, ref_params, 3, first=3)
    for x, y in zip(a, ref_params):
        assert torch.equal(x, y)
    assert opt.state_bytes() <= 2.1 * sum(p.numel() for p in a) + 4 * 256 * 2.1  # per-region alignment only


def _train_subset(opt, params, steps):
    for step in range(steps):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_reused_task_table_gives_the_bytes_of_a_rebuilt_one(cls):
    """Without a budget a step reuses the last step's task table when the same parameters
    step (only the parameter and gradient addresses are refreshed): new gradient tensors every
    step, a parameter skipped now and then, a parameter group added mid-run and a parameter
    moved to new storage all give the bytes of an optimizer that rebuilds its table every step
    (a budget larger than the states keeps it from reusing)."""
    ref_params, params = _params(), _params()
    big = 1 << 30
    opts = [cls(ref_params, lr=1e-2, weight_decay=0.1, page_elements=PAGE, budget_bytes=big),
            cls(params, lr=1e-2, weight_decay=0.1, page_elements=PAGE)]
    reused = 0
    for step in range(12):
        for ps, opt in zip((ref_params, params), opts):
            if step == 4:  # a new group
                extra = torch.nn.Parameter(torch.ones(300))
                ps.append(extra)
                opt.add_param_group({"params": [extra], "lr": 3e-3})
            if step == 9:  # same parameter, new storage
                ps[0].data = ps[0].data.clone()
            for p, g in zip(ps, _grads(step) + [torch.full((300,), 0.5)]):
                p.grad = None if (step % 5 == 2 and p.numel() == 7) else g.clone()
            before = opt._task_cache
            opt.step()
            if opt is opts[1] and before is not None and opt._task_cache is before:
                reused += 1
    assert reused == 6  # steps 1, 5, 6, 9, 10, 11 reused the table
    assert opts[0]._task_cache is None
    for a, b in zip(ref_params + _state_bytes(opts[0]), params + _state_bytes(opts[1])):
        assert torch.equal(a.detach().view(-1).view(torch.uint8), b.detach().view(-1).view(torch.uint8))
