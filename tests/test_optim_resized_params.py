"""The paged AdamW optimizers check every parameter against the (shape, dtype) its state region
was reserved for, at every step: a parameter whose storage was replaced (`p.data = ...`) after
it got state is refused with a ValueError naming it, and the refused step changes nothing.
(Before the check, a larger parameter made the kernel write past its region: heap corruption,
`free(): invalid size`, or a hang.)"""

from __future__ import annotations

import pytest
import torch

from qengine.optim import PagedAdamW, PagedAdamW8bit

CLASSES = [PagedAdamW, PagedAdamW8bit]
IDS = ["32bit", "8bit"]
# Unbudgeted (pages never move, the task table is cached between steps) and budgeted (small
# pages, spilled to disk) layouts.
LAYOUTS = [dict(), dict(page_elements=256, budget_bytes=4096)]
LAYOUT_IDS = ["unbudgeted", "budgeted"]


def _state(opt) -> dict:
    sd = opt.state_dict()
    return {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for i, st in sd["state"].items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k]), (i, k)


def _two_steps(opt, params):
    for _ in range(2):  # the second step runs from the cached task table (unbudgeted)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("new", [
    lambda: torch.zeros(100000),  # far past the page buffer: the heap corruption
    lambda: torch.zeros(400),  # a little past the region: over the next region's states
    lambda: torch.zeros(100),  # smaller
    lambda: torch.zeros(20, 15),  # same numel, another shape (torch.optim.AdamW refuses it too)
    lambda: torch.zeros(300, dtype=torch.bfloat16),  # same numel, another dtype
], ids=["grown_100000", "grown_400", "shrunk_100", "reshaped", "bfloat16"])
def test_replaced_storage_is_refused_and_changes_nothing(cls, layout, new):
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(n)) for n in (10, 300, 50))
    opt = cls([a, b, c], lr=1e-2, **layout)
    _two_steps(opt, [a, b, c])
    before = _state(opt)
    values = [a.detach().clone(), b.detach().clone(), c.detach().clone()]

    old = b.data
    b.data = new()
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is now .* state was made for "
                                         r"\(300,\) torch.float32"):
        opt.step()
    assert torch.equal(a, values[0]) and torch.equal(c, values[2])  # nothing updated
    _assert_same_state(_state(opt), before)  # states and step counts as they were
    assert all(st["step"] == 2 for st in _state(opt).values())

    # The right-sized parameter again: the next step runs, from the states the refused step kept.
    b.data = old
    grads = [torch.randn_like(p) for p in (a, b, c)]
    _assert_steps_like_a_twin(opt, cls, (a, b, c), [v.clone() for v in values], [grads], **layout)


def _assert_steps_like_a_twin(opt, cls, params, twin_values, grads_per_step, **layout):
    """A twin optimizer on copies of the parameters, loaded from opt's state_dict, takes the
    same steps (the given gradients) to the same parameters and states."""
    twin_params = [torch.nn.Parameter(v) for v in twin_values]
    twin = cls(twin_params, lr=1e-2, **layout)
    twin.load_state_dict(opt.state_dict())
    for grads in grads_per_step:
        for p, tp, g in zip(params, twin_params, grads):
            p.grad, tp.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    for p, tp in zip(params, twin_params):
        assert torch.equal(p, tp)
    _assert_same_state(_state(opt), _state(twin))


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_message_names_group_and_position(cls):
    torch.manual_seed(1)
    a, b, c = (torch.nn.Parameter(torch.randn(n)) for n in (10, 300, 50))
    opt = cls([{"params": [a]}, {"params": [b, c], "lr": 1e-3}], lr=1e-2)
    _two_steps(opt, [a, b, c])
    c.data = torch.zeros(5000)
    c.grad = torch.randn(5000)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] is now \(5000,\)"):
        opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_non_contiguous_replacement_is_named(cls):
    torch.manual_seed(2)
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(6, 50))
    opt = cls([a, b], lr=1e-2)
    _two_steps(opt, [a, b])
    before = _state(opt)
    b.data = torch.randn(50, 6).t()  # same shape and dtype, not contiguous
    b.grad = torch.randn(6, 50)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] must be contiguous"):
        opt.step()
    _assert_same_state(_state(opt), before)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_stateless_parameter_may_change_before_its_first_step(cls):
    """As torch.optim.AdamW makes state lazily, a parameter may change (model.half(), a
    resize) before its first step: its region follows it, and the step equals that of an
    optimizer built on the changed parameters."""
    torch.manual_seed(3)
    a, b, c = (torch.nn.Parameter(torch.randn(n)) for n in (10, 300, 50))
    opt = cls([a, b, c], lr=1e-2)
    a.grad = torch.randn(10)
    opt.step()  # b and c have no state yet
    b.data = torch.randn(1000).to(torch.bfloat16)
    c.data = c.data.to(torch.float16)
    grads = [[torch.randn_like(p) for p in (a, b, c)] for _ in range(2)]
    _assert_steps_like_a_twin(opt, cls, (a, b, c), [p.detach().clone() for p in (a, b, c)], grads)  # a's state


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_state_dict_of_a_resized_parameter_and_recovery(cls):
    """state_dict exports the state a resized parameter has (shaped as when it was made, as
    torch.optim.AdamW's does), never a read past its region; loading a state saved for the new
    shape makes the optimizer step again."""
    torch.manual_seed(4)
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(300))
    opt = cls([a, b], lr=1e-2)
    _two_steps(opt, [a, b])
    before = _state(opt)
    b.data = torch.randn(40, 25)
    _assert_same_state(_state(opt), before)
    if cls is PagedAdamW:
        assert opt.state_dict()["state"][1]["exp_avg"].shape == (300,)

    with pytest.raises(ValueError, match="expected 1000"):  # the old state does not fit the new shape
        opt.load_state_dict(opt.state_dict())
    fresh_params = [torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())]
    fresh = cls(fresh_params, lr=1e-2)
    _two_steps(fresh, fresh_params)
    opt.load_state_dict(fresh.state_dict())
    a.data.copy_(fresh_params[0].detach())
    b.data.copy_(fresh_params[1].detach())
    for p, fp in zip((a, b), fresh_params):
        p.grad = torch.randn_like(p)
        fp.grad = p.grad.clone()
    opt.step()
    fresh.step()
    for p, fp in zip((a, b), fresh_params):
        assert torch.equal(p, fp)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_parameter_without_a_region_is_named(cls):
    """A parameter appended to param_groups by hand has no state region (it used to fail with a
    KeyError holding the tensor's repr)."""
    torch.manual_seed(5)
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(5))
    opt = cls([a], lr=1e-2)
    _two_steps(opt, [a])
    before, value = _state(opt), a.detach().clone()
    opt.param_groups[0]["params"].append(b)
    a.grad, b.grad = torch.randn(10), torch.randn(5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] has no optimizer state region.*"
                                         r"add_param_group"):
        opt.step()
    assert torch.equal(a, value)
    _assert_same_state(_state(opt), before)
