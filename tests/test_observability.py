"""Request ids, server timings, the access log and /metrics, seen from outside: a real server
(bearer tokens, JSON logs, metrics on a free port) and the real SDK."""

from __future__ import annotations

import json
import re
import time

import grpc
import layergrad
import numpy as np
import pytest
from conftest import make_rgb, metric_delta, metrics_url, scrape, serving
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad.losses import ClassScore
from layergrad_server.observability.access_log import LOGGER_NAME, fields, readable
from layergrad_server.observability.context import (
    CallRecord,
    format_server_timing,
    new_request_id,
    parse_server_timing,
    valid_request_id,
)

LAB_TOKEN = "obs-lab-secret-7f3a91"
VIEWER_TOKEN = "obs-viewer-secret-c2d84e"
TOKENS = f"{LAB_TOKEN} *  # lab\n{VIEWER_TOKEN} predict  # viewer\n"
ACCESS_FIELDS = {
    "time",
    "level",
    "logger",
    "request_id",
    "peer",
    "token",
    "protocol",
    "method",
    "model",
    "pattern",
    "targets",
    "batch",
    "status",
    "reason",
    "bytes",
    "queue_ms",
    "compute_ms",
    "send_ms",
    "duration_ms",
}
LOSS = ClassScore("fc8", classes=[3])


