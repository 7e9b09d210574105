"""Failing spill files of the paged AdamW optimizers (CPU home): a full disk, a file-size limit,
an unwritable or vanished spill directory and a failing write give SpillError naming the
directory and the problem; the training state (parameters, optimizer states, step counts) is
then exactly that of before the failed step, and once the problem is gone the next step gives
the bytes of an optimizer that never spilled. A write failing after part of a step ran (a
genuine I/O error inside reserved space) makes the optimizer refuse further use until a
checkpoint is loaded."""

from __future__ import annotations

import errno
import os
import resource
import signal

import pytest
import torch

import qengine.optim.paging as paging
from qengine.optim import PagedAdamW, PagedAdamW8bit, SpillError

CLASSES = [PagedAdamW, PagedAdamW8bit]
IDS = ["32bit", "8bit"]
SHAPES = [(3000,), (40, 50), (1000,)]  # 3072 + 2048 + 1024 elements: 6 pages of 1024
PAGE = 1024


# The torch references are many tiny ops; their thread team costs more than the work.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _budget(cls) -> int:
    return 2 * (PAGE * 8 if cls is PagedAdamW else PAGE * 2 + 8 * (PAGE // 256))  # 2 of 6 pages


def _snapshot(opt, params) -> tuple:
    sd = opt.state_dict()
    states = {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()}
    return [p.detach().clone() for p in params], states


def _assert_same(a, b) -> None:
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)), "parameters changed"
    assert sa.keys() == sb.keys(), "the set of parameters with states changed"
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"state {i}.{k} changed"


def _reference(cls, steps: int):
    """Parameters and state dict of an optimizer without a budget after `steps` steps."""
    params = _params()
    opt = cls(params, lr=1e-2, weight_decay=0.1, page_elements=PAGE)
    for s in range(steps):
        _set_grads(params, s)
        opt.step()
    return _snapshot(opt, params)


def _paged(cls, spill_dir, steps: int):
    params = _params()
    opt = cls(params, lr=1e-2, weight_decay=0.1, page_elements=PAGE, budget_bytes=_budget(cls),
              spill_dir=str(spill_dir))
    for s in range(steps):
        _set_grads(params, s)
        opt.step()
    return opt, params


def _fail_step_then_recover(cls, opt, params, done: int, fault, match: str, err: int):
    """Step `done` fails under `fault` (a context manager) with SpillError(err) matching
    `match`; the state equals that before it; then it runs again cleanly and the result equals
    the reference's after done + 1 steps."""
    before = _snapshot(opt, params)
    _set_grads(params, done)
    with fault, pytest.raises(SpillError, match=match) as info:
        opt.step()
    assert info.value.errno == err
    assert "The step was not applied" in str(info.value)
    _assert_same(_snapshot(opt, params), before)
    opt.step()  # the same gradients, problem gone
    _assert_same(_snapshot(opt, params), _reference(cls, done + 1))


class _Patched:
    """Replaces paging.os.<name> by a function raising OSError(err) from the `after`-th call on."""

    def __init__(self, monkeypatch, name: str, err: int, after: int = 0):
        self.mp, self.name, self.err, self.after, self.calls = monkeypatch, name, err, after, 0

    def __enter__(self):
        real = getattr(os, self.name)

        def fake(*args, **kwargs):
            self.calls += 1
            if self.calls > self.after:
                raise OSError(self.err, os.strerror(self.err))
            return real(*args, **kwargs)

        self.mp.setattr(paging.os, self.name, fake)
        return self

    def __exit__(self, *exc):
        self.mp.undo()
        return False


