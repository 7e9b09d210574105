"""PagedAdamW (float32 states) and PagedAdamW8bit (blockwise 8-bit states): torch.optim.AdamW's
constructor and semantics, one fused native update per parameter span, states in pages with a
resident byte budget (paging.py)."""

from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

from ..ops import DTYPE_CODES
from ..ops import optim as optim_ops
from . import checkpoint
from .groups import check_group
from .paging import PageManager, PagesBusy, SpillError

__all__ = ["PagedAdamW", "PagedAdamW8bit"]

DEFAULT_PAGE_ELEMENTS = 1 << 20
# CUDA without an explicit budget: this fraction of the device memory free at the first step.
CUDA_DEFAULT_BUDGET_FRACTION = 0.5
_NOT_APPLIED = "The step was not applied: parameters, optimizer states and step counts are unchanged"


class _PagedAdamBase(torch.optim.Optimizer):
    STATE_BITS = 32

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, page_elements: int = DEFAULT_PAGE_ELEMENTS,
                 budget_bytes: int | None = None, spill_dir: str | None = None):
        if isinstance(page_elements, bool) or not isinstance(page_elements, int) or page_elements < optim_ops.BLOCK \
                or page_elements % optim_ops.BLOCK:
            raise ValueError(f"page_elements must be a positive multiple of {optim_ops.BLOCK}, got {page_elements!r}")
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)):
            raise TypeError(f"budget_bytes must be an int or None, got {type(budget_bytes).__name__}")
        page_bytes = page_elements * (8 if self.STATE_BITS == 32 else 2) + (0 if self.STATE_BITS == 32 else
                                                                            8 * (page_elements // optim_ops.BLOCK))
        if budget_bytes is not None and budget_bytes < page_bytes:
            raise ValueError(f"budget_bytes ({budget_bytes}) must hold at least one page ({page_bytes} bytes); "
                             "lower page_elements or raise the budget")
        if spill_dir is not None and not os.path.isdir(spill_dir):
            raise ValueError(f"spill_dir {spill_dir!r} is not an existing directory")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        check_group({**defaults, "foreach": foreach, "capturable": capturable, "differentiable": differentiable,
                     "fused": fused})
        self._page_elements = page_elements
        self._budget_bytes = budget_bytes
        self._spill_dir = spill_dir
        self._mgr: PageManager | None = None
        self._region: dict[torch.Tensor, int] = {}
        # What each region was reserved for, by id(parameter) (param_groups keeps the parameters
        # alive): its (shape, dtype) then. Checked against the parameter at every step (a
        # `p.data = ...` of another size would otherwise make the kernel read and write past the
        # region, into other regions or past the page buffer).
        self._meta: dict[int, tuple[torch.Size, torch.dtype]] = {}
        self._steps: dict[torch.Tensor, int] = {}
        self._broken: str | None = None  # why the state is inconsistent (a step failed half-way)
        # The last step's task table without its parameter/gradient addresses, reused while the
        # same parameters step over the same (unbudgeted, so unmoving) pages: see _run.
        self._task_cache: tuple | None = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ params
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group)
            for p in group["params"]:
                self._check_param(p)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if self._mgr is None:
                self._mgr = self._new_manager(p.device)
            self._region[p] = self._mgr.add_region(p.numel())
            self._meta[id(p)] = (p.shape, p.dtype)

    def _check_param(self, p: torch.Tensor, name: str | None = None) -> None:
        who = "parameters" if name is None else f"parameter {name}"
        if p.dtype not in optim_ops.PARAM_DTYPES:
            raise TypeError(f"{who} must be float32, float16 or bfloat16, got {p.dtype}")
        optim_ops.check_device("parameter" if name is None else f"parameter {name}", p)
        if self._mgr is not None and p.device != self._mgr.device:
            raise ValueError(f"all parameters of one optimizer must be on one device: {p.device} and {self._mgr.device}"
                             + ("" if name is None else f" ({name})"))
        if not p.is_contiguous():
            raise ValueError(f"{who} must be contiguous (the update is written in place)")

    def _new_manager(self, device: torch.device) -> PageManager:
        budget = self._budget_bytes
        if budget is None and device.type == "cuda":
            budget = int(CUDA_DEFAULT_BUDGET_FRACTION * optim_ops.cuda_free_bytes(device))
        return PageManager(self.STATE_BITS, device, self._page_elements, budget, self._spill_dir)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, hyper_rows, hyper_index, fresh = [], [], {}, []
        for gi, group in enumerate(self.param_groups):
            lr, b1, b2, eps, wd, maximize = check_group(group)
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = self._checked_grad(p, gi, pi, fresh)
                step = self._steps.get(p, 0) + 1
                key = (lr, b1, b2, eps, wd, step, maximize)  # one row per distinct set of constants
                h = hyper_index.get(key)
                if h is None:
                    h = hyper_index[key] = len(hyper_rows)
                    hyper_rows.append(optim_ops.hyper_row(lr, b1, b2, eps, wd, step, maximize))
                work.append((p, g, h, step))
        if not work:
            return loss
        self._check_usable()
        for p in fresh:  # every check passed: stateless parameters whose storage changed get a new region
            self._remake_region(p)
        try:
            self._mgr.prepare_spill()  # disk trouble shows here, before anything changes
        except SpillError as e:
            raise SpillError(e.errno, f"{e.strerror}. {_NOT_APPLIED}", e.filename) from e
        before = dict(self._steps)
        for p, _, _, step in work:  # counted only once every argument is known good
            self._steps[p] = step
        hyper = torch.tensor(hyper_rows, dtype=torch.float32)
        self._updated = False
        try:
            self._run(sorted(work, key=lambda w: self._region[w[0]]), hyper)
        except BaseException as e:
            self._mgr.release_all()
            if not self._updated:  # failed before the first kernel ran: nothing changed
                self._steps = before
                if isinstance(e, SpillError):
                    raise SpillError(e.errno, f"{e.strerror}. {_NOT_APPLIED}", e.filename) from e
                raise
            self._broken = (f"a step failed after updating part of the parameters ({type(e).__name__}: {e}); "
                            "parameters and optimizer states are inconsistent: restore both from a checkpoint "
                            "(load_state_dict makes this optimizer usable again)")
            if isinstance(e, SpillError):
                raise SpillError(e.errno, f"{e.strerror}. {self._broken}", e.filename) from e
            raise
        return loss

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"{type(self).__name__} cannot be used: {self._broken}")

    def _checked_grad(self, p: torch.Tensor, gi: int, pi: int, fresh: list) -> torch.Tensor:
        """p's gradient, contiguous, after the checks of every step (parameter against the
        (shape, dtype) its state region was reserved for, device, layout; gradient against the
        parameter). Runs once per tensor per step, so each property is read once: for an
        adapter's hundreds of small tensors this loop is most of the Python time. A parameter
        without state yet whose storage changed (e.g. model.half() before the first step) is
        appended to `fresh`: it gets a new region once the whole step is checked."""
        g = p.grad
        dtype, device, shape = p.dtype, p.device, p.shape
        meta = self._meta.get(id(p))  # (by id: a tensor's __hash__ is Python code, twice the cost)
        if meta is None or shape != meta[0] or dtype != meta[1]:
            self._changed(p, gi, pi, fresh)
        if g.layout != torch.strided:
            raise ValueError(f"{_name(gi, pi)}: qengine's paged AdamW does not support sparse gradients")
        if g.dtype != dtype:
            raise TypeError(f"{_name(gi, pi)}: gradient dtype {g.dtype} differs from its parameter's {dtype}")
        if g.device != device or g.shape != shape:
            raise ValueError(f"{_name(gi, pi)}: gradient ({tuple(g.shape)} on {g.device}) does not match its "
                             f"parameter ({tuple(shape)} on {device})")
        if dtype not in optim_ops.PARAM_DTYPES or device != self._mgr.device or not p.is_contiguous():
            self._check_param(p, _name(gi, pi))  # raises the precise error
        return g.contiguous()

    def _changed(self, p: torch.Tensor, gi: int, pi: int, fresh: list) -> None:
        """p differs from what its region was reserved for: refused when it has state, else
        appended to `fresh`."""
        if id(p) not in self._meta:
            raise ValueError(f"{_name(gi, pi)} has no optimizer state region: it was put into param_groups by "
                             "hand; add parameters with add_param_group")
        if p not in self._steps:
            fresh.append(p)
            return
        shape, dtype = self._meta[id(p)]
        raise ValueError(
            f"{_name(gi, pi)} is now {tuple(p.shape)} {p.dtype} but its optimizer state was made for "
            f"{tuple(shape)} {dtype} (its storage was replaced, e.g. by `p.data = ...`); as torch.optim.AdamW, "
            "the state of a resized parameter cannot be reused: build a new optimizer, or load_state_dict a state "
            f"saved for the new shape. {_NOT_APPLIED}")

    def _remake_region(self, p: torch.Tensor) -> None:
        """A parameter with no state yet now has another shape or dtype: its region follows it
        (a new one at the end of the element space when its size changed)."""
        if p.numel() != self._meta[id(p)][0].numel():
            self._region[p] = self._mgr.add_region(p.numel())
        self._meta[id(p)] = (p.shape, p.dtype)

    def _run(self, work: list, hyper: torch.Tensor) -> None:
        mgr = self._mgr
        # Without a budget no page moves once created, so a step over the same parameters has
        # the same spans and state addresses as the last one: only the parameter and gradient
        # addresses (gradients are new tensors every backward) and constants rows change.
        # Building the table span by span costs ~8 us per tensor, the kernel of a LoRA adapter
        # matrix a few.
        key = tuple((id(p), p.dtype, p.numel()) for p, _, _, _ in work) if mgr.budget_bytes is None else None
        cache = self._task_cache
        if key is not None and cache is not None and cache[0] is mgr and cache[1] == mgr.layout_version \
                and cache[2] == key:
            self._updated = True
            optim_ops.run_tasks(self._with_addresses(cache[3], cache[4], work), hyper, self.STATE_BITS, mgr.device)
            return
        tasks: list[list[int]] = []
        items: list[int] = []  # the work item of each task row
        flushed = 0

        def flush():
            nonlocal flushed
            static = torch.tensor(tasks, dtype=torch.int64).reshape(-1, optim_ops.TASK_FIELDS)
            item_index = torch.tensor(items, dtype=torch.int64)
            self._updated = True
            optim_ops.run_tasks(self._with_addresses(static, item_index, work), hyper, self.STATE_BITS, mgr.device)
            flushed += 1
            mgr.release_all()
            tasks.clear()
            items.clear()
            return static, item_index

        for item, (p, g, h, _) in enumerate(work):
            esize = p.element_size()
            code = DTYPE_CODES[p.dtype]
            for span in mgr.spans(self._region[p], p.numel()):
                try:
                    buf = mgr.acquire(span.page)
                except PagesBusy:  # the budget is full of this batch's pages: update them, then go on
                    flush()
                    buf = mgr.acquire(span.page)
                s1, s2, a1, a2 = mgr.addresses(buf, span.first)
                off = span.offset * esize
                tasks.append([off, off, s1, s2, a1, a2, span.count, code, 0, 0])
                items.append(item)
        static, item_index = flush()
        self._task_cache = (mgr, mgr.layout_version, key, static, item_index) if key is not None and flushed == 1 \
            else None

    @staticmethod
    def _with_addresses(static: torch.Tensor, item: torch.Tensor, work: list) -> torch.Tensor:
        """Task rows from rows holding byte offsets in columns 0 and 1 (and anything in column
        8): the offsets plus each row's work item's parameter and gradient addresses, and its
        constants row."""
        rows = static.clone()
        rows[:, 0] += torch.tensor([p.data_ptr() for p, _, _, _ in work], dtype=torch.int64)[item]
        rows[:, 1] += torch.tensor([g.data_ptr() for _, g, _, _ in work], dtype=torch.int64)[item]
        rows[:, 8] = torch.tensor([h for _, _, h, _ in work], dtype=torch.int64)[item]
        return rows

    # ------------------------------------------------------------------ memory
    def state_bytes(self) -> int:
        """Bytes of optimizer state held (every page that exists, resident or spilled)."""
        return self._mgr.total_bytes if self._mgr is not None else 0

    def memory_stats(self) -> dict:
        """Resident and peak resident state bytes, the budget, pages loaded back and evicted."""
        m = self._mgr
        if m is None:
            return {"state_bytes": 0, "resident_bytes": 0, "peak_resident_bytes": 0, "budget_bytes": self._budget_bytes,
                    "page_bytes": 0, "loads": 0, "evictions": 0}
        return {"state_bytes": m.total_bytes, "resident_bytes": m.resident_bytes,
                "peak_resident_bytes": m.peak_resident_bytes, "budget_bytes": m.budget_bytes,
                "page_bytes": m.page_bytes, "loads": m.loads, "evictions": m.evictions}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's optimizer layout: {"state": {index: {...}}, "param_groups": [...]}. 32-bit:
        step, exp_avg, exp_avg_sq (as torch.optim.AdamW's); 8-bit: step, state1, state2 (uint8
        codes), absmax1, absmax2 (float32 per 256 elements)."""
        self._check_usable()
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of this optimizer kind (32-bit also accepts torch.optim.AdamW's);
        anything else raises ValueError naming what does not fit. Nothing changes on error."""
        checkpoint.load_state_dict(self, state_dict)

    def __getstate__(self):
        # The states live in pages (and maybe a spill file) that pickling would silently drop.
        raise TypeError(f"{type(self).__name__} cannot be pickled or deep-copied; save and load its state_dict()")

    def __del__(self):
        if getattr(self, "_mgr", None) is not None:
            self._mgr.close()


