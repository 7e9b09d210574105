"""PagedAdamW8bit: the state codes are exactly the nearest codes of the state formats (checked
against a searchsorted reference), the states cost <= 2.1 bytes per parameter, and training
follows 32-bit AdamW within stated bounds (per-step update error, final loss)."""

from __future__ import annotations

import pytest
import torch

import qengine
from qengine.formats import get_format
from qengine.optim import PagedAdamW8bit
from qengine.ops import optim as _ops

SUPPORTED = qengine.build_info()["supported_cpu_isas"]


# The torch references are many tiny ops; their thread team costs more than the work.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


M_CODE, V_CODE = _ops.STATE_FORMATS  # the formats of m and v


def _nearest(x: torch.Tensor, name: str) -> torch.Tensor:
    """Reference nearest code: the number of float32 midpoints strictly below x (ties down)."""
    mids = get_format(name).kernel_tables()[1][:255]
    return torch.searchsorted(mids, x, side="left").to(torch.uint8)


def _signed_scale(blocks: torch.Tensor) -> torch.Tensor:
    """m's block scale (optim_math.h m_signed_scale): the element of largest magnitude with its
    sign; a tie between +a and -a is +a."""
    absmax = blocks.abs().amax(1)
    return torch.where(blocks.amax(1) < absmax, -absmax, absmax)


def _inv_scale(scale: torch.Tensor) -> torch.Tensor:
    """state_inv_scale: 1 / scale, its magnitude clamped at 1e-38, its sign kept."""
    return 1.0 / torch.where(scale < 0, scale.clamp(max=-1e-38), scale.clamp(min=1e-38))


def _one_update(g, beta1, beta2):
    n = g.numel()
    p = torch.zeros(n)
    s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(-(-n // 256)), torch.zeros(-(-n // 256))
    torch.ops.qengine.adamw_update(p, g, s1, s2, a1, a2, 1e-3, beta1, beta2, 1e-8, 0.0, 1, False)
    return s1, s2, a1, a2


@pytest.mark.parametrize("isa", SUPPORTED)
def test_codes_are_nearest_including_midpoints_and_signed_zeros(isa, isa_restore):
    """beta1 = 0 makes m = g exactly; an element 1.0 in every block makes its absmax 1, so the
    codes of m are the codes of g itself, which holds every midpoint, +-0 and tiny values."""
    qengine.set_cpu_isa(isa)
    mids = get_format(M_CODE).kernel_tables()[1][:255]
    specials = torch.cat([mids, -mids.abs(), torch.nextafter(mids, torch.tensor(2.0)),
                          torch.nextafter(mids, torch.tensor(-2.0)),
                          torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 1e-9, -1e-9, 1.0, -1.0])])
    body = torch.cat([specials, torch.randn(5000) * torch.logspace(-9, 0, 5000)]).clamp(-1, 1)
    body = body[torch.randperm(body.numel())]
    blocks = torch.nn.functional.pad(body, (0, (-body.numel()) % 255)).view(-1, 255)
    g = torch.cat([torch.ones(blocks.shape[0], 1), blocks], 1).reshape(-1)[:-7]  # partial last block
    s1, _, a1, _ = _one_update(g, 0.0, 0.999)
    assert torch.equal(a1, torch.ones_like(a1))
    assert torch.equal(s1, _nearest(g, M_CODE))
    # The same blocks led by -1.0 instead: where no +1.0 ties it the scale is -1 and the codes
    # are those of -g (the leading element at code 1.0, not at the signed code's -(1 - 1/64)).
    g = torch.cat([-torch.ones(blocks.shape[0], 1), blocks], 1).reshape(-1)[:-7]
    s1, _, a1, _ = _one_update(g, 0.0, 0.999)
    padded = torch.nn.functional.pad(g, (0, 7)).view(-1, 256)
    assert torch.equal(a1, torch.where((padded == 1.0).any(1), 1.0, -1.0))
    assert bool((a1 < 0).any()) and bool((a1 > 0).any())  # both signs exercised
    assert torch.equal(s1, _nearest(g * a1.repeat_interleave(256)[:g.numel()], M_CODE))
    assert bool((s1.view(-1)[::256][a1 < 0] == 255).all())  # the dominant element decodes exactly


