"""`qengine doctor` / `qengine.doctor()`: every kernel family, in every format, on every device
present (each CPU ISA this CPU supports, each visible CUDA GPU) against the portable scalar CPU
kernels, run first as the reference; a table of the results and a non-zero exit on a mismatch.

    >>> result = qengine.doctor()          # silent; qengine.doctor(verbose=True) prints the table
    >>> result.ok, [r for r in result if not r.ok]

Bytes must be equal for quantize, dequantize, fake quantization, the 2:4 layout's quantize and
dequantize and the optimizer steps; the products (matmul family, MoE experts) agree within the
tolerance stated in doctor_checks.TOL. A kernel that raises is a FAIL row with its message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch

from . import _C
from .ops import cuda_available
from ._version import __version__
from .doctor_checks import FORMATS, KERNEL_NOTES, TOL, TOLERANCE_NOTE, Check, Inputs, Outcome, all_checks
from .functional import quantize

__all__ = ["doctor", "DoctorResult", "Row", "add_doctor_args", "cmd_doctor"]

REFERENCE = "cpu:scalar"
_SHOWN_PROBLEMS = 3  # per row; the count of the others follows


@dataclass
class Row:
    """One check on one device. result: "ref" (the reference device ran it), "ok" (equal to the
    reference), "FAIL" (a mismatch, or the kernel raised: see detail) or "skipped"."""
    device: str
    kernel: str
    format: str
    result: str
    seconds: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result != "FAIL"


class DoctorResult(list):
    """The rows of a doctor run (a list of Row), with `.ok` (no FAIL row), `.failures`,
    `.seconds`, `.header` (the machine and the comparison rules) and `.table()`."""

    def __init__(self, rows: Iterable[Row] = (), header: Iterable[str] = (), seconds: float = 0.0):
        super().__init__(rows)
        self.header = list(header)
        self.seconds = seconds

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self if not r.ok]

    def __repr__(self) -> str:
        return f"DoctorResult({len(self)} rows, ok={self.ok}, {len(self.failures)} failed, {self.seconds:.1f} s)"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "seconds": self.seconds, "header": self.header,
                "tolerance": {str(d).replace("torch.", ""): t for d, t in TOL.items()},
                "rows": [{**asdict(r), "ok": r.ok} for r in self]}

    def table(self, per_format: bool = False) -> str:
        """The report: one line per (device, kernel) with its formats, or per (device, kernel,
        format) when per_format; then each failure's detail and a summary line."""
        lines = list(self.header)
        lines.append(f"{'device':<16} {'kernel':<20} {'formats':<44} {'result':<6} {'time':>9}")
        lines.append(f"{'-' * 16} {'-' * 20} {'-' * 44} {'-' * 6} {'-' * 9}")
        for device, kernel, rows in _groups(self, per_format):
            if rows[0].kernel == "-":  # a device that could not be checked
                lines.append(f"{device}: {rows[0].detail} ({'skipped' if rows[0].ok else 'FAIL'})")
                continue
            bad = [r for r in rows if not r.ok]
            result = "FAIL" if bad else rows[0].result
            formats = " ".join(r.format + ("!" if not r.ok else "") for r in rows)
            ms = 1e3 * sum(r.seconds for r in rows)
            lines.append(f"{device:<16} {kernel:<20} {formats:<44} {result:<6} {ms:>6.1f} ms")
        if self.failures:
            lines.append("")
            lines.append("failures (! above):")
            lines += [f"  {r.device} {r.kernel} {r.format}: {r.detail}" for r in self.failures]
        checked = [r for r in self if r.result != "skipped"]
        devices = len({r.device for r in checked})
        verdict = "PASS" if self.ok else f"FAIL: {len(self.failures)} of {len(checked)} checks failed"
        lines.append(f"{verdict} ({len(checked)} checks on {devices} devices, {self.seconds:.1f} s)")
        return "\n".join(lines)


def _groups(rows, per_format):
    order: dict[tuple, list[Row]] = {}
    for r in rows:
        key = (r.device, r.kernel, r.format) if per_format else (r.device, r.kernel)
        order.setdefault(key, []).append(r)
    return [(key[0], key[1], group) for key, group in order.items()]


# ---------------------------------------------------------------------------- comparisons
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype == torch.bool else flat.view(_INT_OF_SIZE[flat.element_size()])


def _same_kind(name, have, want) -> Optional[str]:
    if have is None:
        return f"{name}: missing"
    if have.dtype != want.dtype or have.shape != want.shape:
        return f"{name}: {have.dtype} {tuple(have.shape)} instead of {want.dtype} {tuple(want.shape)}"
    return None


