"""``--workers N``: N server processes sharing one port, under a supervising parent.

Chainer computes one call at a time per process (parameters' ``.grad`` is shared
state), so on a machine with more cores than one backward pass can use, more
processes serve more calls per second. The parent:

* picks the port (binding once when ``--address`` has port 0) and keeps that
  socket bound, without listening, so no other program takes the port while
  workers start or restart;
* creates a private directory (mode 0700) holding the group's ``LoadTable`` and
  each worker's unix socket;
* starts each worker as a fresh ``python -m layergrad_server`` process with
  ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set to
  ``--blas-threads`` (default CPUs / workers), read by the BLAS library when
  numpy is first imported;
* waits until every worker has loaded and warmed up its model and listens on the
  port (each with ``SO_REUSEPORT``; the kernel spreads new connections over them),
  then logs ``listening on HOST:PORT``;
* restarts a worker that dies after it was serving (clearing its entries in the
  load table), and stops everything when one fails to start;
* on SIGTERM or SIGINT forwards SIGTERM, lets each worker drain its calls within
  ``--grace`` and exits 0 once all have exited cleanly;
* with ``--metrics-address``, serves ``/metrics``: the sum of the workers' metrics, which
  each writes into files of a directory of the group (``$PROMETHEUS_MULTIPROC_DIR``, see
  ``observability.metrics``), plus every process's resident memory.

Dispatch (``--worker-dispatch``). The kernel assigns whole connections, at random,
and a gRPC channel holds one connection, so a few clients can all land on one
worker while another idles. With ``least-loaded`` (the default) a worker that
receives a compute call while it already has calls in flight hands the call to
the sibling with the fewest calls in flight, if that one has fewer, over the
sibling's unix socket (``forwarding``); results stream through without being
held whole. Calls arriving on a unix socket are never handed on. ``connection``
leaves the kernel's spread alone.

BLAS threads stay fixed per worker. OpenBLAS splits a matrix product among its
threads in a way that changes the rounding of some results (measured: the
``conv4_*/W`` gradients of VGG16 differ by up to 4.4e-7 relative between one and
two threads), so a worker's results depend only on the request and on its thread
count, never on what other calls are running: a group with one BLAS thread per
worker returns exactly what a single ``--blas-threads 1`` server returns.

Each worker has its own admission control, queue and health status; with
``least-loaded`` a call is refused as overloaded only when no sibling has room
either. Workers follow the parent: if it dies they get SIGTERM (Linux
``PR_SET_PDEATHSIG``).

Imports neither gRPC nor Chainer: the parent stays small.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import mmap
import os
import pathlib
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from layergrad_server.config import LEAST_LOADED, ServerConfig, usable_cpus

logger = logging.getLogger(__name__)

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
READY = b"ready\n"
# Extra seconds a worker gets beyond the grace period before it is killed.
KILL_AFTER_GRACE_SECONDS = 30.0
RESTART_DELAY_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1
TABLE_FILE = "load"


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


def socket_path(directory: str, index: int) -> str:
    """The unix socket on which worker ``index`` takes calls handed on by its siblings."""
    return os.path.join(directory, f"worker-{index}.sock")


# Longest unix socket path Linux takes (sun_path is 108 bytes, NUL included).
_MAX_SOCKET_PATH = 107


def private_directory(workers: int) -> str:
    """A new mode 0700 directory for the group's load table and sockets: under $TMPDIR, or
    /tmp when a socket path there would be too long."""
    directory = tempfile.mkdtemp(prefix="layergrad-workers-")
    if len(socket_path(directory, workers - 1)) > _MAX_SOCKET_PATH:
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="layergrad-workers-", dir="/tmp")
    return directory


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


class LoadTable:
    """The workers' shared state: a small file of 64-bit counters, mapped by every process.

    For ``count`` workers it holds ``serving[j]`` (1 while worker j takes calls handed
    on by its siblings) and ``routed[r][j]`` (compute calls that arrived at worker r,
    went to worker j, ``r == j`` when r kept them, and have not finished). Every entry
    but those of a dead worker, which the parent clears, is written only by the worker
    it belongs to; ``choosing`` serialises the routing decisions of all workers.
    """

    def __init__(self, path: str | os.PathLike[str], count: int, *, create: bool = False) -> None:
        self.path = str(path)
        self.count = count
        size = (count + count * count) * 8
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self._fd = os.open(self.path, flags, 0o600)
        if create:
            os.ftruncate(self._fd, size)
        elif os.fstat(self._fd).st_size != size:
            os.close(self._fd)
            raise ValueError(f"{self.path} is not a load table for {count} workers")
        self._map = mmap.mmap(self._fd, size)
        self._cells = memoryview(self._map).cast("q")
        self._thread_lock = threading.Lock()

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self._fd)

    def serving(self, worker: int) -> bool:
        return self._cells[worker] != 0

    def set_serving(self, worker: int, serving: bool) -> None:
        self._cells[worker] = int(serving)

    def add_routed(self, router: int, target: int, delta: int) -> None:
        """Only ``router`` calls this, under its own lock."""
        self._cells[self._routed(router, target)] += delta

    def loads(self) -> list[int]:
        """Compute calls in flight at each worker, whichever worker they arrived at."""
        n = self.count
        return [sum(self._cells[self._routed(r, j)] for r in range(n)) for j in range(n)]

    def reset(self, worker: int) -> None:
        """Clears a dead worker's entries (the calls it routed died with it)."""
        self._cells[worker] = 0
        for target in range(self.count):
            self._cells[self._routed(worker, target)] = 0

    @contextlib.contextmanager
    def choosing(self) -> Iterator[None]:
        """Excludes other routing decisions, in this process and the other workers."""
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _routed(self, router: int, target: int) -> int:
        return self.count + router * self.count + target


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
        self.blas_threads = config.blas_threads or max(1, usable_cpus() // config.workers)
        self._blas_text = f"{self.blas_threads} BLAS thread(s) each"
        self._env = {**os.environ, **dict.fromkeys(BLAS_THREAD_VARIABLES, str(self.blas_threads))}
        self._directory = private_directory(config.workers)
        self._table = LoadTable(pathlib.Path(self._directory, TABLE_FILE), config.workers, create=True)
        self._workers = [_Worker(i) for i in range(config.workers)]
        self._stop = threading.Event()
        self._exit_codes_clean = True
        self._metrics_dir: str | None = None
        self._metrics_server = None
        if config.metrics_address:
            self._serve_metrics(config.metrics_address)

    def _serve_metrics(self, address: str) -> None:
        from layergrad_server.observability import metrics

        self._metrics_dir = os.path.join(self._directory, "metrics")
        os.mkdir(self._metrics_dir, 0o700)
        self._env[metrics.MULTIPROC_ENV] = self._metrics_dir
        registry = metrics.multiprocess_registry(self._metrics_dir, self._processes)
        try:
            self._metrics_server = metrics.MetricsServer(address, registry)
        except OSError:
            self._reservation.close()
            self._table.close()
            shutil.rmtree(self._directory, ignore_errors=True)
            raise
        logger.info("metrics on http://%s/metrics (all workers)", self._metrics_server.address)

    def _processes(self) -> dict[str, int]:
        """The group's processes by metrics label: this one and each running worker."""
        found = {"supervisor": os.getpid()}
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                found[f"worker-{worker.index}"] = worker.process.pid
        return found

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
            str(self.blas_threads),
            "--worker-ready-fd",
            str(write_fd),
            "--worker-index",
            str(worker.index),
            "--worker-count",
            str(len(self._workers)),
            "--worker-dir",
            self._directory,
        ]
        try:
            worker.process = subprocess.Popen(command, env=self._env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        worker.ready_fd, worker.ready = read_fd, False
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def run(self) -> int:
        """Serves until asked to stop; returns the exit code."""
        dispatch = (
            "each call to the least-loaded worker"
            if self.config.worker_dispatch == LEAST_LOADED
            else "connections spread by the kernel"
        )
        logger.info(
            "starting %d workers on %s, %s; %s",
            len(self._workers),
            self.address,
            self._blas_text,
            dispatch,
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
                        "listening on %s (%d workers serving, %s)",
                        self.address,
                        len(self._workers),
                        self._blas_text,
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
            self._table.reset(worker.index)
            if self._metrics_dir is not None:
                from layergrad_server.observability.metrics import mark_dead

                mark_dead(self._metrics_dir, worker.process.pid)
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
        self._table.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        logger.info("all workers stopped")