class _FileSizeLimit:
    """A real limit enforced by the kernel: RLIMIT_FSIZE makes a file growing past `limit`
    bytes fail with EFBIG (SIGXFSZ ignored meanwhile, as it would kill the process)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.handler)
        return False


# ---------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_full_disk_on_first_step_changes_nothing(cls, tmp_path, monkeypatch):
    opt, params = _paged(cls, tmp_path, 0)
    fault = _Patched(monkeypatch, "posix_fallocate", errno.ENOSPC)
    _fail_step_then_recover(cls, opt, params, 0, fault, r"could not reserve \d+ bytes for its spill file in "
                            rf"'{tmp_path}' \(No space left on device\).*not applied", errno.ENOSPC)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_file_size_limit_when_a_group_is_added_changes_nothing(cls, tmp_path):
    """Three steps fit the budget (5 of 6 pages); a new group makes the states spill, and the reservation
    meets a real kernel limit (EFBIG); the old state is kept, and a later step works."""
    params = _params()
    extra = params[2:]
    opt = cls(params[:2], lr=1e-2, weight_decay=0.1, page_elements=PAGE, budget_bytes=5 * _budget(cls) // 2,
              spill_dir=str(tmp_path))
    ref = cls(_params()[:2], lr=1e-2, weight_decay=0.1, page_elements=PAGE)
    for s in range(3):
        _set_grads(params, s)
        opt.step()
        _set_grads(ref.param_groups[0]["params"], s)
        ref.step()
    assert opt.memory_stats()["evictions"] == 0
    opt.add_param_group({"params": extra})
    ref_params = ref.param_groups[0]["params"] + _params()[2:]
    ref.add_param_group({"params": ref_params[2:]})
    before = _snapshot(opt, params)
    _set_grads(params, 3)
    with _FileSizeLimit(4096), pytest.raises(SpillError, match=rf"in '{tmp_path}' \(File too large\)") as info:
        opt.step()
    assert info.value.errno == errno.EFBIG and info.value.filename == str(tmp_path)
    _assert_same(_snapshot(opt, params), before)
    opt.step()
    _set_grads(ref_params, 3)
    ref.step()
    _assert_same(_snapshot(opt, params), _snapshot(ref, ref_params))
    assert opt.memory_stats()["evictions"] > 0


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_write_failing_before_the_first_update_changes_nothing(cls, tmp_path, monkeypatch):
    """The first write of step 3 evicts a page of step 2 before any kernel runs: nothing has
    changed, the page stays resident (its bytes are not lost) and the step can be redone."""
    opt, params = _paged(cls, tmp_path, 2)
    fault = _Patched(monkeypatch, "pwrite", errno.ENOSPC)
    _fail_step_then_recover(cls, opt, params, 2, fault, r"could not write page \d+ to its spill file in "
                            rf"'{tmp_path}' \(No space left on device\)", errno.ENOSPC)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_write_failing_mid_step_blocks_use_until_a_checkpoint_loads(cls, tmp_path, monkeypatch):
    """A write failing after part of the step ran: SpillError says the state is inconsistent,
    step() and state_dict() refuse, and load_state_dict of a checkpoint (plus the parameters
    saved with it) makes training continue exactly."""
    opt, params = _paged(cls, tmp_path, 2)
    ckpt_params, _ = _snapshot(opt, params)
    ckpt = opt.state_dict()
    _set_grads(params, 2)
    with _Patched(monkeypatch, "pwrite", errno.EIO, after=3) as fault, \
            pytest.raises(SpillError, match=r"could not write page .*Input/output error.*inconsistent"):
        opt.step()
    assert fault.calls == 4
    with pytest.raises(RuntimeError, match=r"cannot be used: a step failed after updating part"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"cannot be used"):
        opt.state_dict()
    with torch.no_grad():
        for p, saved in zip(params, ckpt_params):
            p.copy_(saved)
    opt.load_state_dict(ckpt)
    opt.step()
    _assert_same(_snapshot(opt, params), _reference(cls, 3))


# ---------------------------------------------------------------------------- directories
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_unwritable_spill_dir_changes_nothing(cls, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    opt, params = _paged(cls, spill, 0)
    spill.chmod(0o500)
    try:
        probe = spill / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:  # e.g. root: permission bits do not stop it (the vanished-directory test covers it)
            probe.unlink()
            pytest.skip("this process can write into a 0o500 directory (running as root?)")

        class Fixed:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                spill.chmod(0o700)
                return False

        _fail_step_then_recover(cls, opt, params, 0, Fixed(), rf"could not create its spill file in '{spill}' "
                                r"\(Permission denied\)", errno.EACCES)
    finally:
        spill.chmod(0o700)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_vanished_spill_dir_changes_nothing(cls, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    opt, params = _paged(cls, spill, 0)
    spill.rmdir()

    class Recreated:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            spill.mkdir()
            return False

    _fail_step_then_recover(cls, opt, params, 0, Recreated(), rf"could not create its spill file in '{spill}' "
                            r"\(No such file or directory\)", errno.ENOENT)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_load_state_dict_failing_to_spill_keeps_the_old_state(cls, tmp_path):
    """load_state_dict builds its pages in a new spill file; when that cannot be created the
    optimizer keeps its own states (its open spill file still works) and trains on."""
    spill = tmp_path / "spill"
    spill.mkdir()
    opt, params = _paged(cls, spill, 2)
    other, _ = _paged(cls, tmp_path, 1)
    before = _snapshot(opt, params)
    spill.rmdir()  # the open, already unlinked spill file lives on
    with pytest.raises(SpillError, match=rf"could not create its spill file in '{spill}'"):
        opt.load_state_dict(other.state_dict())
    _assert_same(_snapshot(opt, params), before)
    _set_grads(params, 2)
    opt.step()
    _assert_same(_snapshot(opt, params), _reference(cls, 3))
