"""``--tracing``: OpenTelemetry spans of each call, with the caller's W3C trace context, collected
by the SDK's in-memory exporter from a real server running in this process."""

from __future__ import annotations

import time

import grpc
import layergrad
import pytest
from conftest import encode, make_rgb
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad_server import config as config_module
from layergrad_server.engine import WeightsSource
from layergrad_server.observability.tracing import tracing_requested
from layergrad_server.server import GradientServer
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exporter():
    found = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(found))
    return found


@pytest.fixture(scope="module")
def traced_server(weights_file, exporter):
    args = config_module.build_parser().parse_args(
        ["--address", "127.0.0.1:0", "--tracing", "--no-access-log"]
    )
    server = GradientServer(config_module.from_args(args))
    try:
        server.start()
        server.load(WeightsSource(source=str(weights_file), pretrained=False, npz_path=str(weights_file)))
        yield server
    finally:
        server.stop(0)


def spans_of(exporter: InMemorySpanExporter, request_id: str) -> tuple[object, list[object]]:
    """The server span of the call with ``request_id`` and its children. The server ends the
    span once the call is over on its side, which may come just after the caller has its
    answer: waited for (without a bound on how long the server takes, up to a minute)."""
    give_up = time.monotonic() + 60
    while True:
        spans = exporter.get_finished_spans()
        calls = [s for s in spans if s.attributes.get("layergrad.request_id") == request_id]
        if calls or time.monotonic() > give_up:
            break
        time.sleep(0.05)
    (call,) = calls
    children = [s for s in spans if s.parent is not None and s.parent.span_id == call.context.span_id]
    return call, sorted(children, key=lambda s: s.start_time)


def test_a_call_is_a_server_span_in_the_callers_trace_with_admission_compute_and_send(
    traced_server, exporter
):
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    request = pb.StreamGradientsRequest(
        inputs=[pb.Input(encoded_image=encode(make_rgb(2), "PNG"))],
        loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[7])),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(input=True),
    )
    metadata = (("traceparent", traceparent), ("x-request-id", "traced-1"))
    with grpc.insecure_channel(traced_server.address) as channel:
        stream = pb_grpc.GradientServiceStub(channel).StreamGradients(request, metadata=metadata, timeout=300)
        assert len(list(stream)) > 0
    span, children = spans_of(exporter, "traced-1")
    assert span.name == "layergrad_v1/StreamGradients" and span.kind == trace.SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == CALLER_TRACE
    assert format(span.parent.span_id, "016x") == CALLER_SPAN
    assert span.attributes["layergrad.model"] == "vgg16" and span.attributes["layergrad.targets"] == "input"
    assert span.attributes["rpc.grpc.status_code"] == 0 and span.status.is_ok
    assert [child.name for child in children] == ["admission", "compute", "send"]
    for child in children:
        assert span.start_time <= child.start_time <= child.end_time <= span.end_time
    compute = children[1]
    assert compute.end_time - compute.start_time > 0


def test_a_refused_call_without_trace_context_starts_its_own_trace_and_is_an_error(traced_server, exporter):
    with layergrad.Client(traced_server.address, timeout=300) as client:
        with pytest.raises(layergrad.InvalidArgument) as refused:
            client.predict(make_rgb(3), layers=["conv0_0"], request_id="traced-2")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    span, children = spans_of(exporter, "traced-2")
    assert span.parent is None and format(span.context.trace_id, "032x") != CALLER_TRACE
    assert not span.status.is_ok and span.attributes["layergrad.reason"] == "UNKNOWN_LAYER"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert children == []


def test_the_standard_opentelemetry_variables_turn_tracing_on():
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert not tracing_requested(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    )
    assert not tracing_requested({})
    parse = config_module.build_parser().parse_args
    assert config_module.from_args(parse(["--tracing"])).tracing
    assert not config_module.from_args(parse(["--no-tracing"])).tracing