@pytest.mark.parametrize("isa", SUPPORTED)
def test_v_codes_are_nearest_around_every_midpoint(isa, isa_restore):
    """beta2 = 0 makes v = g * g (one rounding); g = the square roots of v's midpoints and
    their float neighbours put v on both sides of every step of its code, and an element 1.0
    in every block makes the scale 1."""
    qengine.set_cpu_isa(isa)
    mids = get_format(V_CODE).kernel_tables()[1][:255]
    roots = [mids.double().sqrt().float()]
    for direction in (2.0, 0.0):
        step = roots[0]
        for _ in range(3):
            step = torch.nextafter(step, torch.tensor(direction))
            roots.append(step)
    body = torch.cat(roots + [torch.tensor([0.0, -0.0, 1e-30, 1e-5, -1e-5])])
    body = body[torch.randperm(body.numel())]
    blocks = torch.nn.functional.pad(body, (0, (-body.numel()) % 255)).view(-1, 255)
    g = torch.cat([torch.ones(blocks.shape[0], 1), blocks], 1).reshape(-1)
    _, s2, _, a2 = _one_update(g, 0.9, 0.0)
    assert torch.equal(a2, torch.ones_like(a2))
    assert torch.equal(s2, _nearest(g * g, V_CODE))


@pytest.mark.parametrize("isa", [i for i in SUPPORTED if i != "scalar"])
def test_blocks_with_nan_or_inf_states_equal_scalar(isa, isa_restore):
    """A block whose new absmax is NaN or Inf is encoded through the tables (its values need
    not lie in the range the shift arithmetic covers); bytes equal the scalar step's."""
    def run():
        n = 256 * 12 + 40
        g = torch.randn(n, generator=torch.Generator().manual_seed(5))
        g[3] = float("nan")
        g[256 * 2 + 7] = float("inf")
        g[256 * 5 + 1] = -float("inf")
        g[256 * 7 + 100] = 3e38  # v = g * g overflows to Inf, m stays finite
        p = torch.randn(n, generator=torch.Generator().manual_seed(6))
        s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        a1, a2 = torch.ones(-(-n // 256)), torch.ones(-(-n // 256))
        torch.ops.qengine.adamw_update(p, g, s1, s2, a1, a2, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False)
        return [p.view(torch.uint8), s1, s2, a1.view(torch.uint8), a2.view(torch.uint8)]

    qengine.set_cpu_isa("scalar")
    ref = run()
    qengine.set_cpu_isa(isa)
    got = run()
    assert not bool(torch.isfinite(got[4].view(torch.float32)).all())  # the case is exercised
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", SUPPORTED)
def test_codes_and_scales_of_both_states(isa, isa_restore):
    """Random gradients over 12 decades: the scale per block (m: signed, v: absmax) and every
    code as the reference."""
    qengine.set_cpu_isa(isa)
    n = 256 * 300 + 77
    g = torch.randn(n) * torch.exp(torch.randn(n) * 4)
    g[::97] = 0
    s1, s2, a1, a2 = _one_update(g, 0.9, 0.999)
    m = torch.lerp(torch.zeros(n), g, 0.1)  # the first step from zero states, as torch computes it
    v = torch.addcmul(torch.zeros(n), g, g, value=0.001)
    for codes, scales, ref, name in ((s1, a1, m, M_CODE), (s2, a2, v, V_CODE)):
        blocks = torch.nn.functional.pad(ref, (0, (-n) % 256)).view(-1, 256)
        scale = _signed_scale(blocks) if name == M_CODE else blocks.abs().amax(1)
        assert torch.equal(scales, scale)
        x = (blocks * _inv_scale(scale)[:, None]).reshape(-1)[:n]
        assert torch.equal(codes, _nearest(x, name))
    assert bool((a1 < 0).any()) and bool((a1 > 0).any())  # both signs of m's scale exercised
    v_values = torch.tensor(get_format(V_CODE).values)
    assert bool((v_values[s2.long()] > 0).all())  # a decoded v is never 0 where its block's absmax is not


def test_bytes_per_param():
    """Two 8-bit codes and two float32 scales per 256 elements: 2.03 bytes; page rounding adds
    at most 255 elements per parameter (float32 AdamW: 8)."""
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in (3_000_000, 1_234_567, 4096, 10)]
    opt = PagedAdamW8bit(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    per_param = opt.state_bytes() / sum(p.numel() for p in ps)
    assert 2.0 < per_param <= 2.1


def test_final_loss_of_a_regression_within_2_percent_of_fp32():
    """Least squares (2048 samples, 64 features, 8 outputs, noise 0.1): 1000 full-batch steps
    with a cosine schedule from the same init. Measured (seeds 3-14): 0.2-1.1% above fp32;
    bitsandbytes' dynamic maps as the state codes gave 0.3-0.9%."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 64, generator=gen)
    y = x @ torch.randn(64, 8, generator=gen) + 0.1 * torch.randn(2048, 8, generator=gen)
    finals = []
    for make in (lambda ps: PagedAdamW8bit(ps, lr=5e-2), lambda ps: torch.optim.AdamW(ps, lr=5e-2)):
        torch.manual_seed(13)
        model = torch.nn.Linear(64, 8)
        opt = make(model.parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000)
        for _ in range(1000):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        finals.append(torch.nn.functional.mse_loss(model(x), y).item())
    assert abs(finals[0] - finals[1]) <= 0.02 * finals[1]


def test_per_step_update_error():
    """A 2-layer MLP regression: every 10th of 100 steps, the step taken with 8-bit states is
    compared with the float64 AdamW step from the same parameters, gradient and (dequantized)
    previous states: ||dp8 - dp_ref|| / ||dp_ref||, the error of the step itself (the new
    states' quantization shows in the next step). Measured: 5e-6 to 8e-6 (float32 rounding);
    a wrongly decoded or scaled state gives errors of order 1."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(512, 16, generator=gen)
    y = torch.tanh(x @ torch.randn(16, 1, generator=gen)) + 0.1 * torch.randn(512, 1, generator=gen)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = PagedAdamW8bit(model.parameters(), lr=3e-3)
    errs = []
    for step in range(100):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if step % 10 == 9:
            prev = _dequantized_states(opt)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            errs.append(_update_error(opt, model, before, prev))
        else:
            opt.step()
    errs = torch.tensor(errs)
    assert float(errs.max()) < 1e-4


def test_states_track_fp32_adamw_states():
    """The same 200 gradients (a fixed signal plus noise, row scales spread over e^+-2) fed to
    fp32 AdamW and to PagedAdamW8bit from the same start: relative RMS error of the decoded
    m and v against fp32's, and of the parameters' distance travelled. Measured (seeds 0-3):
    m 3.7-4.0%, v 4.4-4.7%, parameters 3.5-3.9% (bitsandbytes' dynamic maps as the codes:
    3.3-3.5%, 3.8-4.6%, 2.7-3.1%). The bounds sit about 2x above."""
    gen = torch.Generator().manual_seed(0)
    rows, cols = 32, 1024
    scale = torch.exp(torch.randn(rows, 1, generator=gen)) * torch.exp(0.5 * torch.randn(1, cols, generator=gen))
    signal = torch.randn(rows, cols, generator=gen)
    p32, p8 = torch.zeros(rows, cols, requires_grad=True), torch.zeros(rows, cols, requires_grad=True)
    o32, o8 = torch.optim.AdamW([p32], lr=1e-3), PagedAdamW8bit([p8], lr=1e-3)
    for _ in range(200):
        g = (0.3 * signal + torch.randn(rows, cols, generator=gen)) * scale
        p32.grad, p8.grad = g.clone(), g.clone()
        o32.step()
        o8.step()
    m8, v8 = _dequantized_states(o8)[0]
    m32, v32 = o32.state[p32]["exp_avg"].double().view(-1), o32.state[p32]["exp_avg_sq"].double().view(-1)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(m8, m32) < 0.08
    assert rel(v8, v32) < 0.1
    assert rel(p8.detach().double(), p32.detach().double()) < 0.08


def _dequantized_states(opt):
    return {i: (_decode(st["state1"], st["absmax1"], M_CODE), _decode(st["state2"], st["absmax2"], V_CODE))
            for i, st in opt.state_dict()["state"].items()}


def _update_error(opt, model, before, prev):
    """||dp8 - dp_ref|| / ||dp_ref|| for the step just taken by the 8-bit optimizer, dp_ref the
    float64 AdamW step from the same parameters and gradients and the 8-bit run's previous
    states (dequantized): the error of one 8-bit step alone."""
    sd = opt.state_dict()
    g0 = opt.param_groups[0]
    b1, b2 = g0["betas"]
    num = den = 0.0
    for i, (p, p0) in enumerate(zip(model.parameters(), before)):
        step = int(sd["state"][i]["step"])
        m_prev, v_prev = prev[i]
        g = p.grad.detach().double().reshape(-1)
        m = b1 * m_prev + (1 - b1) * g
        v = b2 * v_prev + (1 - b2) * g * g
        denom = (v.sqrt() / (1 - b2**step) ** 0.5) + g0["eps"]
        ref = -g0["lr"] * g0["weight_decay"] * p0.double().reshape(-1) - g0["lr"] / (1 - b1**step) * m / denom
        got = (p.detach().double() - p0.double()).reshape(-1)
        num += float(((got - ref) ** 2).sum())
        den += float((ref**2).sum())
    return (num / den) ** 0.5


def _decode(codes, absmax, name):
    table = torch.tensor(get_format(name).values, dtype=torch.float64)
    return table[codes.long()].view(-1) * absmax.double().repeat_interleave(256)[:codes.numel()]


@pytest.mark.skipif(not qengine._C.vbmi_scales(), reason="the CPU has no AVX-512 VBMI (or QENGINE_NO_VBMI is set)")
def test_vbmi_state_step_equals_the_gather_path():
    """The AVX-512 step decodes and encodes 8-bit states with VBMI byte permutes where the CPU
    has them: parameters and states after three steps equal, byte for byte, a process run with
    QENGINE_NO_VBMI=1 (the gather path)."""
    import os
    import subprocess
    import sys
    import tempfile

    script = r'''
import sys, torch, qengine
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(n) * s) for n, s in [(4096, 1.0), (1000, 1e-3), (77, 10.0)]]
opt = qengine.optim.PagedAdamW8bit(ps, lr=1e-2, weight_decay=0.1)
for step in range(3):
    for p in ps:
        p.grad = torch.randn_like(p) * (10.0 ** -step)
    opt.step()
torch.save({"params": [p.detach() for p in ps], "state": opt.state_dict()}, sys.argv[1])
'''
    with tempfile.TemporaryDirectory() as d:
        paths = [os.path.join(d, "vbmi.pt"), os.path.join(d, "gather.pt")]
        for path, env in zip(paths, [{}, {"QENGINE_NO_VBMI": "1"}]):
            subprocess.run([sys.executable, "-c", script, path], check=True, env={**os.environ, **env}, timeout=300)
        a, b = (torch.load(p, weights_only=False) for p in paths)
    for pa, pb in zip(a["params"], b["params"]):
        assert torch.equal(pa, pb)
    for key, sa in a["state"]["state"].items():
        for name, va in sa.items():
            vb = b["state"]["state"][key][name]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), name


@pytest.mark.parametrize("isa", [i for i in SUPPORTED if i != "scalar"])
def test_non_finite_blocks_equal_scalar(isa, isa_restore):
    """Blocks whose state absmax is NaN or infinite leave the byte-table search (it holds for
    |x| < 2 only) for the gather path; the bytes still equal the scalar step's."""
    def run():
        torch.manual_seed(3)
        n = 256 * 40 + 9
        p = torch.randn(n)
        g = torch.randn(n)
        g[256 * 3 + 5] = float("nan")
        g[256 * 7 + 100] = float("inf")
        g[256 * 8 + 1] = -float("inf")
        g[256 * 20: 256 * 21] = 3e38  # v overflows to inf in this block
        s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        a1, a2 = torch.zeros(-(-n // 256)), torch.zeros(-(-n // 256))
        for step in (1, 2):
            torch.ops.qengine.adamw_update(p, g, s1, s2, a1, a2, 1e-3, 0.9, 0.999, 1e-8, 0.0, step, False)
        return [t.view(torch.uint8) if t.dtype != torch.uint8 else t for t in (p, s1, s2, a1, a2)]

    qengine.set_cpu_isa("scalar")
    ref = run()
    qengine.set_cpu_isa(isa)
    got = run()
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("without", ["encoder", "form", "both"])
@pytest.mark.parametrize("isa", [i for i in SUPPORTED if i != "scalar"])
def test_codes_without_their_fast_forms_equal_scalar(isa, without, isa_restore, monkeypatch):
    """A state code without its VBMI byte tables (encoder address 0), without its minifloat
    form (mantissa bits 0) or without both takes the next path down (minifloat codec, byte
    permutes, gathers); the bytes still equal the scalar step's."""
    def run():
        torch.manual_seed(4)
        n = 256 * 30 + 100
        p, g = torch.randn(n), torch.randn(n) * torch.exp(torch.randn(n) * 3)
        s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        a1, a2 = torch.zeros(-(-n // 256)), torch.zeros(-(-n // 256))
        for step in (1, 2, 3):
            torch.ops.qengine.adamw_update(p, g, s1, s2, a1, a2, 1e-3, 0.9, 0.999, 1e-8, 0.01, step, False)
        return [p.view(torch.uint8), s1, s2, a1.view(torch.uint8), a2.view(torch.uint8)]

    qengine.set_cpu_isa("scalar")
    ref = run()
    for code in _ops.state_codes(torch.device("cpu")):
        if without in ("encoder", "both"):
            monkeypatch.setattr(code, "encoder_address", 0)
        if without in ("form", "both"):
            monkeypatch.setattr(code, "form", _ops.NO_FORM)
    qengine.set_cpu_isa(isa)
    for a, b in zip(ref, run()):
        assert torch.equal(a, b)


def _bnb_adamw8bit():
    """bitsandbytes' AdamW8bit with every tensor 8-bit, or a skip where it is not installed."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the bar of this test)")
    return lambda ps, **kw: bnb.optim.AdamW8bit(ps, min_8bit_size=0, **kw)


def _least_squares(seed: int, cond: float):
    """Three weights ([140, 150], [40, 25], [55, 51]: 21,000, 1,000, 2,805 elements) fitted to
    inputs whose feature scales fall from 1 to 10**-cond: gradients spread over `cond` decades
    inside every 256-element state block."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for o, i in ((140, 150), (40, 25), (55, 51)):
        x = torch.randn(2048, i, generator=g) * torch.logspace(0, -cond, i)
        y = x @ torch.randn(o, i, generator=g).T + 0.1 * torch.randn(2048, o, generator=g)
        data.append((x, y))
    return data


def _train_least_squares(make, data, steps=300):
    ps = [torch.nn.Parameter(torch.zeros(y.shape[1], x.shape[1])) for x, y in data]
    opt = make(ps, lr=1e-2, betas=(0.9, 0.99))

    def loss():
        return sum(((x @ p.T - y) ** 2).sum() for p, (x, y) in zip(ps, data)) / 2048

    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        return float(loss())


def test_ill_conditioned_least_squares_no_worse_than_bitsandbytes():
    """The least-squares problem of issue 27 (lr 1e-2, betas (0.9, 0.99), 300 full-batch steps):
    PagedAdamW8bit ends no worse than bitsandbytes' AdamW8bit. Measured (seeds 0-2; fp32 AdamW /
    bitsandbytes / qengine before the signed m scale and the (5, 1, 3) code / now): cond 2
    19.3-21.5 / 22.8-24.5 / 26.4-28.6 / 18.0-19.6, cond 3 13.7-14.7 / 15.4-16.5 / 17.5-19.2 /
    12.2-13.7 (docs/optimizers.md). Seed 0, cond 2 here (cond 3 ends the same way)."""
    bnb8 = _bnb_adamw8bit()
    data = _least_squares(0, 2.0)
    ours = _train_least_squares(PagedAdamW8bit, data)
    theirs = _train_least_squares(bnb8, data)
    assert ours <= theirs, (ours, theirs)


def test_ill_conditioned_mlp_tracks_fp32_at_least_as_closely_as_bitsandbytes():
    """A tanh MLP (200 -> 64 -> 10) classifying inputs with feature scales from 1 to 1e-3 (10%
    label noise, 300 full-batch steps, lr 1e-2, betas (0.9, 0.99)). Its final training loss is no
    quality measure (both 8-bit optimizers leave fp32 AdamW's path and bitsandbytes ends below
    fp32's loss by memorising faster), so the bar is the distance from fp32 AdamW's parameters:
    ||p8 - p32|| / ||p32|| no larger than bitsandbytes'. Measured (seeds 0-2): qengine 0.27-0.33,
    bitsandbytes 0.86-0.93; final losses fp32 0.0057-0.0060, qengine 0.0055-0.0057, bitsandbytes
    0.0047-0.0052. The loss is also held within 10% of fp32's."""
    bnb8 = _bnb_adamw8bit()
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(0, -3, 200)
    x = torch.randn(2048, 200, generator=g) * scale
    y = (x @ (torch.randn(10, 200, generator=g) / scale / 200**0.5).T).argmax(1)
    y = torch.where(torch.rand(2048, generator=g) < 0.1, torch.randint(0, 10, (2048,), generator=g), y)
    finals = {}
    for name, make in (("fp32", torch.optim.AdamW), ("qengine", PagedAdamW8bit), ("bnb", bnb8)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(200, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
        opt = make(list(net.parameters()), lr=1e-2, betas=(0.9, 0.99))
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        with torch.no_grad():
            finals[name] = (float(torch.nn.functional.cross_entropy(net(x), y)),
                            torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    ref = finals["fp32"][1]

    def dist(name):
        return float((finals[name][1] - ref).norm() / ref.norm())

    assert dist("qengine") <= dist("bnb"), (dist("qengine"), dist("bnb"))
    assert abs(finals["qengine"][0] - finals["fp32"][0]) <= 0.1 * finals["fp32"][0]


def test_states_saved_in_an_older_code_are_re_encoded_on_load():
    """A checkpoint of an older qengine stores m in the code it used then (qmap1 = the
    (5, 2, 3, 127) minifloat, block scale max |m|): loading decodes it with that table and
    re-encodes it in today's code, so a run resumes from (nearly) the same moments."""
    from qengine.formats import _state8_code

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = PagedAdamW8bit([p], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    st = sd["state"][0]
    now = get_format("_state8_signed").kernel_tables("cpu")[0]
    n = p.numel()
    pad = (-n) % 256
    m = torch.cat([now[st["state1"].long()], torch.zeros(pad)]).reshape(-1, 256) * st["absmax1"].reshape(-1, 1)
    old_table = torch.tensor(_state8_code((5, 2, 3, 127)), dtype=torch.float32)
    absmax = m.abs().amax(dim=1)
    mids = (old_table[1:] + old_table[:-1]) / 2
    old_codes = torch.searchsorted(mids, (m / absmax.reshape(-1, 1)).reshape(-1)[:n].contiguous()).to(torch.uint8)
    old_m = (old_table[old_codes.long()].reshape(-1)[:n])
    old_m = (torch.cat([old_m, torch.zeros(pad)]).reshape(-1, 256) * absmax.reshape(-1, 1)).reshape(-1)[:n]
    st.update(state1=old_codes, absmax1=absmax, qmap1=old_table)

    q = torch.nn.Parameter(p.detach().clone())
    fresh = PagedAdamW8bit([q], lr=1e-2)
    fresh.load_state_dict(sd)
    back = fresh.state_dict()["state"][0]
    decoded = (torch.cat([now[back["state1"].long()], torch.zeros(pad)]).reshape(-1, 256)
               * back["absmax1"].reshape(-1, 1)).reshape(-1)[:n]
    assert torch.equal(back["qmap1"], now)
    # one re-encoding: within the new code's step near each value (1/32 of a binade above 0.5
    # of the block's scale, 1/8 of one below), and the block's largest element exact
    assert bool(((decoded - old_m).abs() <= old_m.abs() / 8 + 2.0**-13 * absmax.max()).all())
    lead = int(m.abs().reshape(-1)[:n].argmax())
    assert float(decoded[lead]) == pytest.approx(float(old_m[lead]), rel=1e-6)

    st["qmap1"] = old_table.flip(0)  # not a sorted table: refused, never decoded as garbage
    with pytest.raises(ValueError, match="qmap1 is not a sorted code table"):
        PagedAdamW8bit([torch.nn.Parameter(p.detach().clone())]).load_state_dict(sd)
