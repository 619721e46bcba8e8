"""Shared memory regions that a Client owns and an ExportGradients call fills.

A :class:`Region` is one POSIX shared memory segment (``layergrad-<32 hex>``,
mode 0600) that this process creates, locks (a shared ``flock``, released by
the kernel when the process dies, which tells the server the owner is gone),
maps read-write and pre-faults once, so that neither the server's writes nor
the caller's reads fault page by page later. The request names it; the server
writes the tensors into it; :meth:`Region.read` returns them as read-only
views of the mapping (no copy) or as copies.

A :class:`RegionPool` keeps a Client's regions: one per shared-memory call in
flight, reused by later calls, replaced by a bigger one when a result does not
fit. Regions are unlinked by :meth:`RegionPool.close` (``Client.close()``),
when they are garbage collected, and at interpreter exit (``weakref.finalize``);
a process killed outright leaves its segments, which a server that has seen
them unlinks once their lock is gone. A forked child never unlinks its parent's
regions.

Segments are opened with ``shm_open`` directly rather than through
``multiprocessing.shared_memory.SharedMemory``, which registers them with the
resource tracker (which unlinks, with a warning, what it thinks leaked).
"""

from __future__ import annotations

import _posixshmem
import contextlib
import errno
import fcntl
import mmap
import os
import secrets
import threading
import weakref

import numpy as np

from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._tensors import REDUCED, AssembledTensor, _checked_dtype, _checked_shape, _nbytes, decoded
from layergrad.errors import ClientClosedError, DataLoss

PREFIX = "layergrad-"
ALIGNMENT = 64
# Size of a Client's first region; a result that does not fit makes a bigger one.
INITIAL_BYTES = 1 << 20
# Linux 5.14+: allocate and map every page of a range in one call.
MADV_POPULATE_WRITE = 23


def unlink(name: str) -> None:
    """Unlinks segment ``name``; already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)


def _unlink_if_creator(name: str, creator: int) -> None:
    """The finalizer of a Region: unlinks it, but only in the process that created it."""
    if os.getpid() == creator:
        unlink(name)


def _allocate(fd: int, size: int) -> None:
    """Allocates the segment's pages, so that a full ``/dev/shm`` is ENOSPC here rather than SIGBUS later."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _prefault(memory: mmap.mmap, size: int) -> None:
    """Maps every page of ``memory`` writable now, so no later access faults."""
    try:
        memory.madvise(MADV_POPULATE_WRITE, 0, size)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        pages = np.frombuffer(memory, dtype=np.uint8, count=size)  # before Linux 5.14: touch each page
        pages[:: mmap.PAGESIZE] = 0
        del pages


class Region:
    """A pre-faulted shared memory segment created by this process, ``size`` bytes (whole pages)."""

    def __init__(self, size: int) -> None:
        size = -(-max(size, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        name = f"{PREFIX}{secrets.token_hex(16)}"
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            with contextlib.suppress(OSError):  # no flock on this system: the server cannot tell
                fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, size)
            _allocate(fd, size)
            memory = mmap.mmap(fd, size)  # keeps the open file, and so the lock, after close(fd)
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self._memory = memory
        self._finalizer = weakref.finalize(self, _unlink_if_creator, name, os.getpid())
        try:
            _prefault(memory, size)
        except BaseException:
            self.destroy()
            raise

    def __repr__(self) -> str:
        state = "alive" if self.alive else "unlinked"
        return f"<layergrad shared memory region {self.name} {self.size} bytes {state}>"

    @property
    def alive(self) -> bool:
        """Whether the segment is still linked (``destroy`` not called)."""
        return self._finalizer.alive

    def to_proto(self) -> pb.SharedMemoryRegion:
        """The whole segment as the request's region."""
        return pb.SharedMemoryRegion(name=self.name, offset=0, size=self.size)

    def read(self, response: pb.ExportGradientsResponse, *, copy: bool) -> list[AssembledTensor]:
        """The response's tensors: copies, or read-only views of this region (``copy=False``).

        FLOAT16 and BFLOAT16 tensors are always decoded into new float32 arrays."""
        tensors = []
        for ref in response.tensors:
            dt = _checked_dtype(ref.dtype, ref.name)
            shape = _checked_shape(ref.shape, ref.name)
            nbytes = _nbytes(shape, dt)
            if ref.offset < 0 or ref.offset % ALIGNMENT or ref.offset + nbytes > self.size:
                raise DataLoss(
                    f"tensor {ref.name!r} ({nbytes} bytes at offset {ref.offset}) lies outside the "
                    f"{self.size}-byte region or is misaligned"
                )
            if nbytes == 0:
                array = np.empty(shape, dtype=dt)
            else:
                view = np.frombuffer(self._memory, dtype=dt, count=nbytes // dt.itemsize, offset=ref.offset)
                array = view.reshape(shape)
                if copy and ref.dtype not in REDUCED:
                    array = array.copy()
                elif ref.dtype not in REDUCED:
                    array.flags.writeable = False
            array = decoded(array, ref.dtype, ref.scale_exponent)  # a new float32 array for reduced types
            tensors.append(AssembledTensor(ref.name, ref.kind, array))
        return tensors

    def destroy(self) -> None:
        """Unlinks the segment and unmaps it; arrays still viewing it keep their pages until they go."""
        self._finalizer()
        with contextlib.suppress(BufferError):
            self._memory.close()


class RegionPool:
    """A Client's regions: one per shared-memory call in flight, reused and grown.

    The most recently released region is handed out first, so calls made one
    after another all use the same region. A new region is as large as the
    largest result seen so far.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Region] = []
        self._regions: set[Region] = set()
        self._size = INITIAL_BYTES
        self._closed = False

    def names(self) -> list[str]:
        """Names of the regions linked now."""
        with self._lock:
            return sorted(region.name for region in self._regions)

    def acquire(self) -> Region:
        """A free region, or a new one."""
        with self._lock:
            if self._free:
                return self._free.pop()
            size = self._size
        return self._add(Region(size))

    def replace(self, region: Region, size: int) -> Region:
        """Destroys ``region`` (in use by the caller) and returns a new one of at least ``size`` bytes."""
        with self._lock:
            self._regions.discard(region)
            self._size = max(self._size, size)
        region.destroy()
        return self._add(Region(size))

    def release(self, region: Region) -> None:
        """Gives back a region after its call; a closed pool destroys it instead."""
        with self._lock:
            if not self._closed and region in self._regions:
                self._free.append(region)
                return
            self._regions.discard(region)
        region.destroy()

    def clear(self) -> None:
        """Destroys every free region now and every region in use when it is released."""
        with self._lock:
            free, self._free = self._free, []
            self._regions.clear()
        for region in free:
            region.destroy()

    def close(self) -> None:
        """Destroys every region, in use or not; later releases destroy theirs too."""
        with self._lock:
            self._closed = True
            regions = list(self._regions)
            self._regions.clear()
            self._free.clear()
        for region in regions:
            region.destroy()

    def _add(self, region: Region) -> Region:
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._regions.add(region)
        if closed:
            region.destroy()
            raise ClientClosedError("the client was closed during the call")
        return region
