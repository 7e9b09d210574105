"""File-level helpers of the transformers quantizer: safetensors headers and tensors read with
plain file reads (no mmap), and paging out the mmap'd float weights already quantized."""

from __future__ import annotations

import ctypes
import json
import mmap
import sys

import torch

_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; their contents are kept (re-read or swapped)


def page_out(t: torch.Tensor) -> None:
    """Asks the kernel to drop the pages of a CPU float weight just quantized. transformers reads
    checkpoints through mmap, so every weight read stays resident as page cache mapped into this
    process (counted in its RSS) until loading ends; paging it out keeps the resident size near
    the quantized model. Contents are preserved (a file page is re-read on access, an anonymous
    one swapped), so this is only a hint, skipped where unsupported."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < (1 << 20) or not sys.platform.startswith("linux"):
        return
    if t.untyped_storage().resizable():  # torch's own allocation (not a view of a file): freed anyway
        return
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_PAGEOUT))  # errors ignored


_libc = None


_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def safetensors_index(path: str) -> tuple[int, dict]:
    """(offset of the data section, {name: header entry}) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def read_tensor(f, path: str, base: int, key: str, entry: dict) -> torch.Tensor:
    """One tensor read with plain file reads into its own memory (no mmap, so the file's pages
    never count in this process's resident size)."""
    try:
        dtype = _ST_DTYPES[entry["dtype"]]
        shape = [int(s) for s in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {key} has an unreadable header entry {entry!r}") from None
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if end - begin != nbytes:
        raise ValueError(f"{path}: tensor {key} spans {end - begin} bytes, its shape and dtype need {nbytes}")
    f.seek(base + begin)
    if nbytes and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != nbytes:
        raise ValueError(f"{path}: tensor {key} is truncated")
    return t
