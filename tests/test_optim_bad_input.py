"""Bad input to the paged AdamW optimizers and qengine::adamw_update gives a clear TypeError /
ValueError, and a refused step or checkpoint changes nothing."""

from __future__ import annotations

import pytest
import torch

import qengine

from qengine.optim import PagedAdamW, PagedAdamW8bit

CLASSES = [PagedAdamW, PagedAdamW8bit]
IDS = ["32bit", "8bit"]


def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "learning rate"),
    (dict(lr=float("nan")), "finite"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(betas=(0.9,)), "pair"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(amsgrad=True), "amsgrad"),
    (dict(fused=True), "fused"),
    (dict(foreach=True), "foreach"),
    (dict(capturable=True), "capturable"),
    (dict(differentiable=True), "differentiable"),
    (dict(page_elements=1000), "page_elements"),
    (dict(page_elements=1024, budget_bytes=100), "at least one page"),
    (dict(spill_dir="/nonexistent/qengine-spill"), "spill_dir"),
], ids=["neg_lr", "nan_lr", "beta1_1", "beta2_neg", "betas_short", "neg_eps", "neg_wd", "amsgrad", "fused",
        "foreach", "capturable", "differentiable", "page_not_256", "budget_below_page", "spill_dir_missing"])
def test_bad_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([_param(4)], **kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_bad_parameters(cls):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cls([torch.nn.Parameter(torch.randn(4, dtype=torch.float64))])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cls([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="contiguous"):
        cls([torch.nn.Parameter(torch.randn(4, 6).t())])
    with pytest.raises(TypeError, match="number"):
        cls([_param(4)], lr="0.1")


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_bad_step_changes_nothing(cls):
    a, b = _param(10), _param(5, 5)
    opt = cls([a, b], lr=1e-2)
    a.grad, b.grad = torch.randn(10), torch.randn(5, 5)
    opt.step()
    before = [a.detach().clone(), b.detach().clone()]
    sd = opt.state_dict()

    a.grad = torch.randn(10).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    a.grad = torch.randn(10)
    opt.param_groups[0]["lr"] = -1.0  # e.g. a broken scheduler
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    opt.param_groups[0]["amsgrad"] = True
    opt.param_groups[0]["lr"] = 1e-2
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    after = opt.state_dict()
    for i in sd["state"]:
        for k in sd["state"][i]:
            assert torch.equal(sd["state"][i][k], after["state"][i][k])


def _stepped(cls, params=None):
    params = params or [_param(10), _param(300)]
    opt = cls(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, params


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_state_dict_from_another_optimizer(cls):
    opt, params = _stepped(cls)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    sgd.step()
    with pytest.raises(ValueError, match="betas"):
        opt.load_state_dict(sgd.state_dict())
    other = _stepped(PagedAdamW8bit if cls is PagedAdamW else PagedAdamW, [_param(10), _param(300)])[0]
    with pytest.raises(ValueError, match="other paged AdamW"):
        opt.load_state_dict(other.state_dict())
    amsgrad = torch.optim.AdamW(params, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(amsgrad.state_dict())


def test_8bit_state_dict_in_other_state_codes_is_re_encoded_or_refused():
    """8-bit checkpoints carry the values of their codes (qmap1, qmap2): codes from another
    version are decoded with the table they carry and re-encoded in today's codes (never read
    as today's codes); a checkpoint without its tables (from a version before checkpoints
    carried them) cannot be decoded and is refused."""
    opt, _ = _stepped(PagedAdamW8bit)
    before = opt.state_dict()
    sd = opt.state_dict()
    other = torch.tensor(qengine.get_format("dynamic8").values, dtype=torch.float32)
    sd["state"][0]["qmap1"] = other
    saved = other[sd["state"][0]["state1"].long()]
    n = saved.numel()
    saved = (torch.cat([saved, saved.new_zeros((-n) % 256)]).reshape(-1, 256)
             * sd["state"][0]["absmax1"].reshape(-1, 1)).reshape(-1)[:n]
    opt.load_state_dict(sd)
    st = opt.state_dict()["state"][0]
    now = st["qmap1"][st["state1"].long()]
    now = (torch.cat([now, now.new_zeros((-n) % 256)]).reshape(-1, 256) * st["absmax1"].reshape(-1, 1)).reshape(-1)[:n]
    assert not torch.equal(st["qmap1"], other)
    assert bool(((now - saved).abs() <= saved.abs() / 8 + 2.0**-13 * saved.abs().max()).all())
    opt.load_state_dict(before)
    sd = opt.state_dict()
    del sd["state"][1]["qmap1"], sd["state"][1]["qmap2"]
    with pytest.raises(ValueError, match="older qengine"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for i in before["state"]:
        for k, v in before["state"][i].items():
            assert torch.equal(after["state"][i][k], v)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_corrupt_state_dict_changes_nothing(cls):
    opt, params = _stepped(cls)
    good = opt.state_dict()
    key2 = "exp_avg_sq" if cls is PagedAdamW else "absmax2"

    def broken(fn):
        sd = opt.state_dict()
        fn(sd)
        return sd

    cases = [
        (broken(lambda sd: sd["state"][1][key2].view(-1).__setitem__(0, float("nan"))), "NaN"),
        (broken(lambda sd: sd["state"][1][key2].view(-1).__setitem__(0, -1.0)), ">= 0"),
        (broken(lambda sd: sd["state"][0].__setitem__(key2, sd["state"][0][key2][:-1])), "elements"),
        (broken(lambda sd: sd["state"][0].__setitem__("step", torch.tensor(0.0))), "step"),
        (broken(lambda sd: sd["param_groups"][0]["params"].pop()), "same number"),
        (broken(lambda sd: sd["state"].__setitem__(7, sd["state"][0])), "index 7"),
        (broken(lambda sd: sd.pop("param_groups")), "param_groups"),
        (broken(lambda sd: sd["param_groups"][0].__setitem__("lr", -3.0)), "learning rate"),
    ]
    for sd, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == good["param_groups"]
    for i in good["state"]:
        for k in good["state"][i]:
            assert torch.equal(good["state"][i][k], after["state"][i][k])


def test_pickling_is_refused_clearly():
    import copy

    opt, _ = _stepped(PagedAdamW)
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


def test_unsupported_device_is_refused():
    meta = torch.nn.Parameter(torch.randn(4, device="meta"))
    with pytest.raises(ValueError, match="meta"):
        PagedAdamW([meta])


def test_adamw_update_op_checks_and_opcheck():
    n = 300
    p, g = torch.randn(n), torch.randn(n)
    s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(2), torch.zeros(2)
    args = (1e-3, 0.9, 0.999, 1e-8, 0.01, 1, False)
    with pytest.raises(ValueError, match="absmax1 must have 2 elements"):
        torch.ops.qengine.adamw_update(p, g, s1, s2, torch.zeros(1), a2, *args)
    with pytest.raises(TypeError, match="state1 must be torch.float32"):
        torch.ops.qengine.adamw_update(p, g, s1, s2, None, None, *args)
    with pytest.raises(ValueError, match="grad must have 300 elements"):
        torch.ops.qengine.adamw_update(p, g[:10], s1, s2, a1, a2, *args)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.qengine.adamw_update(p, torch.randn(2 * n)[::2], s1, s2, a1, a2, *args)
    with pytest.raises(ValueError, match="step"):
        torch.ops.qengine.adamw_update(p, g, s1, s2, a1, a2, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0, False)
    m, v = torch.zeros(n), torch.zeros(n)
    torch.library.opcheck(torch.ops.qengine.adamw_update.default, (p, g, m, v, None, None, *args))
    torch.library.opcheck(torch.ops.qengine.adamw_update.default, (p, g, s1, s2, a1, a2, *args))
