"""Caller-owned shared memory regions of ExportGradients: checked, mapped once, written in place.

The caller creates a POSIX shared memory segment named ``layergrad-...``, holds a
shared ``flock`` on it while it uses it, and names a region of it
(``SharedMemoryRegion``: name, byte offset, byte size) in each request. The server
never creates, resizes or (but for one case below) unlinks a segment. It opens
only names with the ``layergrad-`` prefix (``NAME_PATTERN``), read-write, without
``O_CREAT``, and only segments owned by the user it runs as.

Each segment is mapped once and the mapping is cached by name for later calls
(at most ``max_mappings``, least recently used dropped first), so a call costs
one ``shm_open`` + ``fstat`` + ``flock`` probe and then one copy per tensor into
pages that are already mapped: the pages a call writes are populated once per
mapping (``MADV_POPULATE_WRITE``) instead of faulting one by one. A name that
now names another segment (other inode or size) is mapped again.

Every ``sweep_seconds`` a thread checks each segment the server has seen in a
request (at most ``max_known`` names):

* gone (the caller unlinked it) or replaced by another segment of that name:
  the mapping is dropped, so the memory is freed as soon as the caller lets go;
* nobody holds the caller's lock any more (its creator died without unlinking
  it, for example killed): the server unlinks it, and drops the mapping. Only
  the segment the server saw locked in a request (same device and inode) is
  unlinked, so a segment re-created under the name is left alone.

Pages of the region are allocated before compute, so a full ``/dev/shm`` is an
error, not a SIGBUS. A process of the server's user that shrinks a segment in the
microseconds between the last size check and the copy could still crash the
server (SIGBUS); such a process can signal the server anyway.
"""

from __future__ import annotations

import _posixshmem
import collections
import contextlib
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb

from layergrad_server import engine, precision
from layergrad_server.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

logger = logging.getLogger(__name__)

PREFIX = "layergrad-"
NAME_PATTERN = re.compile(r"layergrad-[A-Za-z0-9._-]{1,245}")
ALIGNMENT = 64
# Linux 5.14+: populate the page tables of a range, writable, in one call.
MADV_POPULATE_WRITE = 23
PAGE_SIZE = mmap.PAGESIZE

_Identity = tuple[int, int]  # (st_dev, st_ino)


