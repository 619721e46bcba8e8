"""OpenTelemetry spans of each call (``--tracing``; the ``tracing`` extra installs the SDK).

Each call that arrived at this process becomes a server span ``<protocol>/<method>`` (for
example ``layergrad_v1/StreamGradients``) with a child span per phase it went through:
``admission`` (waiting for a compute slot), ``compute`` and ``send`` (see ``context``). The
spans are made when the call ends, from the times its record holds, so tracing adds nothing
to a call while it runs. A caller's W3C trace context (``traceparent``, ``tracestate``
metadata) makes the call's span a child of the caller's.

Spans go to the global tracer provider. When none is set up (``opentelemetry-instrument``
or an embedding program may set one), ``--tracing`` sets up the SDK's, named by
``$OTEL_SERVICE_NAME`` (default ``layergrad-server``), exporting to what
``$OTEL_TRACES_EXPORTER`` names: ``otlp`` (the default; needs an OTLP exporter package, which
reads ``$OTEL_EXPORTER_OTLP_ENDPOINT``) or ``console`` (JSON on stdout).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from layergrad_server.observability import Observer
from layergrad_server.observability.context import CallRecord

logger = logging.getLogger(__name__)

TRACE_CONTEXT_KEYS = ("traceparent", "tracestate")
SCOPE = "layergrad_server"


def tracing_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces (an exporter or endpoint set)."""
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            return None
    return OTLPSpanExporter()


def configure_provider() -> Any:
    """Sets up the SDK's tracer provider and exporter unless a provider is set up already; the
    provider set up (to shut down, which sends the spans still buffered), or None."""
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("--tracing: opentelemetry-sdk is not installed (pip install '.[tracing]'); no spans")
        return None
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower() or "otlp"
    exporter = _exporter(name)
    if exporter is None:
        logger.warning(
            "--tracing: no exporter for OTEL_TRACES_EXPORTER=%s (install opentelemetry-exporter-otlp, "
            "or use console); no spans",
            name,
        )
        return None
    service = os.environ.get("OTEL_SERVICE_NAME", "layergrad-server")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    logger.info("tracing: spans of every call to the %s exporter", name)
    return provider


class Tracing(Observer):
    """Makes each finished call's spans (see the module)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._tracer = trace.get_tracer(SCOPE, tracer_provider=tracer_provider)
        self._propagator = TraceContextTextMapPropagator()

    def finished(self, record: CallRecord) -> None:
        if record.from_sibling:  # traced where it arrived
            return
        trace = self._trace

        def wall_ns(monotonic: float) -> int:
            return int((record.arrived + (monotonic - record.started)) * 1e9)

        parent = self._propagator.extract(record.trace_context)
        end = record.started + record.duration
        span = self._tracer.start_span(
            f"{record.protocol}/{record.method}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=wall_ns(record.started),
            attributes={
                "rpc.system": "grpc",
                "rpc.method": record.method,
                "rpc.grpc.status_code": _status_number(record.code),
                "layergrad.protocol": record.protocol,
                "layergrad.request_id": record.request_id,
                "layergrad.model": record.model,
                "layergrad.pattern": record.pattern,
                "layergrad.targets": record.targets,
                "layergrad.batch": record.batch,
                "layergrad.reason": record.reason,
                "layergrad.response_bytes": record.bytes_sent,
            },
        )
        if record.code != "OK":
            span.set_status(trace.Status(trace.StatusCode.ERROR, record.reason or record.code))
        context = trace.set_span_in_context(span)
        for name, start, stop in _intervals(record):
            child = self._tracer.start_span(name, context=context, start_time=wall_ns(start))
            child.end(end_time=wall_ns(stop))
        span.end(end_time=wall_ns(end))


def _intervals(record: CallRecord) -> list[tuple[str, float, float]]:
    """(span name, monotonic start, monotonic end) of the phases the call went through here."""
    if record.computed_at is None:
        return []
    compute = record.compute_seconds or 0.0
    queue = record.queue_seconds or 0.0
    computing = record.computed_at - compute
    found = [("admission", computing - queue, computing), ("compute", computing, record.computed_at)]
    if record.send_seconds is not None:
        found.append(("send", record.computed_at, record.computed_at + record.send_seconds))
    return found


def _status_number(code: str) -> int:
    import grpc

    return getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN).value[0]
