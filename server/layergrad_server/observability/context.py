"""What the server records of one call: its request id, what it asked for, how it ended, and
the time it spent queued, computing and sending.

``handlers`` opens a ``CallRecord`` for every call it handles (any protocol), before the
request is read. The behaviours add what only they know through ``ThreadContext.record``:
the model, and (through the admission) the queue and compute times. When the call is
over the seam closes the record: the ``server-timing`` and ``x-request-id`` trailers, one
access log line and the metrics all come from it.

Phases, each in seconds:

* ``queue``: from the admission taking the call until it got a compute slot;
* ``compute``: the forward and backward passes (in the slot);
* ``send``: from the end of compute until the last response message was handed to gRPC
  (building and serializing the response; for a stream, every message written, paced by
  the caller's reading).

Every response's ``server-timing`` trailer names all three (0 for a phase the call never
reached, such as the compute of a refused call); the metrics observe only the phases a
call went through.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Iterable

REQUEST_ID_KEY = "x-request-id"
SERVER_TIMING_KEY = "server-timing"
# The longest request id a caller may send; what it may hold (printable ASCII, no spaces).
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")
_TIMING_ENTRY = re.compile(r"\s*([A-Za-z0-9_-]+)\s*;\s*dur\s*=\s*([0-9.]+)\s*")
PHASES = ("queue", "compute", "send")


def new_request_id() -> str:
    """A fresh request id: 32 hexadecimal digits (a random UUID)."""
    return uuid.uuid4().hex


def valid_request_id(value: object) -> bool:
    """Whether a caller's ``x-request-id`` can be used as it is."""
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def metadata_value(metadata: Iterable[tuple[str, object]] | None, key: str) -> object | None:
    """The first value of ``key`` in gRPC metadata, or None."""
    for name, value in metadata or ():
        if name == key:
            return value
    return None


def format_server_timing(phases: dict[str, float]) -> str:
    """``queue;dur=1.2, compute;dur=530.0, send;dur=3.1`` (milliseconds) from seconds by phase."""
    return ", ".join(f"{name};dur={seconds * 1e3:.1f}" for name, seconds in phases.items())


def parse_server_timing(value: object) -> dict[str, float]:
    """Seconds by phase of a ``server-timing`` value; entries that do not parse are skipped."""
    if not isinstance(value, str):
        return {}
    phases = {}
    for entry in value.split(","):
        match = _TIMING_ENTRY.fullmatch(entry)
        if match:
            phases[match.group(1)] = float(match.group(2)) / 1e3
    return phases


@dataclasses.dataclass
class CallRecord:
    """One call as the server saw it; filled in while the call runs, read when it ends."""

    protocol: str
    method: str
    request_id: str
    peer: str = ""
    #: Wall-clock time the call arrived (``time.time()``) and its monotonic twin.
    arrived: float = dataclasses.field(default_factory=time.time)
    started: float = dataclasses.field(default_factory=time.monotonic)
    #: The name of the caller's token (never the token), "" when tokens are off or none was valid.
    token_name: str = ""
    model: str = ""
    pattern: str = ""
    #: What the call asked for, short: ``input``, ``layers:conv5_3``, ``parameters:all``, ...
    targets: str = ""
    batch: int = 0
    #: The gRPC status code name it ended with, and the error's reason (or "").
    code: str = "OK"
    reason: str = ""
    #: Serialized response bytes handed to gRPC.
    bytes_sent: int = 0
    queue_seconds: float | None = None
    compute_seconds: float | None = None
    send_seconds: float | None = None
    #: Monotonic time compute ended, from which ``send`` is counted.
    computed_at: float | None = None
    #: Phases reported by the worker that computed a call handed on to it (``--workers``).
    relayed: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Whether this call came from a sibling worker (it is counted where it arrived).
    from_sibling: bool = False
    #: The caller's W3C trace context metadata (``traceparent``, ``tracestate``), if any.
    trace_context: dict[str, str] = dataclasses.field(default_factory=dict)
    finished: float | None = None

    def admitted(self, queue_seconds: float, compute_seconds: float) -> None:
        """Called by the admission when the call's compute ends."""
        self.queue_seconds = (self.queue_seconds or 0.0) + queue_seconds
        self.compute_seconds = (self.compute_seconds or 0.0) + compute_seconds
        self.computed_at = time.monotonic()

    def sent(self, at: float | None = None) -> None:
        """Marks the last response message handed to gRPC (now, or at monotonic ``at``)."""
        at = time.monotonic() if at is None else at
        if "send" in self.relayed:
            self.send_seconds = self.relayed["send"]
        elif self.computed_at is not None:
            self.send_seconds = max(at - self.computed_at, 0.0)

    def phases(self, *, all_phases: bool = False) -> dict[str, float]:
        """Seconds by phase: those the call went through, or (``all_phases``) all three, 0 for
        a phase it never reached (``server-timing``)."""
        queue = self.relayed.get("queue", self.queue_seconds)
        compute = self.relayed.get("compute", self.compute_seconds)
        found = {"queue": queue, "compute": compute, "send": self.relayed.get("send", self.send_seconds)}
        if all_phases:
            return {name: seconds or 0.0 for name, seconds in found.items()}
        return {name: seconds for name, seconds in found.items() if seconds is not None}

    @property
    def duration(self) -> float:
        """Seconds from arrival to the end (or until now)."""
        end = time.monotonic() if self.finished is None else self.finished
        return end - self.started