@pytest.fixture(scope="module")
def observed(weights_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("observed")
    (folder / "tokens").write_text(TOKENS)
    args = [
        "--weights",
        str(weights_file),
        "--tokens-file",
        str(folder / "tokens"),
        "--metrics-address",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]
    with serving(args, folder) as process:
        yield process


def access_lines(process) -> list[dict]:
    entries = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == LOGGER_NAME:
                entries.append(entry)
    return entries


def test_a_known_set_of_calls_is_logged_once_each_and_counted_exactly(observed):
    url = metrics_url(observed)
    before = scrape(url)
    image = make_rgb(5)
    with layergrad.Client(observed.address, timeout=300, token=LAB_TOKEN) as lab:
        predicted = lab.predict(image, request_id="obs-predict-1")
        streamed = lab.gradients(image, LOSS, input=True, request_id="obs-grad-1")
        with pytest.raises(layergrad.InvalidArgument) as invalid:
            lab.gradients(image, LOSS, layers=["conv9_9"], request_id="obs-invalid-1")
    with layergrad.Client(observed.address, timeout=300, token=VIEWER_TOKEN) as viewer:
        with pytest.raises(layergrad.PermissionDenied) as denied:
            viewer.gradients(image, LOSS, input=True, request_id="obs-denied-1")
    with layergrad.Client(observed.address, timeout=300) as anonymous:
        with pytest.raises(layergrad.Unauthenticated) as unauthenticated:
            anonymous.predict(image)
    with grpc.insecure_channel(observed.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        with pytest.raises(grpc.RpcError) as bad_id:
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("x-request-id", "two words"),), timeout=30)

    # The SDK reports each call's request id and the server's timings.
    assert predicted.request_id == "obs-predict-1" and predicted["prob"].shape == (1, 1000)
    assert streamed.request_id == "obs-grad-1" and streamed.input.shape == (1, 3, 224, 224)
    for result in (predicted, streamed):
        assert set(result.timings) == {"queue", "compute", "send"}
        assert result.timings["compute"] > 0 and min(result.timings.values()) >= 0
    assert invalid.value.request_id == "obs-invalid-1" and invalid.value.reason == "UNKNOWN_LAYER"
    assert denied.value.request_id == "obs-denied-1"
    generated = unauthenticated.value.request_id
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert unauthenticated.value.error_info.metadata["request_id"] == generated
    assert unauthenticated.value.timings == {"queue": 0.0, "compute": 0.0, "send": 0.0}
    assert bad_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-id" in bad_id.value.details()
    replaced = dict(bad_id.value.trailing_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)

    # One access log line each, with the right fields.
    ids = ["obs-predict-1", "obs-grad-1", "obs-invalid-1", "obs-denied-1", generated, replaced]
    # A call's line is written once the call is over on the server's side, which can come just
    # after the caller has its answer: wait for the lines (the server's pace, up to a minute).
    give_up = time.monotonic() + 60
    while not set(ids) <= {entry["request_id"] for entry in access_lines(observed)}:
        assert time.monotonic() < give_up, "access log lines missing"
        time.sleep(0.05)
    lines = {entry["request_id"]: entry for entry in access_lines(observed)}
    assert [sum(e["request_id"] == i for e in access_lines(observed)) for i in ids] == [1] * 6
    for entry in lines.values():
        assert set(entry) == ACCESS_FIELDS and entry["protocol"] == "layergrad_v1"
        assert entry["peer"].startswith("ipv4:127.0.0.1:")
    expected = {
        "obs-predict-1": ("Predict", "OK", "", "lab", "vgg16", "", "layers:prob"),
        "obs-grad-1": ("StreamGradients", "OK", "", "lab", "vgg16", "grad", "input"),
        "obs-invalid-1": (
            "StreamGradients",
            "INVALID_ARGUMENT",
            "UNKNOWN_LAYER",
            "lab",
            "vgg16",
            "grad",
            "layers:conv9_9",
        ),
        "obs-denied-1": (
            "StreamGradients",
            "PERMISSION_DENIED",
            "MISSING_SCOPE",
            "viewer",
            "vgg16",
            "grad",
            "input",
        ),
        generated: ("Predict", "UNAUTHENTICATED", "MISSING_TOKEN", "", "", "", ""),
        replaced: ("GetModelInfo", "INVALID_ARGUMENT", "INVALID_REQUEST_ID", "", "", "", ""),
    }
    for request_id, (method, status, reason, token, model, pattern, targets) in expected.items():
        entry = lines[request_id]
        got = tuple(
            entry[key] for key in ("method", "status", "reason", "token", "model", "pattern", "targets")
        )
        assert got == (
            method,
            status,
            reason,
            token,
            model,
            pattern,
            targets,
        ), entry
    for request_id in ("obs-predict-1", "obs-grad-1"):
        entry = lines[request_id]
        assert entry["batch"] == 1 and entry["bytes"] > 0 and entry["compute_ms"] > 0
        assert entry["queue_ms"] >= 0 and entry["send_ms"] >= 0
    assert lines["obs-grad-1"]["bytes"] > 3 * 224 * 224 * 4
    for request_id in ("obs-invalid-1", "obs-denied-1", generated, replaced):
        entry = lines[request_id]
        assert entry["bytes"] == 0 and entry["compute_ms"] is None
    # No token, in any line of the log.
    assert LAB_TOKEN not in observed.log() and VIEWER_TOKEN not in observed.log()

    # /metrics counted exactly these calls.
    after = scrape(url)
    total = "layergrad_requests_total"
    v1 = {"protocol": "layergrad_v1"}
    assert (
        metric_delta(before, after, total, **v1, method="Predict", model="vgg16", pattern="", code="OK") == 1
    )
    assert (
        metric_delta(
            before, after, total, **v1, method="StreamGradients", model="vgg16", pattern="grad", code="OK"
        )
        == 1
    )
    grad_invalid = {
        "method": "StreamGradients",
        "model": "vgg16",
        "pattern": "grad",
        "code": "INVALID_ARGUMENT",
    }
    assert metric_delta(before, after, total, **v1, **grad_invalid) == 1
    denied_labels = {
        "method": "StreamGradients",
        "model": "vgg16",
        "pattern": "grad",
        "code": "PERMISSION_DENIED",
    }
    assert metric_delta(before, after, total, **v1, **denied_labels) == 1
    assert (
        metric_delta(
            before, after, total, **v1, method="Predict", model="", pattern="", code="UNAUTHENTICATED"
        )
        == 1
    )
    info_invalid = {"method": "GetModelInfo", "model": "", "pattern": "", "code": "INVALID_ARGUMENT"}
    assert metric_delta(before, after, total, **v1, **info_invalid) == 1
    counted = sum(value for (name, _), value in after.items() if name == total)
    assert counted - sum(value for (name, _), value in before.items() if name == total) == 6
    refusals = "layergrad_refusals_total"
    assert (
        metric_delta(
            before, after, refusals, **v1, method="StreamGradients", model="vgg16", reason="UNKNOWN_LAYER"
        )
        == 1
    )
    assert (
        metric_delta(
            before, after, refusals, **v1, method="StreamGradients", model="vgg16", reason="MISSING_SCOPE"
        )
        == 1
    )
    assert (
        metric_delta(before, after, refusals, **v1, method="Predict", model="", reason="MISSING_TOKEN") == 1
    )
    assert (
        metric_delta(
            before, after, refusals, **v1, method="GetModelInfo", model="", reason="INVALID_REQUEST_ID"
        )
        == 1
    )
    phase = "layergrad_request_phase_seconds_count"
    for method in ("Predict", "StreamGradients"):
        for name in ("queue", "compute", "send"):
            assert metric_delta(before, after, phase, **v1, method=method, model="vgg16", phase=name) == 1
    sent = "layergrad_response_bytes_total"
    for request_id, method in (("obs-predict-1", "Predict"), ("obs-grad-1", "StreamGradients")):
        assert (
            metric_delta(before, after, sent, **v1, method=method, model="vgg16")
            == lines[request_id]["bytes"]
        )
    duration = "layergrad_request_duration_seconds_count"
    assert metric_delta(before, after, duration, **v1, method="StreamGradients", model="vgg16") == 3
    assert after[("layergrad_calls_in_flight", frozenset(v1.items()))] == 0
    assert after[("layergrad_queue_depth", frozenset())] == 0
    assert after[("layergrad_model_load_seconds", frozenset({("model", "vgg16")}))] > 0
    assert after[("layergrad_resident_memory_bytes", frozenset({("process", "server")}))] > 100 << 20