def _bytes_problem(name, have, want) -> Optional[str]:
    problem = _same_kind(name, have, want)
    if problem or torch.equal(_bits(have), _bits(want)):
        return problem
    bad = (_bits(have) != _bits(want)).nonzero().reshape(-1)
    i = int(bad[0])
    return (f"{name}: {bad.numel()} of {want.numel()} elements differ, first at {i} "
            f"({have.reshape(-1)[i].item()!r} instead of {want.reshape(-1)[i].item()!r})")


def _bound_problem(name, have, want, mag, tol) -> Optional[str]:
    problem = _same_kind(name, have, want.to(have.dtype))
    if problem:
        return problem
    err = (have.to(torch.float64) - want.to(torch.float64)).abs()
    limit = tol * mag.reshape(err.shape) + 1e-30
    bad = (~(err <= limit)).reshape(-1).nonzero().reshape(-1)  # NaN counts as beyond
    if not bad.numel():
        return None
    i = int(bad[0])
    return (f"{name}: {bad.numel()} of {err.numel()} beyond tol {tol:g}, first at {i}: "
            f"{have.reshape(-1)[i].item():.6g} instead of {want.reshape(-1)[i].item():.6g} "
            f"(|diff| {err.reshape(-1)[i].item():.3g} > {limit.reshape(-1)[i].item():.3g})")


def _norm_problem(name, have, want) -> Optional[str]:
    problem = _same_kind(name, have, want)
    if problem:
        return problem
    tol = TOL.get(want.dtype, TOL[torch.float32])
    diff = (have.to(torch.float64) - want.to(torch.float64)).norm()
    rel = float(diff / want.to(torch.float64).norm().clamp(min=1e-300))
    return None if rel <= tol else f"{name}: relative error {rel:.3g} > tol {tol:g}"


def _compare(got: Outcome, ref: Outcome) -> list[str]:
    problems = [_bytes_problem(n, got.exact.get(n), t) for n, t in ref.exact.items()]
    for n, (want, mag) in ref.bound.items():
        have = got.bound.get(n, (None,))[0]
        problems.append(_bound_problem(n, have, want, mag, TOL.get(want.dtype, TOL[torch.float32]))
                        if have is not None else f"{n}: missing")
    problems += [_norm_problem(n, got.norm.get(n), t) for n, t in ref.norm.items()]
    return [p for p in problems if p]


def _ideal_problems(ref: Outcome) -> list[str]:
    """The reference device's products against their float64 values (same tolerance)."""
    return [p for p in (_bound_problem(n, ref.bound[n][0], ideal, ref.bound[n][1], TOL.get(ref.bound[n][0].dtype,
                                                                                           TOL[torch.float32]))
                        for n, ideal in ref.ideal.items()) if p]


