"""Shared memory segments of ExportGradients: created here, unlinked by the caller.

Each result is written into one POSIX shared memory segment named
``layergrad-<hex>``, tensors at 64-byte-aligned offsets, and the server drops its
own mapping at once. The caller claims a segment by unlinking it; the registry
unlinks the segments still there ``claim_seconds`` after their creation, and all
of them on ``close``. Unlinking a segment the caller already unlinked is a no-op.

Python's ``multiprocessing.resource_tracker`` would unlink a tracked segment when
this process exits (and warn of a "leak"), although the caller owns it: segments
are untracked right after creation and unlinked with ``shm_unlink`` directly.
"""

from __future__ import annotations

import _posixshmem
import logging
import threading
import time
import uuid
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from layergrad_server import engine

logger = logging.getLogger(__name__)

PREFIX = "layergrad-"
ALIGNMENT = 64


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def layout(tensors: list[engine.ResultTensor]) -> tuple[list[int], int]:
    """The byte offset of each tensor and the segment size (at least 1 byte)."""
    offsets, end = [], 0
    for tensor in tensors:
        start = _align(end)
        offsets.append(start)
        end = start + tensor.array.size * tensor.output_dtype.itemsize
    return offsets, max(end, 1)


def unlink(name: str) -> bool:
    """Unlinks segment ``name``; False if it was already gone (claimed)."""
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


class SegmentRegistry:
    """The segments this server created and that may not be claimed yet."""

    def __init__(self, claim_seconds: float) -> None:
        self.claim_seconds = claim_seconds
        self._lock = threading.Lock()
        self._segments: dict[str, float] = {}  # name -> time.monotonic() at creation
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="shm-reaper", daemon=True)
        self._reaper.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._segments)

    def export(self, tensors: list[engine.ResultTensor]) -> tuple[str, int, list[int]]:
        """Writes the tensors, in their output types, into a new segment: (name, size, offsets)."""
        offsets, size = layout(tensors)
        name = f"{PREFIX}{uuid.uuid4().hex}"
        segment = shared_memory.SharedMemory(name=name, create=True, size=size)
        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
        with self._lock:
            self._segments[name] = time.monotonic()
        try:
            for tensor, offset in zip(tensors, offsets, strict=True):
                target = np.ndarray(
                    tensor.array.shape,
                    dtype=tensor.output_dtype.newbyteorder("<"),
                    buffer=segment.buf,
                    offset=offset,
                )
                np.copyto(target, tensor.array, casting="unsafe")
                del target  # an exported buffer would keep close() from unmapping
        except BaseException:
            segment.close()
            self.discard(name)
            raise
        segment.close()
        return name, size, offsets

    def discard(self, name: str) -> None:
        """Unlinks one segment of this registry now, claimed or not."""
        with self._lock:
            self._segments.pop(name, None)
        unlink(name)

    def reap(self, now: float | None = None) -> int:
        """Unlinks the segments older than the claim time; returns how many were still unclaimed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [
                name for name, created in self._segments.items() if now - created >= self.claim_seconds
            ]
            for name in expired:
                del self._segments[name]
        unclaimed = sum(unlink(name) for name in expired)
        if unclaimed:
            logger.warning(
                "unlinked %d shared memory segment(s) not claimed within %.1fs", unclaimed, self.claim_seconds
            )
        return unclaimed

    def close(self) -> None:
        """Stops the reaper and unlinks every segment not claimed yet."""
        self._closed.set()
        with self._lock:
            names = list(self._segments)
            self._segments.clear()
        unclaimed = sum(unlink(name) for name in names)
        if unclaimed:
            logger.info("unlinked %d unclaimed shared memory segment(s) on shutdown", unclaimed)

    def _reap_loop(self) -> None:
        interval = min(max(self.claim_seconds / 4, 0.1), 5.0)
        while not self._closed.wait(interval):
            try:
                self.reap()
            except Exception:  # the reaper must outlive any one failure
                logger.exception("reaping shared memory segments failed")
