"""What the server tells its operators: request ids and timings (``context``), one access
log line per call (``access_log``) and Prometheus metrics (``metrics``).

``handlers`` gives every call's ``CallRecord`` to an ``Observer`` when the call starts and
when it ends; ``Observers`` passes them on to several.
"""

from __future__ import annotations

from collections.abc import Iterable

from layergrad_server.observability.context import CallRecord


class Observer:
    """Sees every call start and end; does nothing (the base of the real ones)."""

    def started(self, record: CallRecord) -> None:
        """A call arrived (nothing of its request is known yet)."""

    def finished(self, record: CallRecord) -> None:
        """A call ended: its status, sizes and timings are in ``record``."""


class Observers(Observer):
    """Passes every call on to each of ``observers``, in order."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = tuple(observers)

    def started(self, record: CallRecord) -> None:
        for observer in self.observers:
            observer.started(record)

    def finished(self, record: CallRecord) -> None:
        for observer in self.observers:
            observer.finished(record)
