"""Waiting for a server that is still loading its model: per call, ``Client.wait_for_ready`` and ``--wait``.

One real server is started and used while it loads (it listens at once, answers
health NOT_SERVING and compute calls UNAVAILABLE reason MODEL_LOADING until its
model is loaded and warmed up, which takes seconds).
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import threading

import layergrad
import numpy as np
import pytest
from conftest import encode, make_rgb
from grpc_health.v1 import health_pb2
from layergrad_server.launch import ServerProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CLI = [sys.executable, "-m", "layergrad.cli"]


def test_calls_made_while_the_model_loads_succeed_when_they_wait(
    weights_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    image = make_rgb(3)
    image_path = tmp_path / "image.png"
    image_path.write_bytes(encode(image, "PNG"))
    server = ServerProcess(["--weights", str(weights_file)], tmp_path / "server.log")
    try:
        # Returned once the server listens: the model is loading (seconds of work ahead).
        assert server.health(layergrad.client.SERVICE_NAME) == NOT_SERVING
        with layergrad.Client(server.address, retry=False) as impatient:
            with pytest.raises(layergrad.Unavailable) as refused:
                impatient.predict(image)
        assert refused.value.reason == "MODEL_LOADING"

        cli = subprocess.Popen(
            [*CLI, "--target", server.address, "--wait", "--timeout", "300", "predict", str(image_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        statuses: list[int] = []

        def wait_then_look() -> None:
            with layergrad.Client(server.address) as waiter:
                waiter.wait_for_ready(timeout=300)
                statuses.append(server.health(layergrad.client.SERVICE_NAME))

        waiting = threading.Thread(target=wait_then_look)
        waiting.start()
        with layergrad.Client(server.address, timeout=300) as client:
            prob = client.predict(image, wait_for_ready=True)["prob"]
        waiting.join(300)
        stdout, stderr = cli.communicate(timeout=300)
    finally:
        server.terminate()
    assert prob.shape == (1, 1000)
    np.testing.assert_allclose(prob.sum(), 1.0, rtol=1e-5)
    assert statuses == [SERVING]  # wait_for_ready returned only once the server served
    assert cli.returncode == 0, stderr
    assert f"1. class {int(prob[0].argmax()):>4}" in stdout


def test_client_waiting_by_default_needs_no_per_call_flag(
    weights_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    server = ServerProcess(["--weights", str(weights_file)], tmp_path / "server.log")
    try:
        assert server.health(layergrad.client.SERVICE_NAME) == NOT_SERVING
        with layergrad.Client(server.address, timeout=300, wait_for_ready=True) as client:
            info = client.model_info()
            grads = client.parameter_gradients(make_rgb(4), layergrad.SumOfSquares("prob"), ["fc8/b"])
    finally:
        server.terminate()
    assert info.max_batch_size > 0
    assert grads["fc8/b"].shape == (1000,)


def test_wait_for_ready_gives_up_at_its_deadline_when_nothing_listens() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with layergrad.Client(f"127.0.0.1:{port}") as client:
        with pytest.raises(layergrad.DeadlineExceeded, match="not ready"):
            client.wait_for_ready(timeout=1.0)
        with pytest.raises(layergrad.DeadlineExceeded):
            client.predict(make_rgb(5), timeout=1.0, wait_for_ready=True)
