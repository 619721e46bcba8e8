"""What a layergrad server says about each call in its response metadata: the request id
(``x-request-id``) and the time the call spent in each phase (``server-timing``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REQUEST_ID_KEY = "x-request-id"
SERVER_TIMING_KEY = "server-timing"
_TIMING_ENTRY = re.compile(r"\s*([A-Za-z0-9_-]+)\s*;\s*dur\s*=\s*([0-9.]+)\s*")


def parse_server_timing(value: object) -> dict[str, float]:
    """Seconds by phase of a ``server-timing`` value (``queue;dur=1.2, compute;dur=530.0``, in
    milliseconds); entries that do not parse are skipped."""
    if not isinstance(value, str):
        return {}
    timings = {}
    for entry in value.split(","):
        match = _TIMING_ENTRY.fullmatch(entry)
        if match:
            timings[match.group(1)] = round(float(match.group(2)) / 1e3, 7)
    return timings


def _metadata(call: Any, which: str) -> Iterable[tuple[str, Any]]:
    getter = getattr(call, which, None)
    if getter is None:
        return ()
    try:
        return getter() or ()
    except Exception:  # a call that never got metadata
        return ()


def call_info(call: Any) -> tuple[str | None, dict[str, float]]:
    """(request id, seconds by phase) from a finished gRPC call's metadata; (None, {}) if absent."""
    request_id = None
    timings: dict[str, float] = {}
    for key, value in (*_metadata(call, "initial_metadata"), *_metadata(call, "trailing_metadata")):
        if key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value
        elif key == SERVER_TIMING_KEY:
            timings = parse_server_timing(value)
    return request_id, timings


def request_metadata(request_id: str | None) -> dict[str, Any]:
    """The stub keyword arguments that send ``request_id`` (none for None)."""
    if request_id is None:
        return {}
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, not {request_id!r}")
    return {"metadata": ((REQUEST_ID_KEY, request_id),)}


class _Known:
    """Metadata already awaited, in the shape ``call_info`` reads."""

    def __init__(self, initial: Any, trailing: Any) -> None:
        self._initial, self._trailing = initial, trailing

    def initial_metadata(self) -> Any:
        return self._initial

    def trailing_metadata(self) -> Any:
        return self._trailing


async def call_info_async(call: Any) -> tuple[str | None, dict[str, float]]:
    """``call_info`` of a finished ``grpc.aio`` call (whose metadata getters are coroutines)."""
    return call_info(_Known(await call.initial_metadata(), await call.trailing_metadata()))
