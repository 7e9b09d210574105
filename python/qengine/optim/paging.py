"""Paged optimizer states: every parameter's states live in one flat element space cut into
fixed-size pages; a byte budget bounds the pages held resident (CPU RAM, or the CUDA device
cache), and the others live in a home store (CPU: a temporary file on disk; CUDA: pinned
host memory) until they are needed again.

A page of E elements holds, one after the other: state1 [E] and state2 [E] (float32 for
32-bit states, uint8 codes for 8-bit ones), then for 8-bit states absmax1 [E/256] and
absmax2 [E/256] (float32). E is page_elements, except that the last page holds only what the
regions use (rounded up to 256), and grows when a parameter group is added. A parameter's region starts on a 256-element boundary, so a
region split over pages is split on block boundaries. Pages are created zero-filled when
first touched; zero bytes are zero states for both layouts (an all-zero absmax decodes every
code to 0).

Eviction picks the resident page released most recently: a step walks the pages in order,
so that page is the one needed last in the next step (Belady's choice for cyclic access).

Spill failures (CPU home): before a step changes anything, prepare_spill() creates the spill
file and reserves disk space for every page (posix_fallocate), so an unwritable or missing
spill directory and a full disk (or quota, or file-size limit) raise SpillError while the
parameters and states are still those of the previous step. A write into reserved space can
then fail only on a genuine I/O error; a page whose write fails stays resident (its bytes are
never dropped).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass

import torch

from ..ops import optim as optim_ops

BLOCK = optim_ops.BLOCK


class SpillError(OSError):
    """The paged optimizer could not create, grow, write or read its spill file. errno is the
    operating system's (ENOSPC, EACCES, EFBIG, ...), filename the spill directory."""


def _spill_error(e: OSError, what: str, directory: str) -> SpillError:
    reason = e.strerror or str(e)
    return SpillError(e.errno, f"qengine: the paged optimizer could not {what} its spill file in {directory!r} "
                               f"({reason}); give it a writable directory with room (spill_dir=...) or a larger "
                               f"budget_bytes", directory)


class PagesBusy(Exception):
    """Raised by PageManager.acquire when every resident page is in use: the caller runs the
    kernel on what it holds, releases it, and asks again."""


@dataclass
class Span:
    """Part of one parameter's region inside one page."""

    page: int
    first: int  # element index inside the page
    offset: int  # element index inside the parameter
    count: int


