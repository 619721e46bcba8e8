"""Admission control: a few compute slots, a bounded queue, deadline-aware refusal.

Knows nothing of gRPC: a call is described by its kind, its batch size, an
absolute deadline (``time.monotonic()`` seconds, or None) and an ``is_active``
callback. The life of a compute call::

    with admission.enter(kind, batch, deadline, is_active) as call:   # or Overloaded
        ...decode and validate the request...
        with call.computing():          # waits for a slot, or raises before compute starts
            result = engine.run(..., checkpoint=call.checkpoint)
        ...send the result, calling call.checkpoint() between chunks...

A call holds its place in the admission from ``enter`` until it has sent its
result, so at most ``slots + max_queue`` calls hold decoded inputs or results
(and handler threads) at once; beyond that ``enter`` refuses at once with
``Overloaded`` (RESOURCE_EXHAUSTED, with a retry hint). A call whose deadline
cannot be met, judged from recent compute times of its kind, is refused with
``DeadlineExceeded`` before its compute starts. ``checkpoint`` raises
``Cancelled`` or ``DeadlineExceeded`` once the caller has gone, so an abandoned
call stops at the next checkpoint (the engine checks between functions of the
forward and backward passes) and frees its slot.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from layergrad_server.errors import Cancelled, DeadlineExceeded, Overloaded, Unavailable

logger = logging.getLogger(__name__)

# Weight of the newest compute time in the moving average of its kind.
EWMA_ALPHA = 0.3
# An average older than this is not trusted to refuse a call (the load may have changed).
ESTIMATE_TTL_SECONDS = 300.0
# How often a queued call wakes to check its caller and deadline.
POLL_SECONDS = 0.05
# Kinds of call whose compute times are kept (the least recently updated is forgotten).
MAX_KINDS = 256
# Bounds of the retry hint sent with Overloaded.
MIN_RETRY_SECONDS = 0.1
MAX_RETRY_SECONDS = 30.0


@dataclasses.dataclass
class _Average:
    seconds_per_input: float
    updated: float


class Admission:
    """Admits at most ``slots`` computing calls plus ``max_queue`` waiting ones."""

    def __init__(self, slots: int, max_queue: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if slots < 1 or max_queue < 0:
            raise ValueError("slots must be >= 1 and max_queue >= 0")
        self.slots = slots
        self.max_queue = max_queue
        self._clock = clock
        self._lock = threading.Condition()
        self._admitted: list[AdmittedCall] = []  # in arrival order
        self._queue: collections.deque[AdmittedCall] = collections.deque()  # waiting for a slot
        self._running = 0
        self._averages: collections.OrderedDict[str, _Average] = collections.OrderedDict()
        self._drain_deadline: float | None = None
        # Called as listener(queued, computing), under the lock, whenever either changes.
        self.listener: Callable[[int, int], object] | None = None

    def _changed(self) -> None:
        if self.listener is not None:
            self.listener(len(self._queue), self._running)

    # ---- estimates -------------------------------------------------------------

    def estimate(self, kind: str, batch: int) -> float | None:
        """Expected compute seconds of a call of ``kind`` with ``batch`` inputs, or None if unknown."""
        average = self._averages.get(kind)
        if average is None or self._clock() - average.updated > ESTIMATE_TTL_SECONDS:
            return None
        return average.seconds_per_input * max(batch, 1)

    def record(self, kind: str, batch: int, seconds: float) -> None:
        """Folds one finished compute time into the moving average of ``kind``."""
        per_input = seconds / max(batch, 1)
        with self._lock:
            average = self._averages.get(kind)
            if average is None or self._clock() - average.updated > ESTIMATE_TTL_SECONDS:
                self._averages[kind] = _Average(per_input, self._clock())
            else:
                average.seconds_per_input += EWMA_ALPHA * (per_input - average.seconds_per_input)
                average.updated = self._clock()
            self._averages.move_to_end(kind)
            while len(self._averages) > MAX_KINDS:
                self._averages.popitem(last=False)

    def _work_ahead(self, calls: list[AdmittedCall]) -> float:
        """Seconds until ``calls`` are done, spread over the slots."""
        now = self._clock()
        total = 0.0
        for call in calls:
            if call.computed:
                continue
            expected = call.expected_seconds or 0.0
            if call.started is not None:
                expected = max(expected - (now - call.started), 0.0)
            total += expected
        return total / self.slots

    # ---- admission -------------------------------------------------------------

    @contextmanager
    def enter(
        self,
        kind: str,
        batch: int,
        deadline: float | None,
        is_active: Callable[[], bool],
        on_computed: Callable[[float, float], object] | None = None,
    ) -> Iterator[AdmittedCall]:
        """Admits a call or refuses it at once (Overloaded, DeadlineExceeded, Unavailable).

        ``on_computed(queue_seconds, compute_seconds)`` is called when the call's compute
        block ends (however it ends): seconds from ``enter`` until it had a slot, and in it."""
        call = AdmittedCall(self, kind, batch, deadline, is_active, self.estimate(kind, batch))
        call.on_computed = on_computed
        with self._lock:
            if self._drain_deadline is not None:
                raise Unavailable(
                    "the server is shutting down; retry on another server", reason="SHUTTING_DOWN"
                )
            if len(self._admitted) >= self.slots + self.max_queue:
                wait = self._work_ahead(self._admitted)
                retry = min(max(wait, MIN_RETRY_SECONDS), MAX_RETRY_SECONDS)
                raise Overloaded(
                    f"the server is busy: {self._running} call(s) computing and "
                    f"{len(self._admitted) - self._running} queued, the most it accepts "
                    f"({self.slots} computing + {self.max_queue} queued); "
                    f"retry in {retry:.1f}s",
                    retry_after=retry,
                )
            call.check_deadline(self._work_ahead(self._admitted), len(self._admitted))
            self._admitted.append(call)
        try:
            yield call
        finally:
            with self._lock:
                if call.running:
                    call.running = False
                    self._running -= 1
                if call in self._queue:
                    self._queue.remove(call)
                self._admitted.remove(call)
                self._changed()
                self._lock.notify_all()

    def drain(self, deadline: float) -> None:
        """Starts shutting down: new calls are Unavailable; queued calls that cannot finish
        by ``deadline`` (monotonic seconds) are refused with Unavailable at once."""
        with self._lock:
            self._drain_deadline = deadline
            self._lock.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        """Blocks until no call is admitted or ``deadline`` passes; True if idle."""
        with self._lock:
            while self._admitted:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._lock.wait(min(left, POLL_SECONDS * 4))
            return True

    @property
    def admitted(self) -> int:
        """Calls admitted now, computing or not."""
        with self._lock:
            return len(self._admitted)

    def _judge_queue(self) -> None:
        """While draining: decides, in queue order, which waiting calls can still finish by the
        drain deadline. A call that cannot is not counted in the wait of the calls behind it
        (it will be refused); each call is judged once."""
        assert self._drain_deadline is not None
        now = self._clock()
        finish = now + self._work_ahead([c for c in self._admitted if c.running])
        for waiting in self._queue:
            expected = waiting.expected_seconds or 0.0
            if waiting.fits_drain is None:
                waiting.fits_drain = finish + expected <= self._drain_deadline
            if waiting.fits_drain:
                finish += expected / self.slots

    def _acquire(self, call: AdmittedCall) -> None:
        """Waits for a slot in arrival order, checking the caller and deadlines while queued."""
        with self._lock:
            self._queue.append(call)
            self._changed()
            try:
                while True:
                    call.checkpoint()
                    if self._drain_deadline is not None:
                        self._judge_queue()
                        if call.fits_drain is False:
                            raise Unavailable(
                                "the server is shutting down and this call would not finish in time; "
                                "retry on another server",
                                reason="SHUTTING_DOWN",
                            )
                    if self._running < self.slots and self._queue[0] is call:
                        call.check_deadline(0.0, 0)
                        self._queue.popleft()
                        self._running += 1
                        call.running = True
                        call.started = self._clock()
                        self._changed()
                        return
                    self._lock.wait(POLL_SECONDS)
            except BaseException:
                if call in self._queue:
                    self._queue.remove(call)
                    self._changed()
                    self._lock.notify_all()
                raise


class AdmittedCall:
    """One admitted call: waits for a slot, checks its caller, records its compute time."""

    def __init__(
        self,
        admission: Admission,
        kind: str,
        batch: int,
        deadline: float | None,
        is_active: Callable[[], bool],
        expected_seconds: float | None,
    ) -> None:
        self._admission = admission
        self.kind = kind
        self.batch = batch
        self.deadline = deadline
        self._is_active = is_active
        self.expected_seconds = expected_seconds
        self.running = False
        self.computed = False
        self.started: float | None = None
        self.entered = admission._clock()
        self.on_computed: Callable[[float, float], object] | None = None
        # While draining: whether the call can finish by the drain deadline (None: not judged).
        self.fits_drain: bool | None = None

    def check_deadline(self, wait_seconds: float, position: int) -> None:
        """Refuses the call if its expected wait plus compute cannot end before its deadline."""
        if self.deadline is None or self.expected_seconds is None:
            return
        left = self.deadline - self._admission._clock()
        needed = wait_seconds + self.expected_seconds
        if needed > left:
            queue = f" behind {position} call(s) expected to take {wait_seconds:.2f}s" if position else ""
            raise DeadlineExceeded(
                f"the deadline cannot be met: this call is estimated to need {needed:.2f}s "
                f"({self.expected_seconds:.2f}s of compute{queue}) but its deadline is in "
                f"{max(left, 0):.2f}s; nothing was computed",
                reason="DEADLINE_TOO_SHORT",
            )

    def checkpoint(self) -> None:
        """Raises Cancelled or DeadlineExceeded once the caller has gone or the deadline passed."""
        expired = self.deadline is not None and self._admission._clock() >= self.deadline
        if expired:
            raise DeadlineExceeded("the deadline passed; the call was stopped", reason="DEADLINE_EXCEEDED")
        if not self._is_active():
            raise Cancelled("the caller went away; the call was stopped", reason="CANCELLED")

    def shared(self, queue_seconds: float, compute_seconds: float) -> None:
        """Records that another call's slot computed this call's work (a merged batch, see
        ``dynamic_batching``): it waited ``queue_seconds``, then took ``compute_seconds``."""
        if self.on_computed is not None:
            self.on_computed(queue_seconds, compute_seconds)
        with self._admission._lock:
            self.computed = True

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Holds a compute slot for the block; its duration feeds the estimates when it succeeds."""
        try:
            self._admission._acquire(self)
        except BaseException:
            if self.on_computed is not None:
                self.on_computed(self._admission._clock() - self.entered, 0.0)
            raise
        started = self._admission._clock()
        try:
            yield
        finally:
            admission = self._admission
            if self.on_computed is not None:
                self.on_computed(started - self.entered, admission._clock() - started)
            with admission._lock:
                self.computed = True
                if self.running:
                    self.running = False
                    admission._running -= 1
                    admission._changed()
                    admission._lock.notify_all()
        admission.record(self.kind, self.batch, admission._clock() - started)