def _name(gi: int, pi: int) -> str:
    return f"param_groups[{gi}]['params'][{pi}]"


class PagedAdamW(_PagedAdamBase):
    """torch.optim.AdamW with float32 states in pages (8 bytes per parameter), updated by one
    fused native kernel per step.

    Same arguments and semantics as torch.optim.AdamW (param groups, lr read from each group
    at every step so schedulers work, betas, eps, weight_decay, maximize); amsgrad and the
    implementation switches (foreach, fused, capturable, differentiable) accept only their
    defaults. Parameters: float32, float16 or bfloat16, contiguous, all on one device (CPU, or
    CUDA when built with it); the maths is float32 whatever their dtype (half-precision
    parameters are rounded once per step). Extra arguments:

    page_elements: elements per state page (a multiple of 256).
    budget_bytes: the most state bytes held resident; cold pages go to a temporary file in
        spill_dir (CPU) or to pinned host memory (CUDA). None: no limit on the CPU, half the
        free device memory on CUDA.
    """

    STATE_BITS = 32


class PagedAdamW8bit(_PagedAdamBase):
    """PagedAdamW with 8-bit states (about 2.03 bytes per parameter): m as codes of a signed
    dynamic code and v of an unsigned one (two-piece minifloats: 1/32-binade steps near the
    block's max, 1/8-binade steps below, down to 2**-10 of it for m and 2**-20 for v; see
    formats.STATE8_SIGNED_FORM), each scaled by its block's absmax over 256 elements,
    dequantized, updated in float32 and requantized (nearest code) inside the same kernel pass.

    Non-finite gradients: a NaN (or Inf) in one element's gradient makes that element's
    parameter NaN at that step, as in torch.optim.AdamW, but it also becomes the absmax of its
    states' block, so from the next step on every element of that block (256 consecutive
    elements of the parameter, flattened) decodes NaN states and its parameter becomes NaN too.
    The kernels do not check gradients (a check is one more pass over them every step): skip
    such steps before calling step(), e.g. with torch.amp.GradScaler, or
    torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=True)."""

    STATE_BITS = 8