def align(offset: int) -> int:
    """``offset`` rounded up to a multiple of ``ALIGNMENT``."""
    return -(-offset // ALIGNMENT) * ALIGNMENT


def layout(specs: Sequence[engine.ResultSpec], base: int = 0) -> tuple[list[int], int]:
    """The byte offset of each tensor, from ``base`` (a multiple of 64) on, and the bytes they take.

    Tensors follow one another, each at the next multiple of ``ALIGNMENT``; the
    size counts from ``base`` to the end of the last tensor.
    """
    offsets, end = [], base
    for spec in specs:
        start = align(end)
        offsets.append(start)
        end = start + spec.nbytes
    return offsets, end - base


@dataclasses.dataclass(frozen=True)
class Region:
    """A checked ``SharedMemoryRegion``."""

    name: str
    offset: int
    size: int


def check_region(request: pb.ExportGradientsRequest) -> Region:
    """The request's region, or InvalidArgument naming the field at fault."""
    if not request.HasField("region"):
        raise InvalidArgument(
            "region is required: the shared memory region to write the result into",
            field="region",
            reason="REGION_REQUIRED",
        )
    region = request.region
    if not NAME_PATTERN.fullmatch(region.name):
        raise InvalidArgument(
            f"region.name {region.name[:300]!r} is not a layergrad shared memory name: it must be "
            f"{PREFIX!r} followed by 1 to 245 characters from A-Z a-z 0-9 . _ -",
            field="region.name",
            reason="REGION_NAME_INVALID",
        )
    if region.offset < 0 or region.offset % ALIGNMENT:
        raise InvalidArgument(
            f"region.offset must be a non-negative multiple of {ALIGNMENT}, got {region.offset}",
            field="region.offset",
            reason="REGION_OFFSET_INVALID",
        )
    if region.size <= 0:
        raise InvalidArgument(
            f"region.size must be positive, got {region.size}",
            field="region.size",
            reason="REGION_SIZE_INVALID",
        )
    return Region(region.name, region.offset, region.size)


def unlink(name: str) -> bool:
    """Unlinks segment ``name``; False if it was already gone."""
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


def owner_alive(fd: int) -> bool:
    """Whether some process holds a lock on the open segment ``fd`` (its creator's shared flock).

    Probes with a non-blocking exclusive flock and releases it at once. When the
    probe cannot tell (flock unsupported here), the owner counts as alive.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class _Mapping:
    """One cached read-write mapping of a whole segment."""

    def __init__(self, name: str, identity: _Identity, size: int, memory: mmap.mmap) -> None:
        self.name = name
        self.identity = identity
        self.size = size
        self.memory = memory
        self.users = 0
        self.retired = False
        self._populated: list[tuple[int, int]] = []

    def populate(self, fd: int, start: int, end: int) -> None:
        """Allocates the pages of bytes [start, end) and maps them writable, once per range.

        A page that cannot be allocated (``/dev/shm`` full) would kill the server with
        SIGBUS when written; it is refused here instead, before any compute.
        """
        if any(lo <= start and end <= hi for lo, hi in self._populated):
            return
        first = start // PAGE_SIZE * PAGE_SIZE
        while True:
            try:
                self.memory.madvise(MADV_POPULATE_WRITE, first, end - first)
                break
            except InterruptedError:  # a signal arrived: populating resumes where it stopped
                continue
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise _no_memory(self.name, exc) from None
            try:  # before Linux 5.14: allocate the pages; they map as they are written
                os.posix_fallocate(fd, start, end - start)
            except OSError as fallocate_exc:
                if fallocate_exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise _no_memory(self.name, fallocate_exc) from None
            break
        self._populated = [(lo, hi) for lo, hi in self._populated if not (start <= lo and hi <= end)]
        self._populated.append((start, end))

    def close(self) -> None:
        """Unmaps, unless a writer still holds a view (then the mapping goes with its last user)."""
        try:
            self.memory.close()
        except BufferError:
            logger.warning("shared memory mapping of %s still in use; unmapped later", self.name)


class Target:
    """A leased region: writes a result's tensors at their planned offsets."""

    def __init__(self, mapping: _Mapping, specs: Sequence[engine.ResultSpec], offsets: list[int]) -> None:
        self._mapping = mapping
        self._specs = specs
        self.offsets = offsets

    def write(self, tensors: Sequence[engine.ResultTensor], exponents: Sequence[int] | None = None) -> None:
        """Copies each tensor, converted to its output type on the way (float16 with its scale
        ``exponents``, see ``convert.encode_outputs``), into the region (one pass each)."""
        if len(tensors) != len(self._specs):
            raise RuntimeError(f"{len(tensors)} tensors computed, {len(self._specs)} planned")
        memory = self._mapping.memory
        end = self.offsets[-1] + self._specs[-1].nbytes if self._specs else 0
        if memory.size() < end:  # shrunk since the lease began: writing would raise SIGBUS
            raise FailedPrecondition(
                f"shared memory segment {self._mapping.name!r} shrank to {memory.size()} bytes during "
                "the call; do not resize a segment while a call writes into it",
                reason="REGION_RESIZED",
            )
        scales = [0] * len(tensors) if exponents is None else exponents
        for tensor, spec, offset, exponent in zip(tensors, self._specs, self.offsets, scales, strict=True):
            if tensor.array.shape != spec.shape or tensor.output_dtype != spec.dtype:
                raise RuntimeError(f"tensor {tensor.name!r} does not match its plan {spec}")
            _copy_into(memory, offset, tensor.array, spec.dtype, exponent)


# Elements converted at a time into a reduced output type, so that the temporaries stay in cache.
_CONVERT_BLOCK = 1 << 16


def _copy_into(memory: mmap.mmap, offset: int, array: np.ndarray, dtype: np.dtype, exponent: int = 0) -> None:
    """``array`` as ``dtype`` (little-endian, row-major) at byte ``offset`` of ``memory``; float32
    to float16 (scaled by ``2**exponent``) or bfloat16 through ``precision``."""
    target = np.ndarray(array.shape, dtype=dtype.newbyteorder("<"), buffer=memory, offset=offset)
    if array.dtype == dtype or dtype not in (precision.FLOAT16, precision.BFLOAT16):
        np.copyto(target, array, casting="same_kind")
        return
    source, flat = array.reshape(-1), target.reshape(-1)
    for start in range(0, source.size, _CONVERT_BLOCK):
        stop = start + _CONVERT_BLOCK
        flat[start:stop] = precision.convert(source[start:stop], dtype, exponent)


class RegionMaps:
    """The segments this server writes results into: checks, cached mappings and the sweeper."""

    def __init__(self, *, max_mappings: int = 16, max_known: int = 256, sweep_seconds: float = 1.0) -> None:
        self.max_mappings = max_mappings
        self.max_known = max_known
        self.sweep_seconds = sweep_seconds
        self._lock = threading.Lock()
        self._mappings: collections.OrderedDict[str, _Mapping] = collections.OrderedDict()
        self._known: collections.OrderedDict[str, _Identity] = collections.OrderedDict()
        self._closed = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="shm-sweeper", daemon=True)
        self._sweeper.start()

    def mapped(self) -> list[str]:
        """Names of the segments mapped now, least recently used first."""
        with self._lock:
            return list(self._mappings)

    @contextlib.contextmanager
    def lease(self, region: Region, specs: Sequence[engine.ResultSpec]) -> Iterator[Target]:
        """The region, checked against the segment and the planned result, mapped for writing.

        Raises before any compute: NotFound, PermissionDenied, FailedPrecondition (not
        locked, or its pages cannot be allocated) or InvalidArgument (past the segment's
        end, or too small for the result: ErrorInfo metadata ``needed_bytes``).
        """
        offsets, needed = layout(specs, region.offset)
        fd = _open(region.name)
        try:
            info = _check_segment(fd, region)
            if needed > region.size:
                raise InvalidArgument(
                    f"region.size is {region.size} bytes but the result needs {needed} bytes "
                    f"(from region.offset {region.offset}); grow the region to at least {needed} bytes",
                    field="region.size",
                    reason="REGION_TOO_SMALL",
                    metadata={"needed_bytes": str(needed)},
                )
            mapping = self._acquire(region.name, fd, info)
            try:
                mapping.populate(fd, region.offset, region.offset + needed)
            except BaseException:
                self._release(mapping)
                raise
        finally:
            os.close(fd)
        try:
            yield Target(mapping, specs, offsets)
        finally:
            self._release(mapping)

    def _acquire(self, name: str, fd: int, info: os.stat_result) -> _Mapping:
        """The cached mapping of the open segment, or a new one; counted as in use."""
        identity = (info.st_dev, info.st_ino)
        with self._lock:
            self._remember(name, identity)
            cached = self._mappings.get(name)
            if cached is not None and cached.identity == identity and cached.size == info.st_size:
                self._mappings.move_to_end(name)
                cached.users += 1
                return cached
        mapping = _Mapping(name, identity, info.st_size, mmap.mmap(fd, info.st_size))
        with self._lock:
            stale = self._mappings.pop(name, None)
            if stale is not None:
                self._retire(stale)
            self._mappings[name] = mapping
            mapping.users += 1
            self._evict()
        return mapping

    def _release(self, mapping: _Mapping) -> None:
        with self._lock:
            mapping.users -= 1
            if mapping.retired and mapping.users == 0:
                mapping.close()

    def _remember(self, name: str, identity: _Identity) -> None:
        """Notes a segment seen locked in a request (caller holds the lock)."""
        self._known[name] = identity
        self._known.move_to_end(name)
        while len(self._known) > self.max_known:
            self._known.popitem(last=False)

    def _retire(self, mapping: _Mapping) -> None:
        """Unmaps ``mapping`` now or, if a call still writes into it, when that call ends."""
        mapping.retired = True
        if mapping.users == 0:
            mapping.close()

    def _evict(self) -> None:
        """Drops least recently used idle mappings beyond ``max_mappings``."""
        for name in list(self._mappings):
            if len(self._mappings) <= self.max_mappings:
                return
            if self._mappings[name].users == 0:
                self._retire(self._mappings.pop(name))

    def _forget(self, name: str, identity: _Identity) -> None:
        with self._lock:
            if self._known.get(name) == identity:
                del self._known[name]
            mapping = self._mappings.get(name)
            if mapping is not None and mapping.identity == identity:
                self._retire(self._mappings.pop(name))

    def sweep(self) -> int:
        """Drops mappings of segments gone or replaced, unlinks those whose creator died; returns how many
        segments it unlinked."""
        with self._lock:
            known = list(self._known.items())
        unlinked = 0
        for name, identity in known:
            state = _probe(name, identity)
            if state == "alive":
                continue
            if state == "orphaned" and unlink(name):
                unlinked += 1
                logger.info("unlinked shared memory segment %s: nobody holds its lock (creator gone)", name)
            self._forget(name, identity)
        return unlinked

    def close(self) -> None:
        """Stops the sweeper and unmaps every idle mapping (the others go when their call ends)."""
        self._closed.set()
        with self._lock:
            mappings = list(self._mappings.values())
            self._mappings.clear()
            self._known.clear()
            for mapping in mappings:
                self._retire(mapping)

    def _sweep_loop(self) -> None:
        while not self._closed.wait(self.sweep_seconds):
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive any one failure
                logger.exception("sweeping shared memory segments failed")


