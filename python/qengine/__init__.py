"""qengine: a quantization engine for PyTorch with native CPU and CUDA kernels.

    >>> import torch, qengine
    >>> w = torch.randn(4096, 4096)
    >>> q = qengine.quantize(w, "nf4", blocksize=64, double_quant=True)
    >>> q.bits_per_param    # 4.127
    >>> w_hat = q.dequantize()
"""

from __future__ import annotations

from . import _C
from ._ops import cuda_available
from .formats import Format, available_formats, codebook, get_format, register_format
from .functional import dequantize, fit_codebook, matmul, quantize
from .prune import collect_input_norms, prune
from . import qat  # noqa: E402  (qengine.qat.prepare / FakeQuantLinear / fake_quantize)
from .tensor import QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "Format",
    "QuantizedTensor",
    "available_formats",
    "build_info",
    "codebook",
    "collect_input_norms",
    "cuda_available",
    "dequantize",
    "fit_codebook",
    "get_format",
    "matmul",
    "prune",
    "quantize",
    "register_format",
    "set_cpu_isa",
    "set_num_threads",
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
    """Selects the CPU kernel variant ('scalar', 'avx2', 'avx512', 'avx512_bf16'); for tests and benchmarks."""
    _C.set_isa(name)


def set_num_threads(n: int) -> None:
    """Threads used by the native CPU kernels (default: all cores, or QENGINE_NUM_THREADS)."""
    _C.set_num_threads(n)