def _summary(problems: list[str]) -> str:
    more = len(problems) - _SHOWN_PROBLEMS
    return "; ".join(problems[:_SHOWN_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------- running
def _run(check: Check, dev: torch.device) -> tuple[Optional[Outcome], float, str]:
    out = Outcome()
    start = time.perf_counter()
    try:
        check.run(dev, out)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as e:  # a kernel that raises is a FAIL row, not the end of the doctor
        message = " ".join(str(e).split())  # one line in the table
        return None, time.perf_counter() - start, f"raised {type(e).__name__}: {message[:400]}"
    return out, time.perf_counter() - start, ""


def _warm_up() -> None:
    """The first torch.library op call of a process sets up torch's op machinery (seconds): done
    here, outside the timed rows. A failure shows in the rows themselves."""
    try:
        quantize(torch.ones(64), "nf4", 64).dequantize()
    except Exception:
        pass


def _check_device(label: str, dev: torch.device, checks: list[Check], refs: dict, rows: list[Row]) -> None:
    for check in checks:
        out, seconds, error = _run(check, dev)
        if label == REFERENCE:
            refs[check] = out
            problems = [error] if error else _ideal_problems(out)
            result = "FAIL" if problems else "ref"
        elif error:
            problems, result = [error], "FAIL"
        elif refs.get(check) is None:
            problems, result = [f"no reference: the {REFERENCE} run of this check failed"], "FAIL"
        else:
            problems = _compare(out, refs[check])
            result = "FAIL" if problems else "ok"
        rows.append(Row(label, check.kernel, check.format, result, seconds, _summary(problems)))


def _cuda_unusable() -> Optional[Row]:
    """The one row that stands for CUDA when no GPU can be checked, or None when one can."""
    if cuda_available():
        return None
    if not torch.cuda.is_available():
        return Row("cuda", "-", "-", "skipped", 0.0, "no GPU visible")
    if not _C.cuda_compiled:
        return Row("cuda", "-", "-", "skipped", 0.0, "a GPU is visible to torch, but this qengine build has no CUDA "
                   "kernels (build with QENGINE_CUDA=ON)")
    return Row("cuda", "-", "-", "FAIL", 0.0, "a GPU is visible to torch but not to qengine's CUDA runtime (is the "
               "driver older than the CUDA this build was compiled with?)")


def _select(checks: list[Check], kernels, formats) -> list[Check]:
    known_kernels = list(dict.fromkeys(c.kernel for c in checks))
    for name, asked, known in (("kernel", kernels, known_kernels), ("format", formats, list(FORMATS))):
        unknown = [a for a in (asked or ()) if a not in known]
        if unknown:
            raise ValueError(f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [c for c in checks if (kernels is None or c.kernel in kernels)
            and (formats is None or c.format in formats or c.format not in FORMATS)]


def _header(isas: list[str]) -> list[str]:
    in_use = _C.cpu_isa()
    gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] \
        if cuda_available() else []
    return [f"qengine doctor: qengine {__version__}, torch {torch.__version__}, {_C.num_threads()} threads; "
            f"CPU ISAs checked: {', '.join(isas)} (in use: {in_use}); "
            f"CUDA kernels {'compiled' if _C.cuda_compiled else 'not compiled'}"
            + (f"; {', '.join(gpus)}" if gpus else ""),
            f"reference: {REFERENCE} (run first); bytes equal (torch.equal) for quantize, dequantize, fake_quantize, "
            "sparse24 quantize/dequantize, adamw/adamw8bit",
            f"tolerance: {TOLERANCE_NOTE}"]


def doctor(verbose: bool = False, *, kernels: Optional[Iterable[str]] = None,
           formats: Optional[Iterable[str]] = None, isas: Optional[Iterable[str]] = None,
           per_format: bool = False) -> DoctorResult:
    """Runs every kernel family on small fixed inputs on every device present and compares each
    with the scalar CPU kernels (see the module docstring); restores the CPU ISA in use.

    Args:
        verbose: print the table (one line per device and kernel; per format with per_format).
        kernels, formats: run only these (names as in the table); the optimizer checks have
            no format and run unless `kernels` leaves them out.
        isas: compare only these CPU ISAs (the scalar reference always runs).
    Returns: DoctorResult, a list of Row with `.ok` False when any check failed.
    """
    start = time.perf_counter()
    kernels = None if kernels is None else list(kernels)
    formats = None if formats is None else list(formats)
    checks = _select(all_checks(Inputs()), kernels, formats)
    supported = _C.supported_isas().split(",")
    wanted = supported if isas is None else list(isas)
    unknown = [i for i in wanted if i not in supported]
    if unknown:
        raise ValueError(f"CPU ISA(s) {', '.join(unknown)} not supported here; supported: {', '.join(supported)}")
    order = ["scalar"] + [i for i in supported if i != "scalar" and i in wanted]
    header = _header(order)
    rows: list[Row] = []
    refs: dict = {}
    original, torch_threads = _C.cpu_isa(), torch.get_num_threads()
    # The inputs are tiny: torch's own thread team would cost more than its work, and its idle
    # workers spin beside qengine's kernels (seconds on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        _warm_up()
        for isa in order:
            _C.set_isa(isa)
            _check_device(f"cpu:{isa}", torch.device("cpu"), checks, refs, rows)
    finally:
        _C.set_isa(original)
        torch.set_num_threads(torch_threads)
    unusable = _cuda_unusable()
    if unusable is not None:
        rows.append(unusable)
    else:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 products in float32, as on the CPU
        try:
            for i in range(torch.cuda.device_count()):
                _check_device(f"cuda:{i}", torch.device("cuda", i), checks, refs, rows)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    result = DoctorResult(rows, header, time.perf_counter() - start)
    if verbose:
        print(result.table(per_format))
    return result


# ---------------------------------------------------------------------------- the command
def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def add_doctor_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Runs every kernel family in every format on every device present (each CPU ISA, each "
                     "visible CUDA GPU) against the scalar CPU kernels. Exit status 0: all checks passed; "
                     "1: a mismatch or a kernel that raised (see the FAIL rows).")
    p.add_argument("--all", action="store_true", help="one line per format instead of one per kernel")
    p.add_argument("--kernels", type=_names, help=f"comma-separated subset of: {', '.join(KERNEL_NOTES)}")
    p.add_argument("--formats", type=_names, help=f"comma-separated subset of: {', '.join(FORMATS)}")
    p.add_argument("--isas", type=_names, help="comma-separated CPU ISAs to compare (scalar always runs)")
    p.add_argument("--json", metavar="FILE", help="also write every row to this JSON file")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    result = doctor(kernels=args.kernels, formats=args.formats, isas=args.isas)
    print(result.table(per_format=args.all))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=1)
    sys.stdout.flush()
    return 0 if result.ok else 1
