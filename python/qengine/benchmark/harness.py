"""Benchmark helpers shared by `qengine bench` and the scripts in bench/: timing (warm-up,
median, input rotation, busy-machine detection), copy bandwidth, tables, JSON."""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["MiB", "Stats", "other_load", "measure", "llc_bytes", "rotation_count", "copy_bandwidth",
           "fresh_pages_malloc", "quiet_import_bitsandbytes", "print_table", "machine_info", "source_info",
           "write_json", "BUSY_LIMIT"]

MiB = 1 << 20


@dataclass
class Stats:
    """Seconds per call over the timed repetitions; `other`: cores kept busy by other processes
    meanwhile (from /proc/stat; > ~0.1 means the machine was shared and the timing is suspect)."""

    median: float
    min: float
    p25: float
    p75: float
    reps: int
    other: float = float("nan")

    def gbps(self, nbytes: int) -> float:
        return nbytes / self.median / 1e9


def _cpu_jiffies() -> tuple[int, int]:
    """(jiffies all CPUs spent busy, jiffies this process spent), or (0, 0) off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(own[11]) + int(own[12])  # minus idle, iowait; utime + stime
    except (OSError, ValueError, IndexError):
        return 0, 0


def _other_cores(j0: tuple[int, int], j1: tuple[int, int], seconds: float) -> float:
    if not j0[0] or seconds <= 0:
        return float("nan")
    return max(0.0, ((j1[0] - j0[0]) - (j1[1] - j0[1])) / os.sysconf("SC_CLK_TCK") / seconds)


def other_load(seconds: float = 0.5) -> float:
    """Cores kept busy by other processes while this one sleeps for `seconds`."""
    j0 = _cpu_jiffies()
    time.sleep(seconds)
    return _other_cores(j0, _cpu_jiffies(), seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Re-measurement on a shared machine: a timing taken while other processes kept more than
# BUSY_LIMIT cores busy is retried (after a pause), within a retry time budget for the process.
BUSY_LIMIT = 0.1
retry_budget_s = 45.0


def measure(fn: Callable[..., Any], arg_sets: Sequence[tuple], reps: int = 20, warmup: int = 2,
            min_reps: int = 5, budget_s: float = 1.0, device: str | torch.device = "cpu",
            retries: int = 2) -> Stats:
    """Times fn(*arg_sets[i % len(arg_sets)]), rotating over the sets so that consecutive calls
    touch different memory: `warmup` untimed calls, then up to `reps` timed ones, stopping once
    `budget_s` seconds are spent and at least `min_reps` were taken. On CUDA each call is timed
    with events, else with perf_counter. If other processes were busy meanwhile, retries up to
    `retries` times (within the process's retry budget) and keeps the quietest attempt.
    (Two functions are not interleaved call by call: OpenMP workers of one, e.g. bitsandbytes',
    keep spinning after a call and would slow the other's threads on a small machine.)"""
    global retry_budget_s
    best = None
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        st = _measure_once(fn, arg_sets, reps, warmup, min_reps, budget_s, torch.device(device))
        if best is None or st.other < best.other:
            best = st
        if not best.other > BUSY_LIMIT or attempt == retries or retry_budget_s <= 0:
            break
        time.sleep(1.0)
        retry_budget_s -= time.perf_counter() - t0 + 1.0
    return best


def _measure_once(fn, arg_sets, reps, warmup, min_reps, budget_s, device) -> Stats:
    n = len(arg_sets)
    for i in range(warmup):
        fn(*arg_sets[i % n])
    _sync(device)
    times: list[float] = []
    j0, start = _cpu_jiffies(), time.perf_counter()
    for r in range(reps):
        args = arg_sets[(warmup + r) % n]
        if device.type == "cuda":
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
            fn(*args)
            ev1.record()
            ev1.synchronize()
            times.append(ev0.elapsed_time(ev1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        if r + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    other = _other_cores(j0, _cpu_jiffies(), time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return Stats(statistics.median(times), min(times), q[0], q[2], len(times), other)


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), or 64 MiB when unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    names = os.listdir(base) if os.path.isdir(base) else []
    for idx in (n for n in names if n.startswith("index")):
        try:
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
        except (OSError, ValueError, IndexError):
            continue
    return best or 64 * MiB


def rotation_count(bytes_per_set: int, minimum: int = 3, maximum: int = 32) -> int:
    """How many input sets to rotate over so that together they are >= 2x the last-level cache."""
    return max(minimum, min(maximum, math.ceil(2 * llc_bytes() / max(bytes_per_set, 1))))


def copy_bandwidth(nbytes: int = 256 * MiB, reps: int = 10, device: str | torch.device = "cpu") -> float:
    """Memory copy bandwidth in GB/s (bytes read + written) of dst.copy_(src) on float32 buffers."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.zeros_like(src)
    st = measure(lambda: dst.copy_(src), [()], reps=reps, warmup=2, min_reps=reps, budget_s=0, device=device)
    return st.gbps(2 * nbytes)


def fresh_pages_malloc(nbytes: int = 4 * MiB) -> bool:
    """Makes glibc serve every allocation >= nbytes with fresh mmap pages, faulted in on first
    touch (by default it does so only above a threshold that moves with the allocation history,
    and may also reuse freed heap space), so that the page-fault cost inside allocating calls
    does not depend on what ran before. False where this is not glibc."""
    try:
        import ctypes

        return ctypes.CDLL(None).mallopt(-3, nbytes) == 1  # M_MMAP_THRESHOLD (also stops the adaptation)
    except (OSError, AttributeError):
        return False


def quiet_import_bitsandbytes():
    """(bitsandbytes module or None, reason); its import-time warnings and log lines are muted."""
    for name in ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
            import bitsandbytes.functional  # noqa: F401
        return bitsandbytes, ""
    except Exception as e:  # any failure just means no reference
        return None, f"{type(e).__name__}: {e}"


def print_table(rows: list[dict], columns: Sequence[tuple[str, str, str]], title: str = "") -> None:
    """columns: (key, header, format spec); missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    if title:
        print(f"\n{title}")
    for j, line in enumerate(cells):
        right = [bool(j and spec) for _, _, spec in columns]  # numbers right-aligned, labels left
        print("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(line, widths, right)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "llc_bytes": llc_bytes(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import qengine

        info["qengine"] = qengine.build_info()
    except Exception as e:
        info["qengine"] = f"unavailable: {e}"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def source_info() -> dict:
    """git commit of the checkout holding these benchmarks and whether it had local changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def write_json(path: str, results: list[dict], **extra: Any) -> None:
    """Writes {machine, **extra, results} to path (directories are created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"machine": machine_info(), "source": source_info(), **extra, "results": results}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=lambda o: asdict(o) if isinstance(o, Stats) else str(o))
    print(f"\nwrote {path}")
