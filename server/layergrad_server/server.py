"""Assembles the gRPC server: GradientService, the Open Inference Protocol (KServe v2) beside it,
health, reflection, error mapping, admission control, TLS and bearer tokens."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb

from layergrad_server import kernels, reflection
from layergrad_server.admission import Admission
from layergrad_server.auth import TokenStore
from layergrad_server.config import MIB, ServerConfig
from layergrad_server.engine import Engine, WeightsSource
from layergrad_server.handlers import Describe, Handlers
from layergrad_server.kserve_v2 import SERVICE_NAME as INFERENCE_SERVICE_NAME
from layergrad_server.kserve_v2 import SERVICE_PREFIX as INFERENCE_SERVICE_PREFIX
from layergrad_server.kserve_v2 import InferenceServicer, add_inference_service
from layergrad_server.models.repository import ModelConfig, default_models
from layergrad_server.observability import Observer, Observers
from layergrad_server.observability.access_log import AccessLog
from layergrad_server.observability.metrics import Metrics, MetricsServer, ResidentMemory, multiprocess
from layergrad_server.registry import ModelEntry, ModelState, Registry
from layergrad_server.servicer import GradientServicer

if TYPE_CHECKING:
    from layergrad_server.forwarding import Dispatcher
    from layergrad_server.workers import LoadTable

logger = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name

# Connection management. The server pings a connection every minute while calls
# are open, so a client that vanished without closing its socket is noticed
# (and its call stopped) within about 80 s; it lets clients ping as often as
# every 10 s (more often is answered with GOAWAY); it closes connections idle
# for 10 minutes and, to rebalance long-lived clients across servers, any
# connection after 30 minutes, giving the calls on it 5 more minutes to finish.
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_idle_ms", 600_000),
    ("grpc.max_connection_age_ms", 1_800_000),
    ("grpc.max_connection_age_grace_ms", 300_000),
)


def load_tokens(config: ServerConfig) -> TokenStore | None:
    """The tokens of ``--tokens-file`` and ``$LAYERGRAD_TOKENS`` together, or None if neither is set."""
    stores = []
    if config.tokens_file:
        stores.append(TokenStore.from_file(config.tokens_file))
    if config.tokens:
        stores.append(TokenStore.parse(config.tokens, "$LAYERGRAD_TOKENS"))
    if not stores:
        return None
    return TokenStore([entry for store in stores for entry in store.entries])


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config (client certificates required with a client CA), or None."""
    if not config.tls_cert or not config.tls_key:
        return None
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key), _read(config.tls_cert))],
        root_certificates=_read(config.tls_client_ca) if config.tls_client_ca else None,
        require_client_auth=bool(config.tls_client_ca),
    )


