"""``--workers N``: several server processes on one port, each with its own model."""

from __future__ import annotations

import pathlib
import signal
import threading
import time

import layergrad
import numpy as np
import pytest
from conftest import make_rgb
from layergrad_server import config as config_module
from layergrad_server.launch import ServerProcess


def children_of(pid: int) -> list[int]:
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def worker_server(weights_file, tmp_path_factory):
    log = tmp_path_factory.mktemp("workers") / "server.log"
    flags = ["--workers", "2", "--blas-threads", "1", "--grace", "60"]
    process = ServerProcess(["--weights", str(weights_file), *flags], log)
    try:
        process.wait_serving()
        yield process
    finally:
        process.terminate()


def test_default_worker_count_is_one_on_two_cpus_and_grows_with_the_machine():
    assert config_module.default_workers(1) == 1
    assert config_module.default_workers(2) == 1
    assert config_module.default_workers(8) == 4
    assert config_module.default_workers(64) == 4
    args = config_module.build_parser().parse_args(["--workers", "3"])
    config = config_module.from_args(args)
    assert config.workers == 3 and config.blas_threads >= 1


def test_parent_waits_for_every_worker_before_announcing_the_port(worker_server):
    log = worker_server.log()
    assert "listening on" in log and "(2 workers serving, 1 BLAS thread(s) each)" in log
    assert "worker 0 serving" in log and "worker 1 serving" in log
    assert len(children_of(worker_server.process.pid)) == 2


def test_concurrent_clients_get_exactly_their_own_gradients_from_the_workers(worker_server, client):
    """Four clients (four channels, spread over the workers) against the single-process server."""
    images = [make_rgb(10 + i) for i in range(4)]
    losses = [layergrad.ClassScore("fc8", [i * 7]) for i in range(4)]
    expected = [client.input_gradient(image, loss) for image, loss in zip(images, losses, strict=True)]
    expected_param = client.parameter_gradients(images[0], losses[0], ["fc8/b"])["fc8/b"]
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        try:
            with layergrad.Client(worker_server.address, timeout=300) as sdk:
                barrier.wait()
                got[i] = [sdk.input_gradient(images[i], losses[i]) for _ in range(2)]
                if i == 0:
                    got[i].append(sdk.parameter_gradients(images[0], losses[0], ["fc8/b"])["fc8/b"])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(4):
        for array in got[i][:2]:
            np.testing.assert_array_equal(array, expected[i])
    np.testing.assert_array_equal(got[0][2], expected_param)


def test_sigterm_lets_calls_in_flight_finish_then_every_worker_and_the_parent_exit_zero(worker_server):
    """Runs last in this module: it stops the module's server."""
    workers = children_of(worker_server.process.pid)
    outcome: dict[str, object] = {}

    def call() -> None:
        with layergrad.Client(worker_server.address, timeout=300, retry=False) as sdk:
            try:
                outcome["result"] = sdk.parameter_gradients(make_rgb(1), layergrad.SumOfSquares("fc8"), "all")
            except layergrad.LayergradError as error:
                outcome["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)  # the call is computing
    worker_server.process.send_signal(signal.SIGTERM)
    thread.join(120)
    assert worker_server.process.wait(120) == 0
    assert "error" not in outcome, outcome.get("error")
    assert len(outcome["result"]) == 32
    log = worker_server.log()
    assert "received SIGTERM; stopping the workers" in log and "all workers stopped" in log
    assert not [pid for pid in workers if pathlib.Path(f"/proc/{pid}").exists()]
