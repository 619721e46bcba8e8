"""Prometheus metrics, served on ``--metrics-address`` (off by default) at ``/metrics``.

============================================ ======== ===================================================
``layergrad_requests_total``                 counter  finished calls by ``protocol``, ``method``, ``model``,
                                                      ``pattern`` and ``code`` (gRPC status code name)
``layergrad_refusals_total``                 counter  calls that ended without OK, by ``protocol``,
                                                      ``method``, ``model`` and ``reason`` (the ErrorInfo
                                                      reason: ``OVERLOADED``, ``MISSING_TOKEN``, ...)
``layergrad_request_duration_seconds``       histogram whole calls, by ``protocol``, ``method``, ``model``
``layergrad_request_phase_seconds``          histogram the same calls' ``phase``: ``queue`` (waiting for a
                                                      compute slot), ``compute``, ``send`` (see
                                                      ``context``); only phases a call went through
``layergrad_response_bytes_total``           counter  serialized response bytes sent, by ``protocol``,
                                                      ``method``, ``model``
``layergrad_calls_in_flight``                gauge    calls being handled now, by ``protocol``
``layergrad_queue_depth``                    gauge    admitted calls waiting for a compute slot
``layergrad_calls_computing``                gauge    calls holding a compute slot
``layergrad_batch_waiting``                  gauge    calls waiting to be computed in a batch with others
                                                      (``--batch-delay-ms``)
``layergrad_batches_total``                  counter  batches computed by dynamic batching (a call alone
                                                      counts as a batch of one)
``layergrad_batched_calls_total``            counter  calls computed in those batches
``layergrad_model_load_seconds``             gauge    seconds the served model took to load and warm
                                                      up, by ``model``
``layergrad_resident_memory_bytes``          gauge    resident memory, by ``process`` (``server``; under
                                                      ``--workers``: ``supervisor``, ``worker-N``)
============================================ ======== ===================================================

Calls of every protocol that goes through ``handlers`` are counted. Under ``--workers N``
each worker writes its values into files of prometheus_client's multi-process mode (the
directory is the worker group's, in ``$PROMETHEUS_MULTIPROC_DIR``) and the supervisor
serves their sum in one scrape; a call handed on from one worker to another is counted
once, by the worker it arrived at. Gauges are summed over the live workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from layergrad_server.observability import Observer
from layergrad_server.observability.context import CallRecord

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: from a cached small call to a large batch of parameter gradients on a CPU.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of a process (Linux ``/proc/<pid>/statm``), or None if unknown."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class ResidentMemory:
    """A collector of ``layergrad_resident_memory_bytes`` for the processes ``processes()`` names
    (``{label: pid}``), read at each scrape."""

    def __init__(self, processes: Callable[[], dict[str, int | str]]) -> None:
        self._processes = processes

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "layergrad_resident_memory_bytes", "Resident memory of the server's processes", labels=["process"]
        )
        for label, pid in sorted(self._processes().items()):
            size = resident_bytes(pid)
            if size is not None:
                family.add_metric([label], size)
        yield family


class Metrics(Observer):
    """The server's metrics (see the module), in ``registry`` (a new one by default)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: every series starts with the process
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        call = ("protocol", "method", "model")
        reg = self.registry
        self.requests = Counter(
            "layergrad_requests", "Finished calls", [*call, "pattern", "code"], registry=reg
        )
        self.refusals = Counter(
            "layergrad_refusals", "Calls that ended without OK, by reason", [*call, "reason"], registry=reg
        )
        self.duration = Histogram(
            "layergrad_request_duration_seconds", "Whole calls", call, buckets=BUCKETS, registry=reg
        )
        self.phase = Histogram(
            "layergrad_request_phase_seconds",
            "Time of calls in each phase: queue, compute, send",
            [*call, "phase"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.response_bytes = Counter(
            "layergrad_response_bytes", "Serialized response bytes sent", call, registry=reg
        )
        self.in_flight = Gauge(
            "layergrad_calls_in_flight",
            "Calls being handled",
            ["protocol"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            "layergrad_queue_depth",
            "Admitted calls waiting for a compute slot",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.computing = Gauge(
            "layergrad_calls_computing",
            "Calls holding a compute slot",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.waiting_in_batch = Gauge(
            "layergrad_batch_waiting",
            "Calls waiting to be computed in a batch with others",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.dynamic_batches = Counter(
            "layergrad_batches", "Batches computed by dynamic batching", registry=reg
        )
        self.batched_calls = Counter(
            "layergrad_batched_calls", "Calls computed in dynamic batches", registry=reg
        )
        self.model_load = Gauge(
            "layergrad_model_load_seconds",
            "Seconds the served model took to load and warm up",
            ["model"],
            registry=reg,
            multiprocess_mode="max",
        )

    def started(self, record: CallRecord) -> None:
        if not record.from_sibling:
            self.in_flight.labels(record.protocol).inc()

    def finished(self, record: CallRecord) -> None:
        if record.from_sibling:
            return
        self.in_flight.labels(record.protocol).dec()
        call = (record.protocol, record.method, record.model)
        self.requests.labels(*call, record.pattern, record.code).inc()
        if record.code != "OK":
            self.refusals.labels(*call, record.reason or record.code).inc()
        self.duration.labels(*call).observe(record.duration)
        for phase, seconds in record.phases().items():
            self.phase.labels(*call, phase).observe(seconds)
        if record.bytes_sent:
            self.response_bytes.labels(*call).inc(record.bytes_sent)

    def admission_changed(self, queued: int, computing: int) -> None:
        """The admission's listener: calls waiting for a slot and holding one."""
        self.queue_depth.set(queued)
        self.computing.set(computing)

    def batch_waiting(self, calls: int) -> None:
        """The batcher's listener: calls waiting in open batches."""
        self.waiting_in_batch.set(calls)

    def batch_computed(self, calls: int) -> None:
        """The batcher's listener: a batch of ``calls`` calls was computed."""
        self.dynamic_batches.inc()
        self.batched_calls.inc(calls)

    def model_loaded(self, model: str, seconds: float) -> None:
        self.model_load.labels(model).set(seconds)


def multiprocess() -> bool:
    """Whether this process writes its metrics for a supervisor to collect (a worker)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class MetricsServer:
    """``/metrics`` over HTTP on ``address`` (``host:port``; port 0: any free port)."""

    def __init__(self, address: str, registry: Any) -> None:
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        try:
            self._server, self._thread = start_http_server(
                int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry
            )
        except (OSError, ValueError) as error:
            raise OSError(f"could not serve metrics on {address}: {error}") from None
        self.port = self._server.server_port
        self.address = f"{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def multiprocess_registry(directory: str, processes: Callable[[], dict[str, int | str]]) -> Any:
    """A registry that sums the workers' metrics files in ``directory``, plus their memory."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    registry.register(ResidentMemory(processes))
    return registry


def mark_dead(directory: str, pid: int) -> None:
    """Drops a dead worker's live gauges (its counters stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)