def test_every_response_carries_its_request_id_and_server_timing(observed):
    with grpc.insecure_channel(observed.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        auth = (("authorization", f"Bearer {LAB_TOKEN}"),)
        _, call = stub.GetModelInfo.with_call(
            pb.GetModelInfoRequest(), metadata=(*auth, ("x-request-id", "obs-info-1")), timeout=30
        )
        assert ("x-request-id", "obs-info-1") in tuple(call.initial_metadata())
        trailers = dict(call.trailing_metadata())
        assert trailers["x-request-id"] == "obs-info-1"
        assert list(parse_server_timing(trailers["server-timing"])) == ["queue", "compute", "send"]
        # Without an id of the caller's, the server makes one; the stream's trailers carry it too.
        request = pb.StreamGradientsRequest(
            inputs=[pb.Input(encoded_image=b"not an image")],
            loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[1])),
            pattern=pb.BACKWARD_PATTERN_GRAD,
            targets=pb.GradientTargets(input=True),
        )
        stream = stub.StreamGradients(request, metadata=auth, timeout=60)
        with pytest.raises(grpc.RpcError) as failed:
            list(stream)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        made = dict(failed.value.trailing_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        assert layergrad.from_grpc_error(failed.value).request_id == made


def test_the_readable_access_line_names_the_call():
    record = CallRecord("layergrad_v1", "Predict", "abc-1", peer="ipv4:127.0.0.1:5", token_name="lab")
    record.model, record.targets, record.batch, record.bytes_sent = "vgg16", "input layers:fc7", 2, 10
    record.admitted(0.001, 0.5)
    record.sent()
    record.finished = record.started + 0.6
    line = readable(fields(record))
    assert line.startswith(
        "OK layergrad_v1/Predict request_id=abc-1 peer=ipv4:127.0.0.1:5 token=lab model=vgg16"
    )
    assert 'targets="input layers:fc7" batch=2 reason=- bytes=10 queue_ms=1.0 compute_ms=500.0' in line
    assert line.endswith("duration_ms=600.0")
    assert np.isclose(fields(record)["duration_ms"], 600.0)


def test_request_ids_and_server_timing_values_are_checked_and_read_back():
    assert valid_request_id("job-17") and valid_request_id("x" * 128)
    for bad in ("", "x" * 129, "two words", "tab\there", b"bytes", None):
        assert not valid_request_id(bad)
    assert re.fullmatch(r"[0-9a-f]{32}", new_request_id()) and new_request_id() != new_request_id()
    timing = format_server_timing({"queue": 0.0012, "compute": 0.53, "send": 0.0031})
    assert timing == "queue;dur=1.2, compute;dur=530.0, send;dur=3.1"
    assert parse_server_timing(timing + ", junk, pre;dur=2") == {
        "queue": 0.0012,
        "compute": 0.53,
        "send": 0.0031,
        "pre": 0.002,
    }
    refused = CallRecord("layergrad_v1", "Predict", "r")
    assert refused.phases() == {} and refused.phases(all_phases=True) == {"queue": 0, "compute": 0, "send": 0}
    relayed = CallRecord("layergrad_v1", "Predict", "r", relayed={"queue": 0.1, "compute": 2.0, "send": 0.3})
    assert relayed.phases() == {"queue": 0.1, "compute": 2.0, "send": 0.3}
