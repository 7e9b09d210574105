"""qengine's torch ops, one family per module: schemas, fakes and autograd in quantize.py,
matmul.py, sparse.py, moe.py (+ moe_torch.py) and optim.py; argument checks in qengine/_checks.py; the
kernels registered per device in cpu.py (+ cpu_moe.py) and cuda.py (imported here, so importing
qengine.ops registers everything); KernelWeight (weight.py), the one object that turns a quantized weight
into kernel arguments."""

from __future__ import annotations

from . import matmul, moe, moe_torch, optim, quantize, sparse, weight  # noqa: F401  (schemas first)
from . import cpu, cpu_moe, cuda  # noqa: F401,E402  (then the kernels of each device)
from .._checks import (DOCTOR_HINT, DTYPE_CODES, SUPPORTED_DEVICES, check_device, cuda_available, num_blocks,
                     positions_bytes, unsupported_device_message)
from .cpu import kmeans_accumulate
from .matmul import SMALL_BATCH_ROWS
from .moe import ACTIVATIONS, GATE_CONCATENATED, GATE_INTERLEAVED, NO_GATE
from .weight import KernelWeight

__all__ = ["DOCTOR_HINT", "DTYPE_CODES", "SUPPORTED_DEVICES", "check_device", "cuda_available", "num_blocks",
           "positions_bytes", "unsupported_device_message", "kmeans_accumulate", "SMALL_BATCH_ROWS", "ACTIVATIONS",
           "GATE_CONCATENATED", "GATE_INTERLEAVED", "NO_GATE", "KernelWeight"]
