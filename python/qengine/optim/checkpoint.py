"""state_dict / load_state_dict of the paged AdamW optimizers, in torch's optimizer layout:
{"state": {param index: {...}}, "param_groups": [{..., "params": [indices]}]}.

32-bit states are saved as torch.optim.AdamW saves them (step, exp_avg, exp_avg_sq shaped like
the parameter), so either optimizer loads the other's checkpoint; 8-bit states as their codes
and block scales (step, state1, state2 uint8 [numel], absmax1, absmax2 float32
[ceil(numel / 256)]; absmax1 is m's signed scale, negative where a block's element of largest
magnitude is, and a state decodes as qmap[code] * scale either way), so a resumed run continues from the exact bytes, and the values of the
codes they are in (qmap1, qmap2 float32 [256], as bitsandbytes saves them), which loading checks.
"""

from __future__ import annotations

import copy
import math

import torch

from ..ops import optim as optim_ops
from .groups import check_group

KEYS = {32: ("step", "exp_avg", "exp_avg_sq"), 8: ("step", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")}
TENSOR_KEYS = {32: KEYS[32][1:], 8: KEYS[8][1:5]}  # the states themselves


def _params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _page_views(mgr, cache: dict, page: int):
    if page not in cache:
        buf = mgr.page_for_reading(page)
        cache[page] = mgr.views(buf) if buf is not None else None
    return cache[page]


def _export(opt, p: torch.Tensor, cache: dict) -> dict:
    """p's state, read from its region. Sized and shaped by what the region was reserved for,
    not by p now: a parameter resized since (p.data = ...) exports the state it has, shaped as
    it was then, as torch.optim.AdamW's state_dict does, never a read past its region."""
    mgr = opt._mgr
    shape = opt._meta[id(p)][0]
    n = shape.numel()
    eight = mgr.state_bits == 8
    dt = torch.uint8 if eight else torch.float32
    s1 = torch.zeros(n, dtype=dt, device=mgr.device)
    s2 = torch.zeros(n, dtype=dt, device=mgr.device)
    a1 = torch.zeros(-(-n // optim_ops.BLOCK), dtype=torch.float32, device=mgr.device) if eight else None
    a2 = torch.zeros_like(a1) if eight else None
    for span in mgr.spans(opt._region[p], n):
        views = _page_views(mgr, cache, span.page)
        if views is None:
            continue
        v1, v2, v3, v4 = views
        sl = slice(span.first, span.first + span.count)
        s1[span.offset:span.offset + span.count] = v1[sl]
        s2[span.offset:span.offset + span.count] = v2[sl]
        if eight:
            nb = -(-span.count // optim_ops.BLOCK)
            b0, o0 = span.first // optim_ops.BLOCK, span.offset // optim_ops.BLOCK
            a1[o0:o0 + nb] = v3[b0:b0 + nb]
            a2[o0:o0 + nb] = v4[b0:b0 + nb]
    step = torch.tensor(float(opt._steps[p]), dtype=torch.float32)
    if eight:
        codes = optim_ops.state_codes(mgr.device)
        return {"step": step, "state1": s1, "state2": s2, "absmax1": a1, "absmax2": a2,
                "qmap1": codes[0].table.clone(), "qmap2": codes[1].table.clone()}
    return {"step": step, "exp_avg": s1.reshape(shape), "exp_avg_sq": s2.reshape(shape)}


def state_dict(opt) -> dict:
    index = {}
    groups = []
    for g in opt.param_groups:
        packed = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
        packed["params"] = [index.setdefault(id(p), len(index)) for p in g["params"]]
        groups.append(packed)
    cache: dict = {}
    state = {index[id(p)]: _export(opt, p, cache) for p in _params(opt) if p in opt._steps}
    return {"state": state, "param_groups": groups}


def _check_state(i: int, p: torch.Tensor, st: object, bits: int) -> dict:
    """The entry for parameter i as (step, tensors) in this optimizer's layout, or ValueError."""
    if not isinstance(st, dict):
        raise ValueError(f"state of parameter {i} must be a dict, got {type(st).__name__}")
    expected = set(KEYS[bits])
    if set(st) != expected:
        other = KEYS[8 if bits == 32 else 32]
        if set(st) == set(other):
            hint = " (a state dict of the other paged AdamW: 8-bit and 32-bit states do not convert)"
        elif bits == 8 and set(st) == expected - {"qmap1", "qmap2"}:
            hint = " (8-bit states saved by an older qengine, whose state codes this version does not decode)"
        else:
            hint = " (a state dict from another optimizer?)"
        raise ValueError(f"state of parameter {i} has keys {sorted(st)}, expected {sorted(expected)}{hint}")
    recode = {}
    if bits == 8:
        for key, code in zip(("qmap1", "qmap2"), optim_ops.state_codes(torch.device("cpu"))):
            saved = st[key]
            if not (isinstance(saved, torch.Tensor) and saved.dtype == torch.float32 and saved.numel() == 256):
                raise ValueError(f"state of parameter {i}: {key} must be a float32 code table of 256 values")
            saved = saved.detach().cpu().reshape(-1)
            if torch.equal(saved, code.table):
                continue
            if not (bool(torch.isfinite(saved).all()) and bool((saved[1:] > saved[:-1]).all())
                    and float(saved.abs().max()) <= 1.0):
                raise ValueError(f"state of parameter {i}: {key} is not a sorted code table within [-1, 1] "
                                 "(corrupt checkpoint)")
            recode[key] = (saved, code.table)  # saved by another qengine version: re-encoded below
    step = st["step"]
    step = float(step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step) \
        if isinstance(step, (int, float, torch.Tensor)) else float("nan")
    if not math.isfinite(step) or step < 1 or step != int(step):
        raise ValueError(f"state of parameter {i}: step must be a positive integer, got {st['step']!r}")
    n = p.numel()
    out = {"step": int(step)}
    for key in TENSOR_KEYS[bits]:
        t = st[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state of parameter {i}: {key} must be a tensor, got {type(t).__name__}")
        size = -(-n // optim_ops.BLOCK) if key.startswith("absmax") else n
        if t.numel() != size:
            raise ValueError(f"state of parameter {i}: {key} has {t.numel()} elements, expected {size}")
        if key.startswith("state") and t.dtype != torch.uint8:
            raise ValueError(f"state of parameter {i}: {key} must be uint8 codes, got {t.dtype}")
        if not key.startswith("state"):
            if not t.is_floating_point():
                raise ValueError(f"state of parameter {i}: {key} must be floating point, got {t.dtype}")
            t = t.detach().to(torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"state of parameter {i}: {key} holds NaN or Inf (corrupt checkpoint)")
            # m's block scale is signed (its element of largest magnitude, csrc optim_math.h
            # m_signed_scale); v and its scale are never negative.
            if key in ("exp_avg_sq", "absmax2") and bool((t < 0).any()):
                raise ValueError(f"state of parameter {i}: {key} must be >= 0 (corrupt checkpoint)")
        out[key] = t.detach().reshape(-1)
    for qmap, (state, absmax, signed) in (("qmap1", ("state1", "absmax1", True)),
                                          ("qmap2", ("state2", "absmax2", False))):
        if qmap in recode:
            out[state], out[absmax] = recode_states(out[state], out[absmax], *recode[qmap], signed)
    return out


def recode_states(codes: torch.Tensor, scales: torch.Tensor, old_table: torch.Tensor, new_table: torch.Tensor,
                  signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit states saved in another code (an older qengine's): decoded with the table they were
    saved with, then encoded as the kernels encode them now: per block of 256, the scale is the
    largest magnitude (for m, signed: that element with its sign, ties positive), each value the
    nearest code (ties to the lower code). Returns (codes uint8, scales float32)."""
    n, block = codes.numel(), optim_ops.BLOCK
    pad = (-n) % block
    values = old_table[codes.long()].reshape(-1)
    values = torch.cat([values, values.new_zeros(pad)]).reshape(-1, block) * scales.reshape(-1, 1)
    top, bottom = values.amax(dim=1), values.amin(dim=1)
    if signed:
        scale = torch.where(top >= -bottom, top, bottom)
    else:
        scale = torch.maximum(top, -bottom)
    inv = 1.0 / torch.where(scale.abs() > 1e-38, scale, torch.full_like(scale, 1e-38).copysign(scale))
    normalised = (values * inv.reshape(-1, 1)).reshape(-1)[:n]
    midpoints = (new_table[1:] + new_table[:-1]) / 2
    new_codes = torch.searchsorted(midpoints, normalised.contiguous(), side="left").to(torch.uint8)
    return new_codes, scale.to(torch.float32)


def load_state_dict(opt, sd: dict) -> None:
    if not isinstance(sd, dict) or set(sd) != {"state", "param_groups"}:
        keys = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"an optimizer state_dict has exactly the keys 'state' and 'param_groups', got {keys}")
    saved_groups, state = sd["param_groups"], sd["state"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups) if isinstance(saved_groups, list) else '?'} "
                         f"parameter groups, this optimizer has {len(opt.param_groups)}")
    index = {}
    for gi, (g, s) in enumerate(zip(opt.param_groups, saved_groups)):
        if not isinstance(s, dict) or not isinstance(s.get("params"), list) or len(s["params"]) != len(g["params"]):
            raise ValueError(f"loaded param group {gi} does not hold the same number of parameters as group {gi}")
        check_group(s)
        for i, p in zip(s["params"], g["params"]):
            index[i] = p
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    entries = {}
    for i, st in state.items():
        if i not in index:
            raise ValueError(f"state for parameter index {i!r}, which no loaded param group holds")
        entries[index[i]] = _check_state(i, index[i], st, opt.STATE_BITS)
    # Everything checked: the states go into a new page manager (its spill file, when the
    # budget needs one, is created and reserved first); only once all are in does it replace
    # the old one, with the groups' settings (absent entries start fresh). A failure on the
    # way (e.g. SpillError) leaves the optimizer as it was.
    mgr = opt._new_manager(opt._mgr.device)
    region = {p: mgr.add_region(p.numel()) for p in _params(opt)}
    try:
        mgr.prepare_spill()
        for p, st in entries.items():
            _import(mgr, region[p], p, st)
    except BaseException:
        mgr.close()
        raise
    for g, s in zip(opt.param_groups, saved_groups):
        g.update({k: copy.deepcopy(v) for k, v in s.items() if k != "params"})
    old, opt._mgr, opt._region = opt._mgr, mgr, region
    opt._meta = {id(p): (p.shape, p.dtype) for p in region}
    old.close()
    opt._steps = {p: st["step"] for p, st in entries.items()}
    opt._broken = None


def _import(mgr, start: int, p: torch.Tensor, st: dict) -> None:
    eight = mgr.state_bits == 8
    names = TENSOR_KEYS[mgr.state_bits]
    src = [st[k].to(mgr.device) for k in names]
    for span in mgr.spans(start, p.numel()):
        buf = mgr.acquire(span.page)
        v = mgr.views(buf)
        sl = slice(span.first, span.first + span.count)
        v[0][sl] = src[0][span.offset:span.offset + span.count]
        v[1][sl] = src[1][span.offset:span.offset + span.count]
        if eight:
            nb = -(-span.count // optim_ops.BLOCK)
            b0, o0 = span.first // optim_ops.BLOCK, span.offset // optim_ops.BLOCK
            v[2][b0:b0 + nb] = src[2][o0:o0 + nb]
            v[3][b0:b0 + nb] = src[3][o0:o0 + nb]
        mgr.release_all()
