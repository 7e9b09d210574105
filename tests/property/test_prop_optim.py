"""Properties of qengine.optim.PagedAdamW / PagedAdamW8bit over generated parameter lists
(shapes with 0, 1, primes; float32/float16/bfloat16), gradients (NaN, +-Inf, subnormals, +-0,
large), hyperparameters, page sizes and resident budgets (spilling to disk): every step equals
a float64 AdamW step from the previous states (8-bit: their decoded values) within float32
rounding, 8-bit states hold m and v to within their code spacing, parameters are updated in
place and nothing else is modified; bad hyperparameters raise ValueError naming them."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from checks import check_raises
from profiles import PROFILE
from qengine.formats import get_format
from qengine.optim import PagedAdamW, PagedAdamW8bit
from qengine.ops import optim as _ops
from strategies import DIMS, make_values, unchanged, value_specs

OPT_DIMS = st.sampled_from(DIMS[:12]) | st.integers(1, 70)
PARAM_SHAPES = st.lists(st.lists(OPT_DIMS, min_size=1, max_size=2).map(tuple), min_size=1, max_size=4)
TINY = 2.0**-126  # float32's smallest normal
M_CODE, V_CODE = _ops.STATE_FORMATS  # the formats of the 8-bit m and v
HYPER = st.fixed_dictionaries(dict(
    lr=st.sampled_from([0.0, 1e-4, 1e-3, 1e-2, 0.3]), b1=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    b2=st.sampled_from([0.0, 0.9, 0.999, 0.99999]), eps=st.sampled_from([1e-12, 1e-8, 1e-4, 0.5]),
    wd=st.sampled_from([0.0, 0.01, 0.5]), maximize=st.booleans()))


def _decoded(codes: torch.Tensor, absmax: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit state codes as float64 (table[code] * absmax of the code's 256-block, [n]) and
    the block scales (float64 [ceil(n / 256)])."""
    table = torch.tensor(get_format(name).values, dtype=torch.float64)
    return table[codes.long()] * absmax.double().repeat_interleave(256)[:codes.numel()], absmax.double()


def _states(opt, eight: bool) -> dict:
    """{param index: (step, m float64 [n], v float64 [n], 8-bit: (m scales, v scales))}."""
    out = {}
    for i, st_ in opt.state_dict()["state"].items():
        if eight:
            m, ma = _decoded(st_["state1"], st_["absmax1"], M_CODE)
            v, va = _decoded(st_["state2"], st_["absmax2"], V_CODE)
            out[i] = (int(st_["step"]), m, v, (ma, va))
        else:
            out[i] = (int(st_["step"]), st_["exp_avg"].double().reshape(-1), st_["exp_avg_sq"].double().reshape(-1),
                      None)
    return out


def _reference_step(p0, g, m0, v0, t, h):
    """float64 AdamW (decoupled weight decay) from p0, gradient g and states m0, v0 at step t;
    also a bound on the float32 kernel's error (each float32 operation and hyper constant
    rounds once: a few units of 2^-24 of the magnitudes involved)."""
    if h["maximize"]:
        g = -g
    m = h["b1"] * m0 + (1 - h["b1"]) * g
    v = h["b2"] * v0 + (1 - h["b2"]) * g * g
    bc1, bc2 = 1 - h["b1"] ** t, math.sqrt(1 - h["b2"] ** t)
    denom = v.sqrt() / bc2 + h["eps"]
    decayed = p0 * (1 - h["lr"] * h["wd"])
    p = decayed - h["lr"] / bc1 * m / denom
    mag_m = (h["b1"] * m0).abs() + ((1 - h["b1"]) * g).abs()
    step_mag = h["lr"] / bc1 * mag_m / denom
    tol = 32 * 2.0**-24 * step_mag + 4 * 2.0**-24 * p0.abs()
    # Below float32's normal range the kernel (and torch) keep less: m, v and the product
    # neg_step * m are off by up to the smallest normal (flush-to-zero included), which
    # the division by denom magnifies (and v's error moves sqrt(v) by up to its square root).
    tol = tol + TINY * (1 + h["lr"] / bc1) / denom + step_mag * (TINY**0.5 / bc2) / denom
    return p, m, v, tol


def _within_code_spacing(decoded_norm: torch.Tensor, ref_norm: torch.Tensor, name: str) -> torch.Tensor:
    """Per element: the decoded normalised state lies between the codes next to the bracket
    of the reference value (one code of slack each side: float32 vs float64 at a midpoint,
    and v's code, which has no zero and holds a v below its smallest value at that value)."""
    table = torch.tensor(get_format(name).values, dtype=torch.float64)
    lo = (torch.searchsorted(table, ref_norm, right=True) - 2).clamp(0, 255)
    hi = (torch.searchsorted(table, ref_norm, right=False) + 1).clamp(0, 255)
    return (decoded_norm >= table[lo]) & (decoded_norm <= table[hi])