def add_gradient_service(
    servicer: GradientServicer,
    server: grpc.aio.Server,
    handlers: Handlers,
    dispatcher: Dispatcher | None = None,
) -> None:
    """Registers GradientService's methods with ``server`` through ``handlers`` (see
    ``handlers``); in a worker of ``--workers N``, compute calls go through ``dispatcher``."""
    unary: Callable[[str, Callable], Callable] = dispatcher.unary if dispatcher else lambda _, b: b
    stream: Callable[[str, Callable], Callable] = dispatcher.stream if dispatcher else lambda _, b: b
    export: Callable[[str, Callable], Callable] = (
        functools.partial(dispatcher.unary, local_callers_only=True) if dispatcher else lambda _, b: b
    )
    methods = {
        "ComputeGradients": handlers.unary(
            "ComputeGradients",
            unary("ComputeGradients", servicer.ComputeGradients),
            pb.ComputeGradientsRequest,
        ),
        "StreamGradients": handlers.stream(
            "StreamGradients",
            stream("StreamGradients", servicer.StreamGradients),
            pb.StreamGradientsRequest,
        ),
        "ExportGradients": handlers.unary(
            "ExportGradients",
            export("ExportGradients", servicer.ExportGradients),
            pb.ExportGradientsRequest,
        ),
        "Predict": handlers.unary("Predict", unary("Predict", servicer.Predict), pb.PredictRequest),
        "Explain": handlers.stream("Explain", stream("Explain", servicer.Explain), pb.ExplainRequest),
        "GetModelInfo": handlers.unary(
            "GetModelInfo",
            dispatcher.annotate(servicer.GetModelInfo) if dispatcher else servicer.GetModelInfo,
            pb.GetModelInfoRequest,
        ),
        "ListModels": handlers.unary(
            "ListModels",
            dispatcher.annotate(servicer.ListModels) if dispatcher else servicer.ListModels,
            pb.ListModelsRequest,
        ),
    }
    missing = set(pb.DESCRIPTOR.services_by_name["GradientService"].methods_by_name) - set(methods)
    if missing:
        raise RuntimeError(f"GradientService methods without a handler: {sorted(missing)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))


def add_kserve_v2_service(
    servicer: GradientServicer,
    server: grpc.aio.Server,
    handlers: Handlers,
    probe_handlers: Handlers,
    dispatcher: Dispatcher | None = None,
    serving: Callable[[], bool] = lambda: True,
) -> InferenceServicer:
    """Registers the Open Inference Protocol (KServe v2) through ``handlers`` (its liveness and
    readiness probes through ``probe_handlers``, which take no token): its ModelInfer
    runs GradientService's Predict and ComputeGradients behaviours as registered above
    (dispatched like them in a worker of ``--workers N``); its readiness follows ``serving``."""
    unary: Callable[[str, Callable], Callable] = dispatcher.unary if dispatcher else lambda _, b: b
    inference = InferenceServicer(
        servicer,
        predict=unary("Predict", servicer.Predict),
        compute_gradients=unary("ComputeGradients", servicer.ComputeGradients),
        serving=serving,
    )
    add_inference_service(inference, server, handlers, probe_handlers)
    return inference


def apply_cpu_kernels(choice: str, model: Engine) -> str:
    """Puts the fast CPU kernels in place (``choice`` 'fast') or Chainer's own ('stock') for a
    model on the CPU; returns what the model's device runs ('-' on other devices)."""
    if model.device.name != "@numpy":
        return "-"
    if choice == "fast":
        kernels.install()
    else:
        kernels.uninstall()
    return choice


def load_model(config: ServerConfig, weights: WeightsSource, model: ModelConfig | None = None) -> Engine:
    """A model (default: VGG16) on the configured device, after one warm-up backward pass."""
    model = model or default_models(None)[0]
    started = time.perf_counter()
    rss_before = resident_bytes()
    adapter = model.adapter()
    engine = Engine(weights, adapter=adapter, max_batch_size=config.max_batch_size, device=config.device)
    cpu_kernels = apply_cpu_kernels(config.cpu_kernels, engine)
    loaded = time.perf_counter()
    engine.warm_up()
    engine.load_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    logger.info(
        "loaded model %s (%s, version %s) weights=%s pretrained=%s file_sha256=%s parameters_sha256=%s "
        "cpu_kernels=%s load=%.2fs warm_up=%.2fs resident=+%.0fMiB",
        model.name,
        adapter.name,
        model.version,
        weights.source,
        weights.pretrained,
        weights.file_sha256 or "-",
        engine.parameters_sha256,
        cpu_kernels,
        loaded - started,
        time.perf_counter() - loaded,
        max(resident_bytes() - rss_before, 0) / MIB,
    )
    return engine


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: Health service name of one model: "layergrad.model.<name>".
MODEL_HEALTH_PREFIX = "layergrad.model."


class GradientServer:
    """A running gRPC server; serves once ``load`` has attached a warmed-up model.

    Health is NOT_SERVING (and GradientService calls UNAVAILABLE) until the
    model is loaded and one backward pass has run.

    The gRPC server is ``grpc.aio``'s, on an event loop in a thread of its own;
    GradientService's behaviours run in a bounded thread pool (see ``handlers``),
    while health and reflection are answered on the event loop and never wait
    behind a compute call.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        tokens = load_tokens(config)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._loop_thread.start()
        self._executor = futures.ThreadPoolExecutor(
            max_workers=config.handler_threads, thread_name_prefix="rpc"
        )
        try:
            self._server = self._on_loop(self._make_server())
        except BaseException:
            self._close_loop()
            raise
        self._table: LoadTable | None = None
        self.dispatcher: Dispatcher | None = None
        if config.worker_dir is not None and config.worker_index is not None:
            self._join_worker_group(config)
        self.admission = Admission(config.compute_slots, config.max_queue)
        self.models = Registry()
        self._servicer = GradientServicer(config, self.admission, self.models)
        self._health = health_async.HealthServicer()
        self.models.on_change(self._model_changed)
        self._tokens = tokens
        # Metrics are kept when they are served: here, or (a worker of --workers) by the supervisor.
        serve_metrics = bool(config.metrics_address) and config.worker_index is None
        self.metrics = Metrics() if serve_metrics or (config.metrics_address and multiprocess()) else None
        observers: list[Observer] = [AccessLog()] if config.access_log else []
        if self.metrics is not None:
            observers.append(self.metrics)
            self.admission.listener = self.metrics.admission_changed
            if self._servicer.batcher is not None:
                self._servicer.batcher.listener = self.metrics
        self._tracer_provider: Any = None
        if config.tracing:
            observers.append(self._tracing())
        self.observer: Observer = Observers(observers)
        handlers = self.handlers("layergrad_v1", f"/{SERVICE_NAME}/", self._servicer.describe)
        add_gradient_service(self._servicer, self._server, handlers, self.dispatcher)
        # KServe v2 beside it; its liveness and readiness probes take no token, like health.
        inference_handlers = self.handlers("kserve_v2", INFERENCE_SERVICE_PREFIX, self._describe_inference)
        probe_handlers = self.handlers("kserve_v2", INFERENCE_SERVICE_PREFIX, tokens=False)
        self._serving = False
        self._inference: InferenceServicer | None = None
        self._inference = add_kserve_v2_service(
            self._servicer,
            self._server,
            inference_handlers,
            probe_handlers,
            self.dispatcher,
            serving=lambda: self._serving,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, INFERENCE_SERVICE_NAME, health.SERVICE_NAME], self._server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = server_credentials(config)
        self.port = self._listen(config.address, credentials)
        if self.dispatcher is not None and self.dispatcher.listen_address is not None:
            # Calls handed on by sibling workers; the directory is the parent's, mode 0700.
            self._listen(self.dispatcher.listen_address, None)
        host = config.address.rsplit(":", 1)[0].strip("[]")
        if tokens is not None and credentials is None and host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning(
                "bearer tokens on a plaintext port (%s) travel in clear: serve TLS with --tls-cert/--tls-key",
                config.address,
            )
        self.metrics_server: MetricsServer | None = None
        if serve_metrics and self.metrics is not None:
            self.metrics.registry.register(ResidentMemory(lambda: {"server": "self"}))
            try:
                self.metrics_server = MetricsServer(config.metrics_address, self.metrics.registry)
            except OSError:
                self._close_loop()
                raise
        self._security = (
            "plaintext" if credentials is None else "mutual TLS" if config.tls_client_ca else "TLS"
        ) + ("" if tokens is None else f", {len(tokens)} bearer token(s)")
        self._stopped = threading.Event()
        self._started = False
        self._attached = False

    def _describe_inference(self, method: str, request: Any, record: Any) -> None:
        """A KServe v2 call's record filled from its layergrad.v1 equivalent (model, pattern, ...)."""
        if method != "ModelInfer" or self._inference is None:
            return
        try:
            call = self._inference.equivalent(request, with_inputs=False)
        except Exception:  # the call itself reports what is wrong with it
            record.model = request.model_name
            return
        self._servicer.describe(call.method, call.request, record)

    def _tracing(self) -> Observer:
        """The spans observer of ``--tracing``, or a no-op one (with a warning) without OpenTelemetry."""
        try:
            from layergrad_server.observability.tracing import Tracing, configure_provider

            self._tracer_provider = configure_provider()
            return Tracing()
        except ImportError:
            logger.warning("--tracing: opentelemetry is not installed (pip install '.[tracing]'); no spans")
            return Observer()

    def handlers(
        self, protocol: str, service_prefix: str, describe: Describe | None = None, *, tokens: bool = True
    ) -> Handlers:
        """The seam through which a protocol's methods are registered: tokens (none with
        ``tokens=False``: probes), limits, request ids, timings, access log and metrics (see
        ``handlers``); ``protocol`` labels them."""
        return Handlers(
            self._executor,
            self._loop,
            self._tokens if tokens else None,
            service_prefix,
            self.config.stall_seconds,
            protocol=protocol,
            observer=self.observer,
            describe=describe,
            # A worker that takes calls from its siblings: those arrive on its unix socket.
            sibling_peers=self.dispatcher is not None and self.dispatcher.listen_address is not None,
        )

    async def _make_server(self) -> grpc.aio.Server:
        config = self.config
        return grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_request_bytes),
                (
                    "grpc.max_send_message_length",
                    max(config.max_unary_response_bytes, config.stream_chunk_bytes) + MIB,
                ),
                # Worker processes of --workers share the port (the kernel spreads connections).
                ("grpc.so_reuseport", 1 if config.worker_ready_fd is not None else 0),
                *KEEPALIVE_OPTIONS,
            ],
        )

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs ``coroutine`` on the server's event loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _listen(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Adds a listening port; ListenError naming the address if it cannot be bound."""
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if port == 0 and not address.startswith("unix:"):
            self._close_loop()
            raise ListenError(f"could not listen on {address}: the address is in use or not local")
        return port

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _join_worker_group(self, config: ServerConfig) -> None:
        """In a worker of ``--workers N``: opens the group's load table and sets up dispatch."""
        from layergrad_server.forwarding import Dispatcher
        from layergrad_server.workers import TABLE_FILE, LoadTable

        assert config.worker_dir is not None and config.worker_index is not None
        self._table = LoadTable(f"{config.worker_dir}/{TABLE_FILE}", config.worker_count)
        self.dispatcher = Dispatcher(config, self._table, SERVICE_NAME)

    @property
    def address(self) -> str:
        host = self.config.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> None:
        self._on_loop(self._server.start())
        self._started = True
        if self._attached and self.dispatcher is not None:
            self.dispatcher.open()
        if self.metrics_server is not None:
            logger.info("metrics on http://%s/metrics", self.metrics_server.address)
        logger.info(
            "%s %s (%s; %d compute slot(s), queue %d, %d threads; health NOT_SERVING until "
            "the model is ready)",
            # A worker of --workers: its parent says "listening on" once every worker serves.
            "listening on" if self.config.worker_ready_fd is None else "worker sharing",
            self.address,
            self._security,
            self.config.compute_slots,
            self.config.max_queue,
            self.config.handler_threads,
        )

    def load(self, weights: WeightsSource) -> Engine:
        """Loads the default model, runs one warm-up backward pass, then starts serving it."""
        model = load_model(self.config, weights)
        self.attach(model)
        return model

    def expect(self, models: list[ModelConfig]) -> None:
        """Registers the models about to load: calls naming them are UNAVAILABLE until then."""
        for model in models:
            self.models.add(model.name, model.version, model.display_architecture, default=model.default)

    def attach(self, model: Engine, name: str | None = None) -> None:
        """Serves an already warmed-up model (under ``name``, default its architecture's)."""
        self._servicer.attach(model, name)
        seconds = getattr(model, "load_seconds", None)
        if self.metrics is not None and seconds is not None:
            self.metrics.model_loaded(name or model.adapter.name.lower(), seconds)

    def fail(self, name: str, message: str) -> None:
        """Reports that a model could not be loaded; the others keep serving."""
        self.models.failed(name, message)

    def _model_changed(self, entry: ModelEntry) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        status = serving if entry.state is ModelState.READY else not_serving
        self._on_loop(self._health.set(MODEL_HEALTH_PREFIX + entry.name, status))
        default_ready = entry.name == self.models.default and entry.state is ModelState.READY
        settled = self.models.all_settled() and any(
            e.state is ModelState.READY for e in self.models.entries()
        )
        if (default_ready or settled) and not self._attached:
            # Ready once the default model is, or once no model is loading and one serves.
            self._set_health(serving)
            self._attached = True
            if self._started and self.dispatcher is not None:
                self.dispatcher.open()

    def _set_health(self, status: int) -> None:
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        self._on_loop(self._health.set("", status))
        self._on_loop(self._health.set(SERVICE_NAME, status))
        self._on_loop(self._health.set(INFERENCE_SERVICE_NAME, status))

    def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, gives in-flight calls ``grace`` seconds, then closes.

        Health turns NOT_SERVING at once and new compute calls are UNAVAILABLE
        (reason SHUTTING_DOWN), while the port stays open so that health checks
        and retries get an answer; queued calls that cannot finish within the grace
        are refused with UNAVAILABLE straight away, the others run. When every call
        is done, or the grace is over (calls still running are then cancelled and
        stop at their next checkpoint), the server closes.
        """
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self._serving = False  # KServe v2 readiness, like health
        self._on_loop(self._health.enter_graceful_shutdown())
        logger.info("shutting down; in-flight calls get %.1fs", grace)
        if self.dispatcher is not None:
            self.dispatcher.drain()
        self.admission.drain(deadline)
        idle = self.admission.wait_idle(deadline)
        if self.dispatcher is not None:
            idle = self.dispatcher.wait_idle(deadline) and idle
        if not idle:
            logger.warning(
                "grace period over with %d call(s) unfinished; cancelling them", self.admission.admitted
            )
        # Only cheap calls (and endless health watches) remain when the admission is idle.
        linger = min(max(deadline - time.monotonic(), 0.0), 2.0) if idle else 0.0
        self._on_loop(self._server.stop(linger))
        self._close_loop()
        self._servicer.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()  # sends the spans still buffered
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self._table is not None:
            self._table.close()
        self._stopped.set()
        logger.info("stopped")

    def wait(self) -> None:
        """Blocks until ``stop`` has finished."""
        self._stopped.wait()


class ListenError(OSError):
    """The server's address cannot be listened on."""