class PageManager:
    """Pages of optimizer states for one device.

    Args:
        state_bits: 32 (float32 m, v) or 8 (uint8 codes + float32 absmax per 256 elements).
        device: where the kernels run (cpu or cuda).
        page_elements: elements per page, a multiple of 256.
        budget_bytes: the most bytes of pages held resident (None: no limit); at least one page.
        spill_dir: directory of the CPU spill file (default: the system temp dir).
    """

    def __init__(self, state_bits: int, device: torch.device, page_elements: int, budget_bytes: int | None,
                 spill_dir: str | None = None):
        self.state_bits = state_bits
        self.device = device
        self.page_elements = page_elements
        self.budget_bytes = budget_bytes
        self.spill_dir = spill_dir
        self.page_bytes = self._bytes_for(page_elements)
        if budget_bytes is not None and budget_bytes < self.page_bytes:
            raise ValueError(f"budget_bytes ({budget_bytes}) must hold at least one page ({self.page_bytes} bytes); "
                             "lower page_elements or raise the budget")
        self.elements = 0  # end of the last region (element space)
        self.resident: dict[int, torch.Tensor] = {}  # page -> buffer (uint8 [page_bytes], on device)
        self.layout_version = 0  # bumped whenever a page's buffer (so its address) changes
        self._home: _Home | None = None  # created at the first eviction
        self._homed: dict[int, int] = {}  # page -> bytes, for pages whose current bytes are in the home store
        self._busy: set[int] = set()
        self._released: list[int] = []  # resident, not busy, most recently released last
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.loads = 0
        self.evictions = 0

    # ------------------------------------------------------------------ layout
    def add_region(self, numel: int) -> int:
        """Reserves a region of numel elements; returns its first element."""
        start = -(-self.elements // BLOCK) * BLOCK
        self.elements = start + numel
        return start

    @property
    def num_pages(self) -> int:
        return -(-self.elements // self.page_elements)

    def spans(self, start: int, numel: int):
        """The Spans of the region [start, start + numel)."""
        e = start
        end = start + numel
        while e < end:
            page, first = divmod(e, self.page_elements)
            count = min(end - e, self.page_elements - first)
            yield Span(page, first, e - start, count)
            e += count

    def _bytes_for(self, elements: int) -> int:
        """Bytes of a page buffer holding `elements` (a multiple of 256) elements."""
        return elements * (8 if self.state_bits == 32 else 2) + (0 if self.state_bits == 32 else 8 * (elements // BLOCK))

    def _capacity(self, buf: torch.Tensor) -> int:
        return buf.numel() // 8 if self.state_bits == 32 else buf.numel() // (2 * BLOCK + 8) * BLOCK

    def _needed(self, page: int) -> int:
        used = -(-self.elements // BLOCK) * BLOCK - page * self.page_elements
        return min(self.page_elements, used)

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(state1, state2, absmax1, absmax2) views of one page buffer (absmax None for 32-bit)."""
        e = self._capacity(buf)
        if self.state_bits == 32:
            return buf[:4 * e].view(torch.float32), buf[4 * e:8 * e].view(torch.float32), None, None
        nb = e // BLOCK
        return (buf[:e], buf[e:2 * e], buf[2 * e:2 * e + 4 * nb].view(torch.float32),
                buf[2 * e + 4 * nb:2 * e + 8 * nb].view(torch.float32))

    def addresses(self, buf: torch.Tensor, first: int) -> tuple[int, int, int, int]:
        """Addresses of state1, state2, absmax1, absmax2 at element `first` of a page buffer."""
        base = buf.data_ptr()
        e = self._capacity(buf)
        if self.state_bits == 32:
            return base + 4 * first, base + 4 * e + 4 * first, 0, 0
        nb = e // BLOCK
        b = first // BLOCK
        return base + first, base + e + first, base + 2 * e + 4 * b, base + 2 * e + 4 * nb + 4 * b

    def _grown(self, buf: torch.Tensor, elements: int) -> torch.Tensor:
        """A bigger buffer for the last page (a group was added), with the same states."""
        new = torch.zeros(self._bytes_for(elements), dtype=torch.uint8, device=self.device)
        for dst, src in zip(self.views(new), self.views(buf)):
            if src is not None:
                dst[:src.numel()] = src
        return new

    # ------------------------------------------------------------------ residency
    def acquire(self, page: int) -> torch.Tensor:
        """The resident buffer of `page`, loaded or created if needed, marked busy until
        release_all(). Raises PagesBusy when room is needed and every resident page is busy."""
        buf = self.resident.get(page)
        need = self._bytes_for(self._needed(page))
        if buf is None or buf.numel() < need:
            if page in self._released:
                self._released.remove(page)
            held = buf.numel() if buf is not None else 0
            while self.budget_bytes is not None and self.resident_bytes - held + need > self.budget_bytes:
                if not self._released:
                    raise PagesBusy
                self._evict(self._released[-1])  # on a failed write the page stays resident
                self._released.pop()
            if buf is None and page in self._homed:
                buf = self._home.load(page, self._homed[page])
                self.loads += 1
            if buf is None:
                buf = torch.zeros(need, dtype=torch.uint8, device=self.device)
            elif buf.numel() < need:
                buf = self._grown(buf, self._needed(page))
            self.resident[page] = buf
            self.layout_version += 1
            self.resident_bytes += buf.numel() - held
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        elif page in self._released:
            self._released.remove(page)
        self._busy.add(page)
        return buf

    def release_all(self) -> None:
        """Marks the busy pages free to evict, in page order (the last one evicted first)."""
        for page in sorted(self._busy):
            self._released.append(page)
        self._busy.clear()

    def _evict(self, page: int) -> None:
        home = self._ensure_home()
        buf = self.resident[page]
        home.write(page, buf)  # before the page leaves `resident`: a failed write loses nothing
        del self.resident[page]
        self.layout_version += 1
        self._homed[page] = buf.numel()
        self.resident_bytes -= buf.numel()
        self.evictions += 1

    def _ensure_home(self) -> "_Home":
        if self._home is None:
            self._home = (_PinnedHome(self) if self.device.type == "cuda" else _FileHome(self))
        return self._home

    def _total_needed(self) -> int:
        """Bytes of every page of the current layout at its full (needed) size."""
        n = self.num_pages
        return 0 if n == 0 else (n - 1) * self.page_bytes + self._bytes_for(self._needed(n - 1))

    def prepare_spill(self) -> None:
        """Creates the CPU spill file and reserves disk space for every page when this layout
        does not fit the budget, so that the evictions of the coming step write into space
        already held. Raises SpillError (nothing else changes) when that is not possible."""
        if self.device.type != "cpu" or self.budget_bytes is None or self._total_needed() <= self.budget_bytes:
            return
        self._ensure_home().reserve(self.num_pages)

    def page_for_reading(self, page: int) -> torch.Tensor | None:
        """A copy of a page's bytes on the page device, wherever it lives (None: never touched)."""
        if page in self.resident:
            return self.resident[page].clone()
        if page in self._homed:
            return self._home.load(page, self._homed[page])
        return None

    def write_page(self, page: int, buf: torch.Tensor) -> None:
        """Replaces a page's bytes (loading a checkpoint); keeps the budget."""
        dst = self.acquire(page)
        dst.copy_(buf)
        self.release_all()

    @property
    def total_bytes(self) -> int:
        """Bytes of every page that exists (resident or in the home store)."""
        sizes = dict(self._homed)
        sizes.update((p, b.numel()) for p, b in self.resident.items())
        return sum(sizes.values())

    def close(self) -> None:
        if self._home is not None:
            self._home.close()
            self._home = None


class _Home:
    def reserve(self, pages: int) -> None: ...
    def write(self, page: int, buf: torch.Tensor) -> None: ...
    def load(self, page: int, nbytes: int) -> torch.Tensor: ...
    def close(self) -> None: ...


class _FileHome(_Home):
    """CPU home: an already-unlinked temporary file in spill_dir, one 4 KiB-aligned slot per
    page, written and read with pwrite/preadv. Spilled states then live in the OS page cache,
    which the kernel writes out and reclaims under memory pressure, never in this process.
    (A memory-mapped file was measured 3x slower here: every 4 KiB of a page costs a fault
    on the mapping, and dropping the mapping's pages after each copy costs more.)"""

    def __init__(self, mgr: PageManager):
        self.stride = -(-mgr.page_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.dir = mgr.spill_dir if mgr.spill_dir is not None else tempfile.gettempdir()
        self.reserved = 0  # pages whose slots hold allocated disk space
        try:
            self.file = tempfile.TemporaryFile(dir=self.dir, prefix="qengine-optim-")
        except OSError as e:
            raise _spill_error(e, "create", self.dir) from e
        self.fd = self.file.fileno()

    def reserve(self, pages: int) -> None:
        """Allocates disk space for the slots of pages [0, pages) (a no-op for those held)."""
        if pages <= self.reserved:
            return
        start, end = self.reserved * self.stride, pages * self.stride
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.fd, start, end - start)
            else:  # no fallocate: writing the zeros allocates the blocks as well
                zeros = bytes(self.stride)
                for off in range(start, end, self.stride):
                    self._pwrite_all(memoryview(zeros), off)
        except OSError as e:
            raise _spill_error(e, f"reserve {end - start} bytes for", self.dir) from e
        self.reserved = pages

    def _pwrite_all(self, view: memoryview, off: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], off + done)

    def write(self, page: int, buf: torch.Tensor) -> None:
        try:
            self._pwrite_all(memoryview(buf.numpy()).cast("B"), page * self.stride)
        except OSError as e:
            raise _spill_error(e, f"write page {page} to", self.dir) from e

    def load(self, page: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        done, off = 0, page * self.stride
        try:
            while done < nbytes:
                got = os.preadv(self.fd, [view[done:]], off + done)
                if got <= 0:
                    raise OSError(0, f"the file ended early at page {page}")
                done += got
        except OSError as e:
            raise _spill_error(e, f"read page {page} from", self.dir) from e
        return buf

    def close(self) -> None:
        self.file.close()


class _PinnedHome(_Home):
    """CUDA home: one pinned host buffer per evicted page, and two side streams beside the
    compute stream. A write-back waits for the kernels already queued (the last ones to use the
    page) and runs on the write stream; a load runs on the load stream into a buffer allocated
    there, waits only for that page's own last write-back, and the compute stream waits for the
    load alone, so loads overlap the kernels of other pages. Device buffers are recorded on
    every stream that uses them, so the caching allocator does not reuse one under a copy.
    (Written to CUDA's stream semantics; not exercised by the CPU test suite.)"""

    def __init__(self, mgr: PageManager):
        self.mgr = mgr
        self.write_stream = optim_ops.cuda_side_stream(mgr.device)
        self.load_stream = optim_ops.cuda_side_stream(mgr.device)
        self.host: dict[int, torch.Tensor] = {}
        self.written: dict[int, torch.cuda.Event] = {}

    def write(self, page: int, buf: torch.Tensor) -> None:
        host = self.host.get(page)
        if host is None:
            host = self.host[page] = optim_ops.pinned_zeros(buf.numel())
        self.write_stream.wait_stream(torch.cuda.current_stream(self.mgr.device))
        with torch.cuda.stream(self.write_stream):
            host.copy_(buf, non_blocking=True)
            self.written[page] = torch.cuda.Event()
            self.written[page].record(self.write_stream)
        buf.record_stream(self.write_stream)

    def load(self, page: int, nbytes: int) -> torch.Tensor:
        compute = torch.cuda.current_stream(self.mgr.device)
        with torch.cuda.stream(self.load_stream):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.mgr.device)
            self.load_stream.wait_event(self.written[page])
            buf.copy_(self.host[page], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.load_stream)
        compute.wait_event(ready)
        buf.record_stream(compute)
        return buf

    def close(self) -> None:
        self.write_stream.synchronize()
        self.load_stream.synchronize()
        self.host.clear()
