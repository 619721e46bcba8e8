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
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError, Message

from layergrad_server import auth
from layergrad_server.errors import Cancelled, DeadlineExceeded, InvalidArgument, LayergradError
from layergrad_server.status import internal_status, required_scopes, status_for

logger = logging.getLogger(__name__)

Behavior = Callable[[Any, "ThreadContext"], Any]
# The token scopes a call needs, from its method name and request (``status.required_scopes``).
Scopes = Callable[[str, Any], set[str]]
StreamBehavior = Callable[[Any, "ThreadContext"], Iterator[Any]]

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
    """A call as the synchronous behaviours see it, from their executor thread."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self._lock = threading.Lock()
        self._gone = False
        self._callbacks: list[Callable[[], object]] = []
        self._metadata = tuple(Metadatum(key, value) for key, value in context.invocation_metadata() or ())

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
        asyncio.run_coroutine_threadsafe(self._context.send_initial_metadata(metadata), self._loop).result()

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._context.set_trailing_metadata(metadata)

    def abort_with_status(self, status: grpc.Status) -> None:
        raise Aborted(status)


class _End(NamedTuple):
    """The last item of a stream's queue: the status to end with, or None for OK."""

    status: grpc.Status | None


class Handlers:
    """Builds the asyncio handlers of GradientService's synchronous behaviours."""

    def __init__(
        self,
        executor: futures.ThreadPoolExecutor,
        loop: asyncio.AbstractEventLoop,
        tokens: auth.TokenStore | None,
        service_prefix: str,
        stall_seconds: float,
    ) -> None:
        self._executor = executor
        self._loop = loop
        self._tokens = tokens
        self._prefix = service_prefix
        self._stall_seconds = stall_seconds

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
            call = ThreadContext(context, self._loop)
            data = await self._receive(method, context)
            if not isinstance(data, bytes):
                await context.abort_with_status(data)
            future = self._loop.run_in_executor(
                self._executor, self._run_unary, method, behavior, request_type, data, call, scopes
            )
            try:
                answer = await future
            except BaseException:  # cancelled: the behaviour stops at its next checkpoint
                call.end()
                raise
            if not isinstance(answer, bytes):
                await context.abort_with_status(answer)
            return answer

        return grpc.stream_unary_rpc_method_handler(handle)

    def stream(
        self, method: str, behavior: StreamBehavior, request_type: type[Message]
    ) -> grpc.RpcMethodHandler:
        """A server-streaming method handler: ``behavior``'s messages produced in one executor
        thread, at most ``FRAMES_AHEAD`` ahead of the one being sent."""

        async def handle(requests: Any, context: grpc.aio.ServicerContext) -> None:
            call = ThreadContext(context, self._loop)
            data = await self._receive(method, context)
            if not isinstance(data, bytes):
                await context.abort_with_status(data)
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
                            await context.abort_with_status(item.status)
                        return
                    try:
                        await asyncio.wait_for(context.write(item), self._stall_seconds)
                    except TimeoutError:
                        logger.warning(
                            "%s: the caller read nothing for %.0fs; stopping the stream",
                            method,
                            self._stall_seconds,
                        )
                        call.end()
                        room.release(FRAMES_AHEAD + 1)
                        await context.abort_with_status(
                            status_for(
                                Cancelled(
                                    f"the caller read no message for {self._stall_seconds:.0f}s; the "
                                    "stream was stopped (the server's --stall-timeout)",
                                    reason="STALLED_READER",
                                )
                            )
                        )
                    room.release()
            finally:
                # Sent, refused, cancelled or failed: the producer has finished, or stops at
                # its next checkpoint.
                call.end()
                room.release(FRAMES_AHEAD + 1)
                future.add_done_callback(lambda done: done.exception())

        return grpc.stream_stream_rpc_method_handler(handle)

    async def _receive(self, method: str, context: grpc.aio.ServicerContext) -> bytes | grpc.Status:
        """The request bytes, after the token check; or the status refusing the call."""
        try:
            if self._tokens is not None:
                self._tokens.authenticate(_authorization(context.invocation_metadata()))
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
            return self._refused(method, error)

    def _refused(self, method: str, error: LayergradError) -> grpc.Status:
        logger.info("%s%s refused: %s %s", self._prefix, method, error.status, error.message)
        return status_for(error)

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
            return self._refused(method, error)
        except Aborted as aborted:
            return aborted.status
        except Exception:
            return internal_status(self._prefix + method)

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
            status = self._refused(method, error)
        except Aborted as aborted:
            status = aborted.status
        except Exception:
            status = internal_status(self._prefix + method)
        put(queue.put_nowait, _End(status))


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None
