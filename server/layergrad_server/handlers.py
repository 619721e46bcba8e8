"""GradientService's handlers on the asyncio gRPC server.

The server runs on ``grpc.aio``: a call costs a thread only while it computes or
builds its result, so idle, slow or malicious callers (a request message that
never arrives, a stream nobody reads, a health ``Watch``) cannot starve the
server. Each GradientService method is registered with a request-streaming
handler, which gets the call before its request message is read:

1. the bearer token is checked from the call's metadata (when tokens are on), so a
   caller without a valid token is refused before it can send anything;
2. the request message is awaited for at most ``stall_seconds``;
3. in a thread of the bounded executor: the bytes are parsed (undecodable bytes are
   INVALID_ARGUMENT), the token's scopes are checked against the request, the
   synchronous behaviour runs (admission, compute) and its answer is serialized;
4. back on the event loop, the answer is sent. A stream's messages are produced in
   one thread, a few ahead of the one being sent; a caller that takes none of them
   for ``stall_seconds`` (gRPC flow control makes a send wait for the reader) is
   cancelled, which stops the behaviour and frees its admission place and memory.

Behaviours see a ``ThreadContext``: the part of ``grpc.ServicerContext`` they use,
callable from their thread. Every error is mapped here, in one place, with
``status.status_for``; any other exception is logged with its traceback and
becomes ``INTERNAL "Internal server error"``.

Every call, of every protocol registered through a ``Handlers``, is observed here
(see ``observability``): it gets a request id (the caller's ``x-request-id``, or a new
one), echoed in the initial and trailing metadata and in the ErrorInfo of an error;
its ``CallRecord`` (``ThreadContext.record``) collects what it asked for and its
queue, compute and send times, sent as the ``server-timing`` trailer; when it ends
the ``Observer`` writes its access log line and counts it in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError, Message

from layergrad_server import auth
from layergrad_server.errors import Cancelled, DeadlineExceeded, InvalidArgument, LayergradError
from layergrad_server.observability import Observer
from layergrad_server.observability.context import (
    MAX_REQUEST_ID_CHARS,
    PHASES,
    REQUEST_ID_KEY,
    SERVER_TIMING_KEY,
    CallRecord,
    format_server_timing,
    metadata_value,
    new_request_id,
    parse_server_timing,
    valid_request_id,
)
from layergrad_server.observability.tracing import TRACE_CONTEXT_KEYS
from layergrad_server.status import internal_status, reason_of, required_scopes, status_for, with_trailers

logger = logging.getLogger(__name__)

Behavior = Callable[[Any, "ThreadContext"], Any]
# The token scopes a call needs, from its method name and request (``status.required_scopes``).
Scopes = Callable[[str, Any], set[str]]
StreamBehavior = Callable[[Any, "ThreadContext"], Iterator[Any]]
# Fills a call's record from its parsed request (model, pattern, targets, batch).
Describe = Callable[[str, Any, CallRecord], None]

# Stream messages produced ahead of the one being sent (1 MiB each by default).
FRAMES_AHEAD = 4


class Metadatum(NamedTuple):
    key: str
    value: str | bytes


class Aborted(Exception):
    """Raised by ``ThreadContext.abort_with_status``: ends the call with ``status``."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


