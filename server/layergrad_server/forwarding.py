"""A worker's side of ``--workers N`` dispatch: compute calls go to the least-loaded worker.

Every compute call (ComputeGradients, StreamGradients, ExportGradients, Predict)
that arrives on the shared port is routed under the group's ``LoadTable`` lock:
a worker with no call in flight keeps it; a busy one hands it to the serving
sibling with the fewest calls in flight, when that sibling has fewer than this
worker and room in its admission, else keeps it (its admission then queues or
refuses the call). A handed-on call is sent, as the bytes it arrived as plus the
caller's metadata (bearer token included) and remaining deadline, to the
sibling's unix socket; the sibling's initial metadata, response messages (one by
one, under gRPC flow control: a streamed result is never held whole), status and
trailers (retry hints included) come back unchanged, and a caller that goes away
cancels the sibling's call. Calls that arrive on a unix socket come from a
sibling and are computed where they land. ExportGradients, which only callers on
this host may use, is handed on only for such callers: the sibling sees every
call as local.

A sibling that cannot be reached (it died, or is restarting) never saw the call:
the call is then computed here. Every response carries the ``layergrad-worker``
initial metadata: the number of the worker that computed it (for GetModelInfo,
the worker the connection landed on).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc

from layergrad_server.config import ServerConfig
from layergrad_server.errors import Cancelled
from layergrad_server.servicer import _is_local_peer
from layergrad_server.workers import LoadTable, socket_path

logger = logging.getLogger(__name__)

WORKER_METADATA_KEY = "layergrad-worker"
# gRPC reports a call without a deadline as one centuries away.
_NO_DEADLINE = 1e8
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_SIBLING_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # A restarted sibling is found again within a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

Behavior = Callable[[Any, grpc.ServicerContext], Any]


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _RelayedStatus(_Status, grpc.Status):
    """A sibling's final status, passed on to the caller as it is."""


