"""The fused AdamW step: the 8-bit state codes' search tables, run_tasks (one step over a table
of spans, through the device's runner that cpu.py / cuda.py register in TASK_RUNNERS) and the
schema, checks and fake of ``qengine::adamw_update`` (one tensor; kernels in cpu.py, cuda.py).

Task rows (int64 [ntasks, 10], csrc/include/qengine/optim_math.h OptimTask): addresses of
param, grad, state1, state2, absmax1, absmax2, then n, dtype code, hyper row, 0.
Hyper rows (float32 [k, 9], AdamHyper): decay, w1, lerp_small, beta2, w2, bc2_sqrt, eps,
neg_step, maximize.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


from .. import _C
from .._checks import (DOCTOR_HINT, DTYPE_CODES, SUPPORTED_DEVICES, check_contiguous, check_dtype, check_numel,
                       reject_device, unsupported_device_message)
from ..formats import STATE8_SIGNED_FORM, STATE8_UNSIGNED_FORM, get_format

BLOCK = 256  # elements per 8-bit state block (one absmax each)
# The codes of the first and second moment (formats.py) and their minifloat forms.
STATE_FORMATS = ("_state8_signed", "_state8_unsigned")
STATE_FORMS = (STATE8_SIGNED_FORM, STATE8_UNSIGNED_FORM)
NO_FORM = (0, 0, 0, 0)  # a code the kernels search through its tables
TASK_FIELDS = 10
HYPER_FIELDS = 9
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The nearest-code lookup (optim_math.h StateCode): buckets of floats sharing their top 16 bits
# (sign, exponent, 7 mantissa bits), |x| from 2**-30 (below: one bucket) to 1.0 (and above: one
# bucket). Normalised states lie in [-1, 1]; a bucket is at most 1/128 of its values wide,
# narrower than the state codes' spacing, so it holds at most one midpoint (checked).
_LUT_BASE = (127 - 30) << 7
_LUT_KMAX = (127 << 7) - _LUT_BASE


class StateCode:
    """One 8-bit state code on one device: table float32 [256] (sorted) and lut int32
    [2 * (kmax + 1)], entry (midpoints below the bucket) << 16 | low 16 bits of the midpoint
    inside it (0xffff / 0 when none, for positive / negative buckets). On the CPU also the
    code's minifloat form (formats.STATE8_*_FORM), checked against those tables, which the SIMD
    kernels use instead of lookups, and the gather-free tables of AVX-512 VBMI CPUs."""

    def __init__(self, format_name: str, device: torch.device, form: tuple[int, int, int, int]):
        fmt = get_format(format_name)
        table, mids, _, _ = fmt.kernel_tables("cpu")
        if fmt.bits != 8 or not fmt.identity_order or len(fmt.values) != 256:
            raise ValueError(f"an optimizer state code must be a sorted 256-value table, {format_name!r} is not")
        k = torch.arange(_LUT_KMAX + 1, dtype=torch.int64)
        top = _LUT_BASE + k  # the shared top 16 bits of |x| in bucket k (end buckets: clamped)
        lo_mag = torch.where(k == 0, torch.zeros_like(k), top << 16).to(torch.int32).view(torch.float32)
        hi_mag = torch.where(k == _LUT_KMAX, torch.full_like(k, 0x7F800000), ((top + 1) << 16) - 1)
        hi_mag = hi_mag.to(torch.int32).view(torch.float32)
        # Buckets in key order: negatives (largest magnitude first), then positives.
        lo = torch.cat([-hi_mag.flip(0), lo_mag])
        hi = torch.cat([-lo_mag.flip(0), hi_mag])
        real = mids[:255]
        first = torch.searchsorted(real, lo, side="left")  # midpoints below the bucket
        inside = torch.searchsorted(real, hi, side="right") - first  # midpoints within [lo, hi]
        ends = torch.tensor([0, _LUT_KMAX, _LUT_KMAX + 1, 2 * _LUT_KMAX + 1])
        if int(inside.max()) > 1 or int(inside[ends].max()) > 0:
            raise ValueError(f"{format_name!r} is too dense for the optimizer state search (two midpoints share a "
                             "bucket, or one lies below 2**-30 or at 1.0 and above)")
        negative = torch.arange(lo.numel()) <= _LUT_KMAX
        mid_bits = real[first.clamp(max=254)].abs().view(torch.int32).to(torch.int64) & 0xFFFF
        none = torch.where(negative, torch.zeros_like(mid_bits), torch.full_like(mid_bits, 0xFFFF))
        lut = (first << 16) | torch.where(inside > 0, mid_bits, none)
        self.base, self.kmax = _LUT_BASE, _LUT_KMAX
        self.table = table.to(device)
        self.lut = lut.to(torch.int32).to(device)
        self.form = NO_FORM
        self.encoder, self.encoder_address = None, 0
        if self.table.device.type == "cpu":
            if not _C.check_minifloat_form(*self.args(), *form):
                raise RuntimeError(f"{format_name!r} does not have the minifloat form {form}")
            self.form = form
            self.encoder = _C.StateEncoder(*self.args())
            self.encoder_address = self.encoder.address

    def args(self) -> tuple:
        return (self.table.data_ptr(), self.lut.data_ptr(), self.base, self.kmax)


_CODES: dict = {}


def state_codes(device: torch.device) -> tuple[StateCode, StateCode]:
    """(signed code for m, unsigned code for v) on device, built once."""
    key = str(device)
    if key not in _CODES:
        _CODES[key] = tuple(StateCode(name, device, form) for name, form in zip(STATE_FORMATS, STATE_FORMS))
    return _CODES[key]


def hyper_row(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
              maximize: bool) -> list[float]:
    """The AdamHyper values of one parameter for its step number `step` (>= 1), computed in
    double as torch computes its Python scalars (rounded to float32 when stored)."""
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    w1 = 1 - beta1
    return [1 - lr * weight_decay, w1, 1.0 if abs(w1) < 0.5 else 0.0, beta2, 1 - beta2, math.sqrt(bc2), eps,
            -(lr / bc1), 1.0 if maximize else 0.0]


# device type -> runner(tasks, hyper, state_bits, device, codes): filled by cpu.py and cuda.py.
TASK_RUNNERS: dict[str, Callable] = {}


def run_tasks(tasks: torch.Tensor, hyper: torch.Tensor, state_bits: int, device: torch.device) -> None:
    """One fused AdamW step over the spans in tasks (int64 [ntasks, 10], host) with the
    constants hyper (float32 [k, 9], host); the spans' buffers are on `device` (CUDA: on the
    current stream). The caller has checked every address and size."""
    if tasks.shape[0] == 0:
        return
    runner = TASK_RUNNERS.get(device.type)
    if runner is None:
        raise ValueError(f"the optimizer state is on {device}; qengine's optimizers support "
                         f"{', '.join(SUPPORTED_DEVICES)} tensors; {DOCTOR_HINT}")
    runner(tasks, hyper, state_bits, device, state_codes(device) if state_bits == 8 else None)


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type not in SUPPORTED_DEVICES:
        raise ValueError(unsupported_device_message(name, t, "qengine's optimizers support"))


def cuda_side_stream(device: torch.device):
    """A stream for page copies beside the compute stream (CUDA only)."""
    return torch.cuda.Stream(device)


def cuda_free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def pinned_zeros(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)


# --------------------------------------------------------------------------- the torch op
@torch.library.custom_op("qengine::adamw_update", mutates_args=("param", "state1", "state2", "absmax1", "absmax2"))
def adamw_update(param: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                 absmax1: Optional[torch.Tensor], absmax2: Optional[torch.Tensor], lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, step: int, maximize: bool) -> None:
    """One fused AdamW step of one tensor, in place.

    param: float32/float16/bfloat16, contiguous; grad: same dtype and numel. 32-bit states:
    state1 (m), state2 (v) float32 [numel], absmax1/absmax2 None. 8-bit states: state1/state2
    uint8 codes [numel] (STATE_FORMATS: a signed minifloat code for m, an unsigned one for v),
    absmax1/absmax2 float32 [ceil(numel / 256)]. step: the step number being taken (>= 1)."""
    reject_device("param", param)


@adamw_update.register_fake
def _(param, grad, state1, state2, absmax1, absmax2, lr, beta1, beta2, eps, weight_decay, step, maximize):
    return None


def adamw_update_kernel(param, grad, state1, state2, absmax1, absmax2, lr, beta1, beta2, eps, weight_decay, step,
                        maximize) -> None:
    """adamw_update on any device with a TASK_RUNNERS entry (cpu.py and cuda.py register it):
    checks every argument, then runs the one-span task table."""
    n = param.numel()
    eight = absmax1 is not None
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"param must be float32, float16 or bfloat16, got {param.dtype}")
    check_dtype("grad", grad, param.dtype)
    for name, t in (("param", param), ("grad", grad), ("state1", state1), ("state2", state2), ("absmax1", absmax1),
                    ("absmax2", absmax2)):
        if t is not None:
            check_contiguous(name, t)
            if t.device != param.device:
                raise ValueError(f"{name} is on {t.device} but param is on {param.device}")
    check_numel("grad", grad, n)
    if (absmax2 is None) == eight:
        raise ValueError("absmax1 and absmax2 must be given together (8-bit states) or both be None (32-bit)")
    for name, t in (("state1", state1), ("state2", state2)):
        check_dtype(name, t, torch.uint8 if eight else torch.float32)
        check_numel(name, t, n)
    if eight:
        for name, t in (("absmax1", absmax1), ("absmax2", absmax2)):
            check_dtype(name, t, torch.float32)
            check_numel(name, t, -(-n // BLOCK))
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if n == 0:
        return
    tasks = torch.tensor([[param.data_ptr(), grad.data_ptr(), state1.data_ptr(), state2.data_ptr(),
                           absmax1.data_ptr() if eight else 0, absmax2.data_ptr() if eight else 0, n,
                           DTYPE_CODES[param.dtype], 0, 0]], dtype=torch.int64)
    hyper = torch.tensor([hyper_row(lr, beta1, beta2, eps, weight_decay, step, maximize)], dtype=torch.float32)
    run_tasks(tasks, hyper, 8 if eight else 32, param.device)
