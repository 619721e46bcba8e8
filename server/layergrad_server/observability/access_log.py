"""One log line per finished call, on the ``layergrad_server.access`` logger at INFO.

With ``--log-format json`` each line is one JSON object with the fields below at its top
level; otherwise a readable line::

    OK layergrad_v1/StreamGradients request_id=4f0c... peer=ipv4:127.0.0.1:40512 token=lab
    model=vgg16 pattern=grad targets="input" batch=1 reason=- bytes=602131
    queue_ms=0.1 compute_ms=512.3 send_ms=4.0 duration_ms=517.9

Fields: ``time`` (when the call ended, UTC; the log line's own), ``request_id``, ``peer``, ``token`` (the
token's name from the tokens file, never the token; "" without tokens), ``protocol``,
``method``, ``model``, ``pattern``, ``targets``, ``batch``, ``status`` (the gRPC code
name), ``reason`` (the error's reason, "" when OK), ``bytes`` (response bytes sent),
``queue_ms``, ``compute_ms``, ``send_ms`` (null for a phase the call never reached) and
``duration_ms``. Calls a sibling worker handed on are logged by the worker they arrived
at, not by the one that computed them.
"""

from __future__ import annotations

import logging
from typing import Any

from layergrad_server.observability import Observer
from layergrad_server.observability.context import CallRecord

LOGGER_NAME = "layergrad_server.access"
logger = logging.getLogger(LOGGER_NAME)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def fields(record: CallRecord) -> dict[str, Any]:
    """The access log fields of a finished call."""
    phases = record.phases()
    return {
        "request_id": record.request_id,
        "peer": record.peer,
        "token": record.token_name,
        "protocol": record.protocol,
        "method": record.method,
        "model": record.model,
        "pattern": record.pattern,
        "targets": record.targets,
        "batch": record.batch,
        "status": record.code,
        "reason": record.reason,
        "bytes": record.bytes_sent,
        "queue_ms": _ms(phases.get("queue")),
        "compute_ms": _ms(phases.get("compute")),
        "send_ms": _ms(phases.get("send")),
        "duration_ms": _ms(record.duration),
    }


def readable(entry: dict[str, Any]) -> str:
    """The text form of an access log entry: status and method first, then ``key=value``."""
    words = [entry["status"], f"{entry['protocol']}/{entry['method']}"]
    for key, value in entry.items():
        if key in ("status", "protocol", "method"):
            continue
        if value is None or value == "":
            value = "-"
        elif isinstance(value, str) and (" " in value or '"' in value):
            value = '"' + value.replace('"', '\\"') + '"'
        words.append(f"{key}={value}")
    return " ".join(words)


class AccessLog(Observer):
    """Logs each finished call that arrived at this process (see the module)."""

    def finished(self, record: CallRecord) -> None:
        if record.from_sibling or not logger.isEnabledFor(logging.INFO):
            return
        entry = fields(record)
        logger.info("%s", readable(entry), extra={"access": entry})