class Dispatcher:
    """Routes this worker's compute calls and relays those it hands on."""

    def __init__(self, config: ServerConfig, table: LoadTable, service_name: str) -> None:
        assert config.worker_index is not None and config.worker_dir is not None
        self.index = config.worker_index
        self.forwarding = config.forwarding
        self._table = table
        self._capacity = config.compute_slots + config.max_queue
        self._metadata = ((WORKER_METADATA_KEY, str(self.index)),)
        self.listen_address = (
            f"unix:{socket_path(config.worker_dir, self.index)}" if self.forwarding else None
        )
        self._channels: dict[int, grpc.Channel] = {}
        self._methods: dict[tuple[int, str], Callable[..., Any]] = {}
        if self.forwarding:
            for sibling in range(table.count):
                if sibling != self.index:
                    self._channels[sibling] = grpc.insecure_channel(
                        f"unix:{socket_path(config.worker_dir, sibling)}", options=_SIBLING_CHANNEL_OPTIONS
                    )
        self._service_name = service_name
        self._idle = threading.Condition()
        self._handed_on_in_flight = 0
        self._draining = False
        self._counts_lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    @property
    def counts(self) -> dict[str, int]:
        """What happened to the compute calls this worker got: ``arrived`` on the port,
        ``kept``, ``handed_on`` to a sibling, ``unreachable`` (handed on but computed here
        as the sibling could not be reached), ``from_sibling`` (computed for a sibling)."""
        with self._counts_lock:
            return dict(self._counts)

    def _count(self, *names: str) -> None:
        with self._counts_lock:
            self._counts.update(names)

    # ---- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """Starts taking calls from siblings (the server listens and serves the model)."""
        if self.forwarding:
            self._table.set_serving(self.index, True)

    def drain(self) -> None:
        """Stops handing calls on and taking calls from siblings (the server is stopping)."""
        self._draining = True
        self._table.set_serving(self.index, False)

    def wait_idle(self, deadline: float) -> bool:
        """Blocks until no handed-on call is in flight or ``deadline`` passes; True if idle."""
        with self._idle:
            while self._handed_on_in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.2))
            return True

    def close(self) -> None:
        """Closes the channels to the siblings (cancelling calls still in flight) and logs
        what this worker did with the compute calls it got."""
        for channel in self._channels.values():
            channel.close()
        counts = collections.Counter(self.counts)
        logger.info(
            "worker %d dispatch: %d compute call(s) arrived on the port, %d kept, %d handed to a "
            "sibling, %d computed here after a sibling could not be reached; %d computed for siblings",
            self.index,
            counts["arrived"],
            counts["kept"],
            counts["handed_on"],
            counts["unreachable"],
            counts["from_sibling"],
        )

    # ---- handlers --------------------------------------------------------------

    def annotate(self, behavior: Behavior) -> Behavior:
        """``behavior`` answering with this worker's number in the initial metadata."""

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            context.send_initial_metadata(self._metadata)
            return behavior(request, context)

        return handle

    def unary(self, method: str, behavior: Behavior, *, local_callers_only: bool = False) -> Behavior:
        """A unary compute handler that runs ``behavior`` here or hands the call on (with
        ``local_callers_only``, only calls from this host)."""

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            if _from_sibling(context):
                self._count("from_sibling")
                context.send_initial_metadata(self._metadata)
                return behavior(request, context)
            target = self._route(may_hand_on=not local_callers_only or _is_local_peer(context.peer()))
            try:
                if target != self.index:
                    delivered, response = self._hand_on_unary(target, method, request, context)
                    if delivered:
                        return response
                    target = self._keep_instead(target)
                context.send_initial_metadata(self._metadata)
                return behavior(request, context)
            finally:
                self._finished(target)

        return handle

    def stream(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Behavior:
        """A server-streaming compute handler that runs ``behavior`` here or hands the call on."""

        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if _from_sibling(context):
                self._count("from_sibling")
                context.send_initial_metadata(self._metadata)
                yield from behavior(request, context)
                return
            target = self._route()
            try:
                if target != self.index:
                    delivered = yield from self._hand_on_stream(target, method, request, context)
                    if delivered:
                        return
                    target = self._keep_instead(target)
                context.send_initial_metadata(self._metadata)
                yield from behavior(request, context)
            finally:
                self._finished(target)

        return handle

    # ---- routing ---------------------------------------------------------------

    def _route(self, may_hand_on: bool = True) -> int:
        """The worker that computes a call arriving here; counted in flight until ``_finished``."""
        table, me = self._table, self.index
        with table.choosing():
            target = me
            if self.forwarding and may_hand_on and not self._draining:
                loads = table.loads()
                if loads[me] > 0:
                    for sibling in range(table.count):
                        load = loads[sibling]
                        if (
                            sibling != me
                            and load < loads[target]
                            and load < self._capacity
                            and table.serving(sibling)
                        ):
                            target = sibling
            table.add_routed(me, target, 1)
        self._count("arrived", "kept" if target == me else "handed_on")
        return target

    def _keep_instead(self, target: int) -> int:
        """Moves a call that ``target`` could not take to this worker."""
        with self._table.choosing():
            self._table.add_routed(self.index, target, -1)
            self._table.add_routed(self.index, self.index, 1)
        self._count("unreachable")
        logger.warning("worker %d could not be reached; computing the call on worker %d", target, self.index)
        return self.index

    def _finished(self, target: int) -> None:
        with self._table.choosing():
            self._table.add_routed(self.index, target, -1)

    # ---- relaying --------------------------------------------------------------

    def _method(self, target: int, method: str, streaming: bool) -> Callable[..., Any]:
        key = (target, method)
        found = self._methods.get(key)
        if found is None:
            channel = self._channels[target]
            path = f"/{self._service_name}/{method}"
            found = channel.unary_stream(path) if streaming else channel.unary_unary(path)
            self._methods[key] = found
        return found

    @contextlib.contextmanager
    def _handing_on(self) -> Iterator[None]:
        """Counts a handed-on call in flight for ``wait_idle``."""
        with self._idle:
            self._handed_on_in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._handed_on_in_flight -= 1
                self._idle.notify_all()

    def _hand_on_unary(
        self, target: int, method: str, request: Any, context: grpc.ServicerContext
    ) -> tuple[bool, bytes | None]:
        """(True, the sibling's response bytes), or (False, None) if the sibling never got the call;
        the sibling's error status is passed on by aborting ``context``."""
        with self._handing_on():
            future = self._method(target, method, streaming=False).future(
                request.SerializeToString(), timeout=_time_left(context), metadata=_passed_metadata(context)
            )
            if not context.add_callback(future.cancel):
                future.cancel()
            try:
                response = future.result()
            except grpc.FutureCancelledError:
                raise Cancelled("the caller went away; the call was stopped", reason="CANCELLED") from None
            except grpc.RpcError:
                if _undelivered(future):
                    return False, None
                _relay_failure(future, context)
            context.send_initial_metadata(future.initial_metadata() or ())
            context.set_trailing_metadata(future.trailing_metadata() or ())
            return True, response

    def _hand_on_stream(
        self, target: int, method: str, request: Any, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Yields the sibling's messages; returns False if the sibling never got the call."""
        with self._handing_on():
            call = self._method(target, method, streaming=True)(
                request.SerializeToString(), timeout=_time_left(context), metadata=_passed_metadata(context)
            )
            if not context.add_callback(call.cancel):
                call.cancel()
            started = False
            try:
                for message in call:
                    if not started:
                        context.send_initial_metadata(call.initial_metadata() or ())
                        started = True
                    yield message
            except grpc.RpcError:
                if not started and _undelivered(call):
                    return False
                _relay_failure(call, context, started)
            if not started:
                context.send_initial_metadata(call.initial_metadata() or ())
            context.set_trailing_metadata(call.trailing_metadata() or ())
            return True


def _from_sibling(context: grpc.ServicerContext) -> bool:
    """Whether the call came over a worker's unix socket (only siblings can reach those)."""
    return context.peer().startswith("unix:")


def _time_left(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE else max(remaining, 0.0)


def _passed_metadata(context: grpc.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata that a sibling needs (bearer token, custom keys), without
    what gRPC sets itself."""
    return tuple(
        (item.key, item.value)
        for item in context.invocation_metadata()
        if item.key != "user-agent" and not item.key.startswith(("grpc-", ":"))
    )


def _undelivered(call: grpc.Call) -> bool:
    """Whether a failed call to a sibling never reached its handlers: UNAVAILABLE without
    the status details that every layergrad refusal carries."""
    if call.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    return not any(key == _STATUS_DETAILS_KEY for key, _ in call.trailing_metadata() or ())


def _relay_failure(call: grpc.Call, context: grpc.ServicerContext, metadata_sent: bool = False) -> None:
    """Ends the caller's call with the sibling's status, details and trailers."""
    if not metadata_sent:
        context.send_initial_metadata(call.initial_metadata() or ())
    context.abort_with_status(
        _RelayedStatus(call.code(), call.details() or "", tuple(call.trailing_metadata() or ()))
    )