def _no_memory(name: str, exc: OSError) -> FailedPrecondition:
    return FailedPrecondition(
        f"the pages of shared memory segment {name!r} cannot be allocated ({os.strerror(exc.errno or 0)}); "
        "is /dev/shm full?",
        reason="REGION_NOT_ALLOCATED",
    )


def _open(name: str) -> int:
    """Opens an existing segment read-write, turning OS errors into the caller's errors."""
    try:
        # O_NONBLOCK: a FIFO in the segment's place must not block the open.
        return _posixshmem.shm_open("/" + name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK, mode=0)
    except FileNotFoundError:
        raise NotFound(
            f"no shared memory segment {name!r} on the server's host: create it first (the server "
            "never creates one); a server on another host, or in another IPC namespace, cannot see it",
            field="region.name",
            reason="REGION_NOT_FOUND",
        ) from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
            raise PermissionDenied(
                f"the server cannot open shared memory segment {name!r} read-write "
                f"({os.strerror(exc.errno)}); create it as the server's user with mode 0600",
                field="region.name",
                reason="REGION_PERMISSION_DENIED",
            ) from None
        if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EINVAL):
            # A directory (EINVAL from shm_open, EISDIR from open), a socket or a device.
            try:
                mode = os.lstat(f"/dev/shm/{name}").st_mode
            except OSError:
                raise exc from None
            if not stat.S_ISREG(mode):
                raise _not_a_segment(name, _FILE_TYPES.get(stat.S_IFMT(mode), "not a regular file")) from None
        raise