@PROFILE
@given(shapes=PARAM_SHAPES, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       eight=st.booleans(), h=HYPER, pspec=value_specs(allow_nonfinite=False, allow_huge=False),
       gspecs=st.lists(value_specs(), min_size=1, max_size=3), paging=st.sampled_from(["none", "pages", "spill"]),
       skip=st.integers(-1, 3), data=st.data())
def test_steps_match_float64_adamw(shapes, dtype, eight, h, pspec, gspecs, paging, skip, data):
    pspec.log2_scale = max(-10, min(10, pspec.log2_scale))
    params = [torch.nn.Parameter(make_values(pspec, s, dtype) if math.prod(s) else torch.empty(s, dtype=dtype))
              for s in shapes]
    cls = PagedAdamW8bit if eight else PagedAdamW
    page = {"none": 1 << 20, "pages": 256, "spill": 256}[paging]
    page_bytes = page * 8 if not eight else page * 2 + 8 * (page // 256)
    budget = page_bytes * data.draw(st.integers(1, 3)) if paging == "spill" else None
    opt = cls(params, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], weight_decay=h["wd"],
              maximize=h["maximize"], page_elements=page, budget_bytes=budget)
    ptrs = [p.data_ptr() for p in params]
    for t, gspec in enumerate(gspecs):
        # Gradients: |g| up to 2^40 (g * g stays inside float32, as torch's float32 states need).
        gspec.log2_scale = max(-40, min(40, gspec.log2_scale))
        top = min(2.0**40, torch.finfo(dtype).max)
        for i, p in enumerate(params):
            p.grad = None if i == skip and t > 0 else make_values(gspec, p.shape, dtype).clamp(-top, top)
        prev = _states(opt, eight)
        before = [p.detach().clone() for p in params]
        grads = [(p.grad.clone(), p.grad.stride()) if p.grad is not None else None for p in params]
        opt.step()
        now = _states(opt, eight)
        for i, p in enumerate(params):
            assert p.data_ptr() == ptrs[i] and p.dtype == dtype and p.shape == shapes[i], "not updated in place"
            if grads[i] is None:  # no gradient: neither the parameter nor its state moves
                assert unchanged(p.detach(), before[i], before[i].stride())
                assert (i in now) == (i in prev)
                if i in prev:
                    assert now[i][0] == prev[i][0]
                continue
            assert unchanged(p.grad, *grads[i]), "step modified a gradient"
            step, m0, v0, _ = prev.get(i, (0, torch.zeros(p.numel(), dtype=torch.float64),
                                           torch.zeros(p.numel(), dtype=torch.float64), None))
            assert now[i][0] == step + 1
            g64 = grads[i][0].double().reshape(-1)
            ref, m, v, tol = _reference_step(before[i].double().reshape(-1), g64, m0, v0, step + 1, h)
            got = p.detach().double().reshape(-1)
            info = torch.finfo(dtype)
            tol = tol + (info.eps if dtype != torch.float32 else 2.0**-24) * ref.abs() + info.smallest_normal * info.eps
            nan = torch.isnan(ref)
            assert torch.equal(torch.isnan(got), nan), "NaN where the reference has none, or none where it has"
            ok = (got - ref).abs() <= tol
            ok = ok | (torch.isinf(got) & (got == ref)) | ((ref.abs() >= info.max) & (got.abs() >= info.max))
            assert (ok | nan).all(), f"max parameter error {(got - ref).abs()[~ok & ~nan].max().item():.3g}"
            m_got, v_got = now[i][1], now[i][2]
            if not eight:
                fin = torch.isfinite(m) & torch.isfinite(v)
                m_tol = 4 * 2.0**-24 * ((h["b1"] * m0).abs() + ((1 - h["b1"]) * g64).abs()) + TINY
                assert (((m_got - m).abs() <= m_tol) | ~fin).all(), "exp_avg differs from the float64 reference"
                assert (((v_got - v).abs() <= 4 * 2.0**-24 * v + TINY) | ~fin).all(), "exp_avg_sq differs"
                continue
            m_mag = (h["b1"] * m0).abs() + ((1 - h["b1"]) * g64).abs()  # m's float32 error scales with these
            _check_8bit_states(m_got, now[i][3][0], m, m_mag, M_CODE)
            _check_8bit_states(v_got, now[i][3][1], v, v, V_CODE)


