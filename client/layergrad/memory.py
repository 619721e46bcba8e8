"""Keeping freed memory for reuse: glibc ``malloc`` settings for a process that allocates and
frees the same large blocks on every call (the server applies them unless started with
``--no-keep-freed-memory``; a client making large calls repeatedly can call
``layergrad.keep_freed_memory()`` once).

By default glibc serves a block above its mmap threshold (128 KiB, raised as large blocks
are freed, at most 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``,
and it gives the top of the heap back above 128 KiB free. Every call of the service makes
blocks of that kind: a request's inputs, the batch array, each result, each response (602 KB
per image each; 19 MB at batch 32), and so does the SDK. So every call faults all of their
pages in again, and on a virtual machine a page fault is dear: serializing a 19 MB request took 31 ms with the
defaults and 10 ms with the settings below, in one process on this project's 2-vCPU machine.

``keep_freed_memory`` serves blocks up to 32 MiB from the heap and keeps up to
``TRIM_THRESHOLD`` of freed memory at its top: later calls reuse pages already faulted in.
The price is resident memory held between calls, bounded by the largest amount of such
blocks in use at once. Blocks above 32 MiB (im2col matrices of large batches, all parameter
gradients) are mapped and unmapped as before. Not glibc (musl, macOS): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20


def keep_freed_memory() -> bool:
    """Applies the settings to this process's ``malloc``; False where it is not glibc's."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if done:
        logger.info(
            "malloc keeps freed blocks up to %d MiB for reuse (up to %d MiB at the heap's top)",
            MMAP_THRESHOLD >> 20,
            TRIM_THRESHOLD >> 20,
        )
    return done