def _not_a_segment(name: str, what: str) -> InvalidArgument:
    return InvalidArgument(
        f"{name!r} under /dev/shm is {what}, not a shared memory segment: create the segment with "
        "shm_open (or multiprocessing.shared_memory)",
        field="region.name",
        reason="REGION_NOT_A_SEGMENT",
    )


_FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _check_segment(fd: int, region: Region) -> os.stat_result:
    """The open segment's status, once it is known to be the server user's, big enough, and locked."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_segment(region.name, _FILE_TYPES.get(stat.S_IFMT(info.st_mode), "not a regular file"))
    if info.st_uid != os.geteuid():
        raise PermissionDenied(
            f"shared memory segment {region.name!r} belongs to another user; the server writes "
            "only into segments of the user it runs as",
            field="region.name",
            reason="REGION_PERMISSION_DENIED",
        )
    if region.offset + region.size > info.st_size:
        raise InvalidArgument(
            f"the region (offset {region.offset}, size {region.size}) extends past the end of "
            f"segment {region.name!r}, which has {info.st_size} bytes",
            field="region.size",
            reason="REGION_OUTSIDE_SEGMENT",
        )
    if not owner_alive(fd):
        raise FailedPrecondition(
            f"nobody holds a lock on shared memory segment {region.name!r}: its creator must "
            "hold flock(LOCK_SH) on it while it uses it",
            reason="REGION_NOT_LOCKED",
        )
    return info


def _probe(name: str, identity: _Identity) -> str:
    """'gone', 'replaced', 'orphaned' (nobody holds its lock) or 'alive'."""
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY | os.O_NOFOLLOW, mode=0)
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "replaced"
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != identity:
            return "replaced"
        return "alive" if owner_alive(fd) else "orphaned"
    finally:
        os.close(fd)
