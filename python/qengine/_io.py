"""Checkpoint files: written atomically (a temporary file in the target's directory, fsync,
rename, fsync of the directory), so a process killed while saving leaves the previous file
intact; read back with every kind of damage reported as a ValueError naming the file or the
tensor (each tensor's CRC-32 is stored next to it and checked on load)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
import zlib
from typing import Iterator, Mapping

import torch

__all__ = ["atomic_path", "atomic_write", "check_writable_dir", "check_writable_file", "save_tensors", "load_tensors",
           "torch_save", "tensor_crc32"]

# Where the per-tensor checksums live: a metadata entry of a safetensors file, an extra uint8
# (JSON) entry of a torch.save'd dict (removed again by load_tensors).
CRC_METADATA_KEY = "qengine.crc32"
CRC_TENSOR_KEY = "__qengine_crc32__"


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new empty file next to `name`, created as open() creates files (mode 0o666 less the
    umask, and a directory's default ACL where it has one), unlike tempfile.mkstemp's 0o600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name!r} in {directory!r}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path next to `path`; when the block ends without an exception the
    file written there is fsync'ed and renamed over `path` (atomic on POSIX), else removed.

    The file ends with the mode open(path, "w") would give it: an existing file's mode, else
    0o666 less the umask (0644 by default). Every file qengine writes goes through here, and
    the mode is set after the block because some writers (safetensors' save_file) replace the
    file they are given by one of their own, with mode 0o600."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory, os.path.basename(path))
    try:
        mode = os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileNotFoundError):
            mode = os.stat(path).st_mode & 0o7777
        yield tmp
        if os.stat(tmp).st_mode & 0o7777 != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """``with atomic_write(p) as f: f.write(...)``: `p` is replaced only once all is written."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def _dir_problem(directory: str) -> str | None:
    """Why files cannot be written in `directory` (an absolute path that may not exist yet:
    it could be created), or None."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"cannot write in {probe!r}: {e.strerror or e}"
    return None


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raises ValueError("<what> '<path>': <reason>") unless `path` is a directory qengine can
    write in, or can create (every existing component a directory, the deepest existing one
    writable). Creates nothing: it checks an output option before any long work."""
    path = os.fspath(path)
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"{what} {path!r} is a file, not a directory")
    problem = _dir_problem(full)
    if problem:
        raise ValueError(f"{what} {path!r}: {problem}")


def check_writable_file(path: str | os.PathLike, what: str) -> None:
    """As check_writable_dir, for a file to be written (its directory may not exist yet); an
    existing file must be writable. Changes nothing."""
    path = os.fspath(path)
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{what} {path!r} is a directory, not a file")
    if os.path.exists(full):
        try:
            with open(full, "r+b"):
                pass
        except OSError as e:
            raise ValueError(f"{what} {path!r}: cannot write it: {e.strerror or e}") from None
        return
    problem = _dir_problem(os.path.dirname(full))
    if problem:
        raise ValueError(f"{what} {path!r}: {problem}")


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes in row-major order (any dtype, any device)."""
    if t.numel() == 0:
        return 0
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.detach().reshape(-1))  # unit stride whatever t's strides (a 1-element tensor may have any)
    return zlib.crc32(flat.view(torch.uint8).numpy())


def torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Writes a flat dict of tensors (e.g. QuantizedTensor.state_dict()) atomically, with a
    CRC-32 per tensor: safetensors when `path` ends in .safetensors, else torch.save."""
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"save_tensors takes a dict of str -> torch.Tensor; {key!r} is {type(t).__name__}")
    crcs = json.dumps({k: tensor_crc32(t) for k, t in tensors.items()}, sort_keys=True)
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        meta = dict(metadata or {})
        meta[CRC_METADATA_KEY] = crcs
        cpu = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(cpu, tmp, metadata=meta)
    else:
        if metadata:
            raise ValueError("metadata is only stored in .safetensors files")
        data = dict(tensors)
        data[CRC_TENSOR_KEY] = torch.frombuffer(bytearray(crcs.encode()), dtype=torch.uint8)
        torch_save(data, path)


def load_tensors(path: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    """Reads what save_tensors wrote (or any safetensors / torch.save'd dict of tensors) onto
    the CPU. A truncated or damaged file raises ValueError naming the file; a tensor whose
    bytes fail their stored CRC-32 raises ValueError naming the tensor (when verify)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    crcs = None
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if CRC_METADATA_KEY in meta:
                crcs = meta[CRC_METADATA_KEY]
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict):
                raise ValueError(f"holds a {type(tensors).__name__}, not a dict of tensors")
            if CRC_TENSOR_KEY in tensors:
                raw = tensors.pop(CRC_TENSOR_KEY)
                crcs = bytes(raw.tolist()).decode("utf-8") if isinstance(raw, torch.Tensor) else raw
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from None
    except Exception as e:  # noqa: BLE001 - safetensors / zip / unpickling errors of many types
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {type(e).__name__}: {e}") from None
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
    if verify and crcs is not None:
        _verify(path, tensors, crcs)
    return tensors


def _verify(path: str, tensors: dict, crcs: str) -> None:
    try:
        table = json.loads(crcs)
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{path}: the stored checksums are unreadable (corrupt file): {e}") from None
    if set(table) != set(tensors):
        missing = sorted(set(table) ^ set(tensors))
        raise ValueError(f"{path}: tensors {missing[:5]} do not match the stored checksums (corrupt file)")
    for key, t in tensors.items():
        if table[key] != tensor_crc32(t):
            raise ValueError(f"{path}: tensor {key!r} fails its CRC-32 check (corrupt file)")
