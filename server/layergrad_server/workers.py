"""``--workers N``: N server processes sharing one port, under a supervising parent.

Chainer computes one call at a time per process (parameters' ``.grad`` is shared
state), so on a machine with more cores than one backward pass can use, more
processes serve more calls per second. The parent:

* picks the port (binding once when ``--address`` has port 0) and keeps that
  socket bound, without listening, so no other program takes the port while
  workers start or restart;
* starts each worker as a fresh ``python -m layergrad_server`` process with
  ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set to
  ``--blas-threads`` (read by the BLAS library when numpy is first imported);
* waits until every worker has loaded and warmed up its model and listens on the
  port (each with ``SO_REUSEPORT``; the kernel spreads new connections over them),
  then logs ``listening on HOST:PORT``;
* restarts a worker that dies after it was serving, and stops everything when one
  fails to start;
* on SIGTERM or SIGINT forwards SIGTERM, lets each worker drain its calls within
  ``--grace`` and exits 0 once all have exited cleanly.

Each worker has its own admission control, queue and health status. A gRPC
channel holds one connection, so one client talks to one worker: spreading load
needs several channels (several ``layergrad.Client`` objects). Workers follow the
parent: if it dies they get SIGTERM (Linux ``PR_SET_PDEATHSIG``).

Imports neither gRPC nor Chainer: the parent stays small.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from layergrad_server.config import ServerConfig

logger = logging.getLogger(__name__)

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
READY = b"ready\n"
# Extra seconds a worker gets beyond the grace period before it is killed.
KILL_AFTER_GRACE_SECONDS = 30.0
RESTART_DELAY_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reserve_port(address: str) -> socket.socket:
    """A socket bound (not listening) to ``address`` with SO_REUSEPORT, so workers can bind it too."""
    host, port = split_address(address)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    reservation = socket.socket(family, kind, proto)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind(sockaddr)
    return reservation


def follow_parent() -> None:
    """In a worker: be sent SIGTERM when the supervising parent dies (Linux only)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def report_ready(fd: int) -> None:
    """In a worker: tells the parent that this worker serves."""
    os.write(fd, READY)
    os.close(fd)


@dataclasses.dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # our end of the readiness pipe, until it reports
    ready: bool = False
    served: bool = False  # reported ready at least once


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, config: ServerConfig, argv: list[str]) -> None:
        self.config = config
        self._argv = argv
        self._reservation = reserve_port(config.address)
        host, _ = split_address(config.address)
        self.address = join_address(host, self._reservation.getsockname()[1])
        self._env = {**os.environ, **dict.fromkeys(BLAS_THREAD_VARIABLES, str(config.blas_threads))}
        self._workers = [_Worker(i) for i in range(config.workers)]
        self._stop = threading.Event()
        self._exit_codes_clean = True

    def request_stop(self) -> None:
        self._stop.set()

    def _start(self, worker: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        command = [
            sys.executable,
            "-m",
            "layergrad_server",
            *self._argv,
            "--address",
            self.address,
            "--workers",
            "1",
            "--blas-threads",
            str(self.config.blas_threads),
            "--worker-ready-fd",
            str(write_fd),
            "--worker-index",
            str(worker.index),
        ]
        try:
            worker.process = subprocess.Popen(command, env=self._env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        worker.ready_fd, worker.ready = read_fd, False
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def run(self) -> int:
        """Serves until asked to stop; returns the exit code."""
        logger.info(
            "starting %d workers on %s, %d BLAS thread(s) each",
            len(self._workers),
            self.address,
            self.config.blas_threads,
        )
        for worker in self._workers:
            self._start(worker)
        announced = False
        try:
            while not self._stop.is_set():
                self._read_ready()
                if not announced and all(w.ready for w in self._workers):
                    announced = True
                    logger.info(
                        "listening on %s (%d workers serving, %d BLAS thread(s) each)",
                        self.address,
                        len(self._workers),
                        self.config.blas_threads,
                    )
                failed = self._check_exits()
                if failed is not None:
                    return failed
        finally:
            self._shutdown()
        return 0 if self._exit_codes_clean else 1

    def _read_ready(self) -> None:
        pending = {w.ready_fd: w for w in self._workers if w.ready_fd is not None}
        if not pending:
            self._stop.wait(0.5)
            return
        try:
            readable, _, _ = select.select(list(pending), [], [], 0.5)
        except InterruptedError:
            return
        for fd in readable:
            worker = pending[fd]
            data = os.read(fd, 64)
            os.close(fd)
            worker.ready_fd = None
            if data == READY:
                worker.ready = worker.served = True
                logger.info("worker %d serving", worker.index)

    def _check_exits(self) -> int | None:
        """Restarts a worker that died after serving; an exit code if one failed to start."""
        for worker in self._workers:
            assert worker.process is not None
            code = worker.process.poll()
            if code is None or self._stop.is_set():
                continue
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
                worker.ready_fd = None
            if not worker.served:
                logger.error("worker %d exited with %d before serving; stopping", worker.index, code)
                return code or 1
            logger.error("worker %d exited with %d; restarting it", worker.index, code)
            time.sleep(RESTART_DELAY_SECONDS)
            self._start(worker)
        return None

    def _shutdown(self) -> None:
        running = [w for w in self._workers if w.process is not None and w.process.poll() is None]
        for worker in running:
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds + KILL_AFTER_GRACE_SECONDS
        self._exit_codes_clean = True
        for worker in self._workers:
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
                worker.ready_fd = None
            if worker.process is None:
                continue
            try:
                code = worker.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logger.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                code = worker.process.wait()
            if worker in running and code != 0:
                self._exit_codes_clean = False
                logger.error("worker %d exited with %d", worker.index, code)
        self._reservation.close()
        logger.info("all workers stopped")
