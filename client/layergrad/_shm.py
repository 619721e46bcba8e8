"""Reading an ExportGradients result out of its POSIX shared memory segment.

The server writes the tensors into one segment and names it in the response;
the caller maps it read-only, copies each tensor into a fresh array and unlinks
the segment, whatever happens. The segment is opened with ``shm_open`` directly
rather than through ``multiprocessing.shared_memory.SharedMemory``, which on
Python < 3.13 registers every segment it attaches with the resource tracker
(which would then unlink it again, with a warning, when this process exits).
"""

from __future__ import annotations

import _posixshmem
import contextlib
import mmap
import os

import numpy as np

from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._tensors import AssembledTensor, _checked_dtype, _checked_shape, _nbytes
from layergrad.errors import DataLoss


def unlink(name: str) -> None:
    """Unlinks segment ``name``; already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)


def read_segment(response: pb.ExportGradientsResponse) -> list[AssembledTensor]:
    """Copies every tensor out of the response's segment, then unlinks the segment."""
    name = response.segment_name
    if not name or "/" in name:
        raise DataLoss(f"the server named an invalid shared memory segment {name!r}")
    try:
        return _copy_out(response)
    finally:
        unlink(name)


def _copy_out(response: pb.ExportGradientsResponse) -> list[AssembledTensor]:
    name = response.segment_name
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0)
    except FileNotFoundError:
        raise DataLoss(
            f"shared memory segment {name!r} does not exist: the server is on another host (use "
            "shared_memory=False), or it unlinked the segment after its claim time"
        ) from None
    try:
        size = os.fstat(fd).st_size
        if size < response.segment_bytes or size == 0:
            raise DataLoss(
                f"shared memory segment {name!r} has {size} bytes, expected {response.segment_bytes}"
            )
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        tensors = []
        for ref in response.tensors:
            dt = _checked_dtype(ref.dtype, ref.name)
            shape = _checked_shape(ref.shape, ref.name)
            nbytes = _nbytes(shape, dt)
            if ref.offset < 0 or ref.offset + nbytes > size:
                raise DataLoss(
                    f"tensor {ref.name!r} ({nbytes} bytes at offset {ref.offset}) lies outside the "
                    f"{size}-byte segment"
                )
            count = nbytes // dt.itemsize
            array = np.frombuffer(mapping, dtype=dt, count=count, offset=ref.offset).reshape(shape).copy()
            tensors.append(AssembledTensor(ref.name, ref.kind, array))
        return tensors
    finally:
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when it goes
            mapping.close()
