# Shared benchmark helpers: timing (warm-up, median, input rotation), copy bandwidth, tables, JSON.
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

MiB = 1 << 20


@dataclass
class Stats:
    """Seconds per call over the timed repetitions."""

    median: float
    min: float
    p25: float
    p75: float
    reps: int

    def gbps(self, nbytes: int) -> float:
        return nbytes / self.median / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[..., Any], arg_sets: Sequence[tuple], reps: int = 20, warmup: int = 2,
            min_reps: int = 5, budget_s: float = 1.0, device: str | torch.device = "cpu") -> Stats:
    """Times fn(*arg_sets[i % len(arg_sets)]), rotating over the sets so that consecutive calls
    touch different memory. `warmup` untimed calls first; then up to `reps` timed calls, stopping
    early once `budget_s` seconds are spent and at least `min_reps` were taken. On CUDA each
    call is timed with events (device time), otherwise with perf_counter."""
    device = torch.device(device)
    n = len(arg_sets)
    for i in range(warmup):
        fn(*arg_sets[i % n])
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
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
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return Stats(statistics.median(times), min(times), q[0], q[2], len(times))


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), or 64 MiB when unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
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


def other_load(seconds: float = 0.5) -> float:
    """Cores kept busy by other processes (from /proc/stat) while this one sleeps; a value well
    above 0 means the machine is shared right now and timings are not trustworthy."""
    def busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait
    try:
        b0 = busy()
        time.sleep(seconds)
        return (busy() - b0) / os.sysconf("SC_CLK_TCK") / seconds
    except (OSError, ValueError):
        return float("nan")


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
        print("  ".join(c.rjust(w) if j and columns[i][2] else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
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


def write_json(path: str, results: list[dict], **extra: Any) -> None:
    """Writes {machine, **extra, results} to path (directories are created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"machine": machine_info(), **extra, "results": results}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=lambda o: asdict(o) if isinstance(o, Stats) else str(o))
    print(f"\nwrote {path}")