class ThreadContext:
    """A call as the synchronous behaviours see it, from their executor thread.

    ``record`` is the call's ``CallRecord``; ``invocation_metadata`` holds the call's
    ``x-request-id`` (generated if the caller sent none), so a call handed on to a sibling
    worker keeps it. Initial metadata always carries ``x-request-id``; trailing metadata set
    here is sent with the seam's own (``x-request-id``, ``server-timing``) when the call ends.
    """

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        loop: asyncio.AbstractEventLoop,
        record: CallRecord | None = None,
    ) -> None:
        self._context = context
        self._loop = loop
        self._lock = threading.Lock()
        self._gone = False
        self._callbacks: list[Callable[[], object]] = []
        self.record = record if record is not None else CallRecord("", "", new_request_id())
        metadata = [
            Metadatum(key, value)
            for key, value in context.invocation_metadata() or ()
            if key != REQUEST_ID_KEY
        ]
        metadata.append(Metadatum(REQUEST_ID_KEY, self.record.request_id))
        self._metadata = tuple(metadata)
        self._initial_sent = False
        # Whether the call has its final status (not cancelled).
        self.ended = False
        self._trailers: tuple[tuple[str, str | bytes], ...] = ()
        self._timing_extras: list[str] = []

    def peer(self) -> str:
        return self._context.peer()

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def is_active(self) -> bool:
        """False once the caller has cancelled, gone away or stalled."""
        return not self._gone

    def add_callback(self, callback: Callable[[], object]) -> bool:
        """Runs ``callback`` when the call ends early; False (not registered) if it already has."""
        with self._lock:
            if self._gone:
                return False
            self._callbacks.append(callback)
            return True

    def end(self) -> None:
        """Marks the call gone: behaviours stop at their next checkpoint; runs the callbacks."""
        with self._lock:
            if self._gone:
                return
            self._gone = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("call end callback failed")

    def send_initial_metadata(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        with self._lock:
            self._initial_sent = True
        asyncio.run_coroutine_threadsafe(
            self._context.send_initial_metadata(self._with_request_id(metadata)), self._loop
        ).result()

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._trailers = self._absorb(metadata)

    async def ensure_initial_metadata(self) -> None:
        """On the event loop: sends the initial metadata (``x-request-id``) if the behaviour has not."""
        with self._lock:
            if self._initial_sent:
                return
            self._initial_sent = True
        await self._context.send_initial_metadata(self._with_request_id(()))

    def final_trailers(self, extra: tuple[tuple[str, str | bytes], ...] = ()) -> tuple[tuple[str, Any], ...]:
        """The trailing metadata to end the call with: the behaviour's (or ``extra``, a status's,
        when given), then ``x-request-id`` and ``server-timing``."""
        kept = self._absorb(extra) if extra else self._trailers
        timing = ", ".join([format_server_timing(self.record.phases(all_phases=True)), *self._timing_extras])
        return (*kept, (REQUEST_ID_KEY, self.record.request_id), (SERVER_TIMING_KEY, timing))

    def _with_request_id(self, metadata: tuple[tuple[str, str | bytes], ...]) -> tuple[tuple[str, Any], ...]:
        return (
            *((k, v) for k, v in metadata if k != REQUEST_ID_KEY),
            (REQUEST_ID_KEY, self.record.request_id),
        )

    def _absorb(self, metadata: tuple[tuple[str, str | bytes], ...]) -> tuple[tuple[str, str | bytes], ...]:
        """``metadata`` without ``x-request-id`` and ``server-timing``: the phases of a
        ``server-timing`` (a sibling worker's, or the behaviour's own) go into the record,
        other entries of it are kept to follow the seam's."""
        kept = []
        self._timing_extras = []
        for key, value in metadata:
            if key == SERVER_TIMING_KEY:
                for name, seconds in parse_server_timing(value).items():
                    if name in PHASES:
                        self.record.relayed[name] = seconds
                    else:
                        self._timing_extras.append(format_server_timing({name: seconds}))
            elif key != REQUEST_ID_KEY:
                kept.append((key, value))
        return tuple(kept)

    def abort_with_status(self, status: grpc.Status) -> None:
        raise Aborted(status)


class _End(NamedTuple):
    """The last item of a stream's queue: the status to end with, or None for OK."""

    status: grpc.Status | None


class Handlers:
    """Builds the asyncio handlers of one protocol's synchronous behaviours.

    ``protocol`` names it in the logs and metrics (``layergrad_v1``); ``describe`` fills a
    call's record from its parsed request; ``observer`` sees every call start and end. With
    ``sibling_peers`` (a worker of ``--workers N`` that takes calls from its siblings), calls
    from ``unix:`` peers come from a sibling: they are observed where they arrived, not here.
    """

    def __init__(
        self,
        executor: futures.ThreadPoolExecutor,
        loop: asyncio.AbstractEventLoop,
        tokens: auth.TokenStore | None,
        service_prefix: str,
        stall_seconds: float,
        *,
        protocol: str = "layergrad_v1",
        observer: Observer | None = None,
        describe: Describe | None = None,
        sibling_peers: bool = False,
    ) -> None:
        self._executor = executor
        self._loop = loop
        self._tokens = tokens
        self._prefix = service_prefix
        self._stall_seconds = stall_seconds
        self.protocol = protocol
        self._observer = observer or Observer()
        self._describe = describe
        self._sibling_peers = sibling_peers

    def _open(self, method: str, context: grpc.aio.ServicerContext) -> tuple[ThreadContext, bool]:
        """The call's context and record; True if the caller's ``x-request-id`` cannot be used."""
        given = metadata_value(context.invocation_metadata(), REQUEST_ID_KEY)
        bad = given is not None and not valid_request_id(given)
        peer = context.peer() or ""
        record = CallRecord(
            protocol=self.protocol,
            method=method,
            request_id=given if isinstance(given, str) and not bad else new_request_id(),
            peer=peer,
            from_sibling=self._sibling_peers and peer.startswith("unix:"),
            trace_context={
                key: value
                for key, value in context.invocation_metadata() or ()
                if key in TRACE_CONTEXT_KEYS and isinstance(value, str)
            },
        )
        return ThreadContext(context, self._loop, record), bad

    async def _abort(
        self, context: grpc.aio.ServicerContext, call: ThreadContext, status: grpc.Status
    ) -> None:
        """Ends the call with ``status``, its reason recorded, the seam's trailers added."""
        record = call.record
        record.code = status.code.name
        record.reason = record.reason or reason_of(status)
        record.sent()
        call.ended = True
        trailers = call.final_trailers(tuple(status.trailing_metadata or ()))
        await context.abort_with_status(with_trailers(status, trailers, replace=True))

    def _finish(self, call: ThreadContext) -> None:
        record = call.record
        if not call.ended:  # cancelled: the caller went away (or the server is stopping)
            record.code, record.reason = "CANCELLED", record.reason or "CANCELLED"
        record.finished = time.monotonic()
        try:
            self._observer.finished(record)
        except Exception:
            logger.exception("observing %s%s failed", self._prefix, record.method)

    def unary(
        self,
        method: str,
        behavior: Behavior,
        request_type: type[Message],
        scopes: Scopes = required_scopes,
    ) -> grpc.RpcMethodHandler:
        """A unary-response method handler running ``behavior`` in the executor; ``scopes`` says
        which token scopes a request needs."""

        async def handle(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
            call, bad_id = self._open(method, context)
            self._observer.started(call.record)
            try:
                data = await self._receive(method, context, call, bad_id)
                if isinstance(data, bytes):
                    future = self._loop.run_in_executor(
                        self._executor, self._run_unary, method, behavior, request_type, data, call, scopes
                    )
                    try:
                        answer = await future
                    except BaseException:  # cancelled: the behaviour stops at its next checkpoint
                        call.end()
                        raise
                    if isinstance(answer, bytes):
                        call.record.bytes_sent = len(answer)
                        call.record.sent()
                        await call.ensure_initial_metadata()
                        context.set_trailing_metadata(call.final_trailers())
                        call.ended = True
                        return answer
                    data = answer
                await self._abort(context, call, data)
                raise AssertionError("unreachable: abort raises")
            finally:
                self._finish(call)

        return grpc.stream_unary_rpc_method_handler(handle)

    def stream(
        self, method: str, behavior: StreamBehavior, request_type: type[Message]
    ) -> grpc.RpcMethodHandler:
        """A server-streaming method handler: ``behavior``'s messages produced in one executor
        thread, at most ``FRAMES_AHEAD`` ahead of the one being sent."""

        async def handle(requests: Any, context: grpc.aio.ServicerContext) -> None:
            call, bad_id = self._open(method, context)
            self._observer.started(call.record)
            try:
                data = await self._receive(method, context, call, bad_id)
                if not isinstance(data, bytes):
                    await self._abort(context, call, data)
                await self._send_stream(method, behavior, request_type, data, context, call)
            finally:
                self._finish(call)

        return grpc.stream_stream_rpc_method_handler(handle)

    async def _send_stream(
        self,
        method: str,
        behavior: StreamBehavior,
        request_type: type[Message],
        data: bytes,
        context: grpc.aio.ServicerContext,
        call: ThreadContext,
    ) -> None:
        """Writes ``behavior``'s messages as they come, then ends the call with its status."""
        queue: asyncio.Queue[bytes | _End] = asyncio.Queue()
        room = threading.Semaphore(FRAMES_AHEAD)
        future = self._loop.run_in_executor(
            self._executor, self._run_stream, method, behavior, request_type, data, call, queue, room
        )
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    if item.status is not None:
                        await self._abort(context, call, item.status)
                    call.record.sent()
                    await call.ensure_initial_metadata()
                    context.set_trailing_metadata(call.final_trailers())
                    call.ended = True
                    return
                await call.ensure_initial_metadata()
                try:
                    await asyncio.wait_for(context.write(item), self._stall_seconds)
                except TimeoutError:
                    logger.warning(
                        "%s: the caller read nothing for %.0fs; stopping the stream (request id %s)",
                        method,
                        self._stall_seconds,
                        call.record.request_id,
                    )
                    call.end()
                    room.release(FRAMES_AHEAD + 1)
                    stalled = Cancelled(
                        f"the caller read no message for {self._stall_seconds:.0f}s; the "
                        "stream was stopped (the server's --stall-timeout)",
                        reason="STALLED_READER",
                    )
                    await self._abort(context, call, self._refused(method, stalled, call))
                call.record.bytes_sent += len(item)
                room.release()
        finally:
            # Sent, refused, cancelled or failed: the producer has finished, or stops at
            # its next checkpoint.
            call.end()
            room.release(FRAMES_AHEAD + 1)
            future.add_done_callback(lambda done: done.exception())

    async def _receive(
        self, method: str, context: grpc.aio.ServicerContext, call: ThreadContext, bad_request_id: bool
    ) -> bytes | grpc.Status:
        """The request bytes, after the token check; or the status refusing the call."""
        try:
            if bad_request_id:
                raise InvalidArgument(
                    f"the {REQUEST_ID_KEY} metadata must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII "
                    "characters without spaces; send another or none (the server then makes one)",
                    reason="INVALID_REQUEST_ID",
                )
            if self._tokens is not None:
                principal = self._tokens.authenticate(_authorization(context.invocation_metadata()))
                call.record.token_name = principal.name
            try:
                data = await asyncio.wait_for(context.read(), self._stall_seconds)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no request message arrived within {self._stall_seconds:.0f}s of the call's start "
                    "(the server's --stall-timeout)",
                    reason="REQUEST_NOT_SENT",
                ) from None
            if data is grpc.aio.EOF:
                raise InvalidArgument("the call ended without a request message", reason="MALFORMED_REQUEST")
            return data
        except LayergradError as error:
            return self._refused(method, error, call)

    def _refused(self, method: str, error: LayergradError, call: ThreadContext) -> grpc.Status:
        """The status of a domain error, its ErrorInfo naming the call's request id."""
        logger.info(
            "%s%s refused: %s %s (request id %s)",
            self._prefix,
            method,
            error.status,
            error.message,
            call.record.request_id,
        )
        call.record.reason = error.reason
        error.metadata.setdefault("request_id", call.record.request_id)
        return status_for(error)

    def _internal(self, method: str, call: ThreadContext) -> grpc.Status:
        call.record.reason = "INTERNAL"
        return internal_status(self._prefix + method, call.record.request_id)

    def _parse(
        self,
        method: str,
        request_type: type[Message],
        data: bytes,
        call: ThreadContext,
        scopes: Scopes = required_scopes,
    ) -> Any:
        """The request message, once its bytes parse and the caller's token has its scopes."""
        try:
            request = request_type.FromString(data)
        except DecodeError:
            raise InvalidArgument(
                "the request bytes are not a valid serialized request message of this method",
                reason="MALFORMED_REQUEST",
            ) from None
        if self._describe is not None:
            self._describe(method, request, call.record)
        if self._tokens is not None:
            principal = self._tokens.authenticate(_authorization(call.invocation_metadata()))
            principal.require(scopes(method, request))
        return request

    def _run_unary(
        self,
        method: str,
        behavior: Behavior,
        request_type: type[Message],
        data: bytes,
        call: ThreadContext,
        scopes: Scopes,
    ) -> bytes | grpc.Status:
        """In the executor: the serialized answer, or the status ending the call."""
        try:
            answer = behavior(self._parse(method, request_type, data, call, scopes), call)
            return answer if isinstance(answer, bytes) else answer.SerializeToString()
        except LayergradError as error:
            return self._refused(method, error, call)
        except Aborted as aborted:
            return aborted.status
        except Exception:
            return self._internal(method, call)

    def _run_stream(
        self,
        method: str,
        behavior: StreamBehavior,
        request_type: type[Message],
        data: bytes,
        call: ThreadContext,
        queue: asyncio.Queue[bytes | _End],
        room: threading.Semaphore,
    ) -> None:
        """In the executor: puts ``behavior``'s serialized messages on ``queue``, then an ``_End``."""
        put = self._loop.call_soon_threadsafe
        status = None
        try:
            messages = behavior(self._parse(method, request_type, data, call), call)
            try:
                for message in messages:
                    room.acquire()
                    if not call.is_active():
                        break
                    if not isinstance(message, bytes):
                        message = message.SerializeToString()
                    put(queue.put_nowait, message)
            finally:
                messages.close()  # a stopped stream gives back its admission place now
        except LayergradError as error:
            status = self._refused(method, error, call)
        except Aborted as aborted:
            status = aborted.status
        except Exception:
            status = self._internal(method, call)
        put(queue.put_nowait, _End(status))


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None
