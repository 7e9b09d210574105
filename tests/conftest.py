"""Shared fixtures and parametrisation helpers for the qengine test suite."""

from __future__ import annotations

import importlib
import warnings
import zlib

import pytest
import torch

import qengine
from cases import DTYPE_IDS, shape_id


def pytest_make_parametrize_id(config, val, argname):
    """Readable ids: f32/f16/bf16, bs64/row, 257x33, format names, dq/nodq."""
    if isinstance(val, torch.dtype):
        return DTYPE_IDS.get(val, str(val).replace("torch.", ""))
    if argname == "blocksize" or argname == "bs":
        return "row" if val is None else f"bs{val}"
    if argname == "shape" and isinstance(val, tuple):
        return shape_id(val)
    if isinstance(val, qengine.Format):
        return val.name
    if argname in ("double_quant", "dq") and isinstance(val, bool):
        return "dq" if val else "nodq"
    return None


# ---------------------------------------------------------------------------- seeding
@pytest.fixture(autouse=True)
def _reseed(request):
    """Every test starts from its own fixed seed (stable across runs and selections)."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    yield seed


# ---------------------------------------------------------------------------- markers
def pytest_collection_modifyitems(config, items):
    if qengine.cuda_available():
        return
    info = qengine.build_info()
    why = ("qengine was built without CUDA kernels" if not info["cuda_compiled"]
           else "qengine's CUDA kernels are built but no CUDA GPU is visible")
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why} (qengine.cuda_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ---------------------------------------------------------------------------- bitsandbytes
@pytest.fixture(scope="session")
def bnb():
    """The bitsandbytes module, or a skip when it cannot be imported."""
    with warnings.catch_warnings():
        # Importing bitsandbytes imports torch.utils.mkldnn, which warns about torch's own
        # deprecated torch.jit.script_method; only that warning is silenced.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                                category=DeprecationWarning)
        try:
            module = importlib.import_module("bitsandbytes")
            importlib.import_module("bitsandbytes.functional")
        except ImportError:
            pytest.skip("bitsandbytes not installed")
    return module


@pytest.fixture
def isa_restore():
    """Restores the CPU kernel ISA that was selected before the test."""
    original = qengine.build_info()["cpu_isa"]
    yield original
    qengine.set_cpu_isa(original)


@pytest.fixture
def threads_restore():
    original = qengine.build_info()["num_threads"]
    yield original
    qengine.set_num_threads(original)


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test (restored after): references made of many tiny ops,
    whose OpenMP team costs more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