def _check_8bit_states(got: torch.Tensor, scales: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor,
                       name: str) -> None:
    """Blocks of 256 with a finite reference: |scale| = max |state| (to float32 rounding); m's
    scale is signed, its sign that of an element of largest magnitude (v's: positive); every
    decoded value normalised by its scale within the code spacing of the reference's
    normalised by max |state| with the scale's sign (what the kernel encoded)."""
    n = ref.numel()
    pad = (-n) % 256
    r = torch.nn.functional.pad(ref, (0, pad)).view(-1, 256)
    gv = torch.nn.functional.pad(got, (0, pad)).view(-1, 256)
    absmax = r.abs().amax(1)
    # float32 error of the state (cancellation in m = b1 m0 + (1 - b1) g): up to ~4 ulp of the
    # magnitudes summed, which may be much larger than the result
    err = 8 * 2.0**-24 * torch.nn.functional.pad(mag, (0, pad)).view(-1, 256).amax(1)
    real = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, pad)).view(-1, 256)  # not padding
    ok_blocks = torch.isfinite(r).all(1) & (absmax > 1e-30) & (absmax < 1e30) & (err <= 1e-3 * absmax)
    if not ok_blocks.any():
        return
    r, gv, absmax, scales, err = r[ok_blocks], gv[ok_blocks], absmax[ok_blocks], scales[ok_blocks], err[ok_blocks]
    tol = err + 8 * 2.0**-24 * absmax
    assert ((scales.abs() - absmax).abs() <= tol).all(), f"{name}: |block scale| is not max |state|"
    if name == M_CODE:  # the scale is one of the block's elements of largest magnitude, with its sign
        assert ((r - scales[:, None]).abs().amin(1) <= tol).all(), f"{name}: block scale is not a largest state"
    else:
        assert (scales > 0).all(), f"{name}: block scale is not positive"
    sign = torch.where(scales < 0, -1.0, 1.0).to(r.dtype)
    within = _within_code_spacing(gv / scales[:, None], r / (sign * absmax)[:, None], name)
    assert within[real[ok_blocks]].all(), f"{name}: a decoded state lies beyond its code spacing"


BAD_NUMBERS = [float("nan"), float("inf"), -float("inf")]


@PROFILE
@given(lr=st.sampled_from([1e-3, 0.0, -1e-3, -1.0, *BAD_NUMBERS]),
       b1=st.sampled_from([0.9, 0.0, 1.0, 1.5, -0.1, *BAD_NUMBERS]),
       b2=st.sampled_from([0.999, 0.0, 1.0, -1e-9, *BAD_NUMBERS]),
       eps=st.sampled_from([1e-8, 0.0, -1e-8, *BAD_NUMBERS]), wd=st.sampled_from([0.01, 0.0, -0.1, *BAD_NUMBERS]),
       eight=st.booleans(), when=st.sampled_from(["init", "group"]))
def test_bad_hyperparameters_raise_naming_them(lr, b1, b2, eps, wd, eight, when):
    """Checked in the order lr, betas, eps, weight_decay: the first bad one is named. Set in
    a param group after construction, the step refuses and changes nothing. (eps = 0 is
    accepted, as torch.optim.AdamW accepts it.)"""
    checks = [("lr", lr, lr < 0, r"learning rate"), ("betas[0]", b1, None, ""), ("betas[1]", b2, None, ""),
              ("", b1, not 0 <= b1 < 1, r"index 0"), ("", b2, not 0 <= b2 < 1, r"index 1"),
              ("eps", eps, eps < 0, r"epsilon"), ("weight_decay", wd, wd < 0, r"weight_decay")]
    expected = None
    for name, v, bad, word in checks:  # both betas are read (finite) before either is range-checked
        if name and not math.isfinite(v):
            expected = (ValueError, rf"{re_escape(name)} must be finite")
            break
        if bad and math.isfinite(v):
            expected = (ValueError, word)
            break
    cls = PagedAdamW8bit if eight else PagedAdamW
    p = torch.nn.Parameter(torch.randn(300))
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    if when == "init":
        if expected is None:
            cls([p], **kw)
        else:
            check_raises(expected, cls, [p], **kw)
        return
    opt = cls([p])
    p.grad = torch.randn(300)
    opt.step()
    before, sd = p.detach().clone(), opt.state_dict()
    opt.param_groups[0].update(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    if expected is None:
        opt.step()
        return
    check_raises(expected, opt.step)
    assert torch.equal(p.detach(), before)
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in sd["state"][0].items()), "a refused step changed a state"


def re_escape(s: str) -> str:
    return s.replace("[", r"\[").replace("]", r"\]")
