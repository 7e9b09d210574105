"""qengine: a quantization engine for PyTorch with native CPU and CUDA kernels.

    >>> import torch, qengine
    >>> w = torch.randn(4096, 4096)
    >>> q = qengine.quantize(w, "nf4", blocksize=64, double_quant=True)
    >>> q.bits_per_param    # 4.127
    >>> w_hat = q.dequantize()
"""

from __future__ import annotations

from ._version import __version__, check_torch

check_torch()  # a clear ImportError for a missing or unsupported torch, before anything uses it

from . import _C  # noqa: E402
from . import optim  # noqa: F401,E402  (qengine.optim.PagedAdamW, PagedAdamW8bit)
from .ops import cuda_available
from .formats import Format, available_formats, codebook, get_format, register_format
from .functional import dequantize, fit_codebook, matmul, quantize
from .prune import collect_input_norms, prune
from . import qat  # noqa: E402  (qengine.qat.prepare / FakeQuantLinear / fake_quantize)
from .tensor import QuantizedTensor
from . import nn
from .model import (add_lora, adapter_state_dict, load_adapter, load_adapter_state_dict, lora_parameters,
                    mark_only_lora_trainable, memory_report, quantize_model, save_adapter)
from .calibrate.plan import Plan, plan  # noqa: E402  (per-layer settings under a bits-per-parameter budget)

from .doctor import doctor  # noqa: E402  (qengine.doctor(): every kernel on every device vs scalar)

# transformers integration: registered once transformers loads (transformers is not imported here).
from . import _hf_hook  # noqa: E402
_hf_hook.install()

__all__ = [
    "Format",
    "QuantizedTensor",
    "available_formats",
    "build_info",
    "codebook",
    "collect_input_norms",
    "cuda_available",
    "dequantize",
    "doctor",
    "fit_codebook",
    "get_format",
    "matmul",
    "prune",
    "quantize",
    "register_format",
    "set_cpu_isa",
    "set_num_threads",
    # modules and whole-model helpers
    "nn",
    "add_lora",
    "adapter_state_dict",
    "load_adapter",
    "load_adapter_state_dict",
    "lora_parameters",
    "mark_only_lora_trainable",
    "memory_report",
    "quantize_model",
    "plan",
    "Plan",
    "save_adapter",
]


def build_info() -> dict:
    """What this build and machine provide: CPU ISA in use, CUDA compiled / usable, threads."""
    return {
        "version": __version__,
        "cpu_isa": _C.cpu_isa(),
        "supported_cpu_isas": _C.supported_isas().split(","),
        "num_threads": _C.num_threads(),
        "cuda_compiled": bool(_C.cuda_compiled),
        "cuda_available": cuda_available(),
    }


def set_cpu_isa(name: str) -> None:
    """Selects the CPU kernel variant ('scalar', 'avx2', 'avx512', 'avx512_bf16', 'amx'); for tests and benchmarks."""
    _C.set_isa(name)


# The most kernel threads accepted: each is an OS thread of the native pool, started on first
# use; 4096 is above the hardware threads of the largest single machines (x86 servers top out
# near 2,000), so a larger value is a typo or an overflowed computation, not a machine.
MAX_NUM_THREADS = 4096


def set_num_threads(n: int) -> None:
    """Threads used by the native CPU kernels (default: all cores, or QENGINE_NUM_THREADS):
    an int from 1 to MAX_NUM_THREADS (4096); anything else raises (TypeError / ValueError)."""
    import operator

    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}") from None
    if not 1 <= n <= MAX_NUM_THREADS:
        raise ValueError(f"set_num_threads: n must be from 1 to {MAX_NUM_THREADS}, got {n}")
    _C.set_num_threads(n)


def _check_num_threads_env() -> None:
    """Validates QENGINE_NUM_THREADS once at import. The native pool parses it with atoi and
    falls back to all cores without a word ("abc", "0", "-3"), or reads a prefix ("4x" -> 4);
    here a malformed value gives a RuntimeWarning naming it and the thread count used instead
    (all cores, set explicitly so "4x" does not silently mean 4)."""
    import os
    import warnings

    raw = os.environ.get("QENGINE_NUM_THREADS")
    if raw is None or raw.strip() == "":
        return
    try:
        n = int(raw.strip())
    except ValueError:
        n = None
    if n is not None and 1 <= n <= MAX_NUM_THREADS:
        return
    used = max(1, min(os.cpu_count() or 1, MAX_NUM_THREADS))
    _C.set_num_threads(used)
    warnings.warn(f"QENGINE_NUM_THREADS={raw!r} is not an integer from 1 to {MAX_NUM_THREADS}; ignoring it and "
                  f"using {used} threads (all cores)", RuntimeWarning, stacklevel=3)


_check_num_threads_env()


def _share_torch_openmp() -> None:
    """Runs the native kernels' parallel regions on torch's OpenMP threads where torch uses
    OpenMP (csrc/cpu/common/thread_pool.h: torch's workers spin between its operators, and a
    second set of threads would compete with them for the cores). QENGINE_OWN_THREADS=1 keeps
    qengine's own pool; so does a torch without an OpenMP runtime qengine can find."""
    import glob
    import os

    import torch

    if os.environ.get("QENGINE_OWN_THREADS", "").strip() == "1":
        return
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    bundled = [p for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*")
               for p in sorted(glob.glob(os.path.join(libdir, pattern)))]
    for path in bundled + ["libgomp.so.1", "libiomp5.so", "libomp.so"]:  # then a system runtime, by name
        if _C.use_openmp_runtime(path):
            return


_share_torch_openmp()


def __getattr__(name):
    # qengine.hf, qengine.peft and qengine.compat (compat.peft, compat.bnb) import lazily: they
    # reach into transformers / peft when present.
    if name in ("hf", "peft", "compat"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'qengine' has no attribute {name!r}")
