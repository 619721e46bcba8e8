"""Runs ``layergrad-server`` as a child process on a free loopback port.

Used by the tests, the demo and the benchmark; handy for notebooks too::

    with ServerProcess(["--weights", "random:0"], log_path) as server:
        server.wait_serving()
        ...  # layergrad.Client(server.address)
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServerProcess:
    """A ``python -m layergrad_server`` child listening on 127.0.0.1:<free port>."""

    def __init__(
        self,
        args: list[str],
        log_path: pathlib.Path,
        env: dict[str, str] | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Starts the server; ``credentials`` are those health checks connect with (TLS servers)."""
        self.log_path = log_path
        self.credentials = credentials
        self._log = open(log_path, "wb")
        child_env = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "layergrad_server", "--address", "127.0.0.1:0", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env,
        )
        self.address = f"127.0.0.1:{self._wait_for_port()}"

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on [\d.]+:(\d+)", self.log())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not report its port:\n{self.log()}")

    def health(self, service: str = "") -> int:
        if self.credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, self.credentials)
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"server not SERVING after {timeout}s:\n{self.log()}")

    def terminate(self, timeout: float = 60.0) -> int:
        """Sends SIGTERM and returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
