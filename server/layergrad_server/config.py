"""Server settings, from flags and environment."""

from __future__ import annotations

import argparse
import dataclasses
import os

from layergrad_server.images import ImageLimits
from layergrad_server.models.repository import (
    ModelConfig,
    ModelConfigError,
    check_unique,
    default_models,
    parse_model_flag,
    read_repository,
)

MIB = 1 << 20


# The largest data field of a stream message by default. Measured on loopback
# (scripts/bench_download.py), chunks of ~4 MiB were no faster than 1 MiB once
# messages are built and parsed with one copy each (gRPC's transport dominates),
# and raised the client's peak memory (more bytes buffered in flight); 1 MiB also
# keeps every message far under the 4 MiB that gRPC clients of any language
# accept by default.
DEFAULT_STREAM_CHUNK_BYTES = 1 * MIB

# --worker-dispatch: hand compute calls to the least-loaded worker, or keep each
# call on the worker its connection landed on (see ``workers``).
LEAST_LOADED = "least-loaded"
CONNECTION = "connection"
WORKER_DISPATCH = (LEAST_LOADED, CONNECTION)
CPU_KERNELS = ("fast", "stock")
# The port of an --address that names none (gRPC itself would take 443).
DEFAULT_PORT = 50051


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the server process is configured with."""

    address: str = "127.0.0.1:50051"
    weights: str | None = None
    # The models to serve, the default one first or marked; empty means VGG16 with ``weights``.
    models: tuple[ModelConfig, ...] = ()
    max_unary_response_bytes: int = 64 * MIB
    stream_chunk_bytes: int = DEFAULT_STREAM_CHUNK_BYTES
    max_request_bytes: int = 64 * MIB
    max_batch_size: int = 32
    # Backward passes per internal batch of an Explain call: an explanation's peak memory is one batch.
    explain_batch_size: int = 8
    device: str = "@numpy"
    # "fast": layergrad_server.kernels on the CPU (bit-identical results); "stock": Chainer's own.
    cpu_kernels: str = "fast"
    compute_slots: int = 1
    max_queue: int = 8
    # Dynamic batching (see ``dynamic_batching``): concurrent calls' per-example work waits up to this
    # long to be computed as one batch of at most ``max_batch_size`` inputs; 0 (the default): off.
    batch_delay_ms: float = 0.0
    threads: int = 0  # 0: compute_slots + max_queue + SPARE_THREADS
    # glibc malloc keeps freed blocks up to 32 MiB for reuse (``layergrad.memory``).
    keep_freed_memory: bool = True
    grace_seconds: float = 10.0
    # A call whose request message has not arrived, or whose reader has taken no stream
    # message, for this long is ended (see ``handlers``).
    stall_seconds: float = 30.0
    # ExportGradients (results written into same-host callers' shared memory), off by default.
    shared_memory: bool = False
    image_limits: ImageLimits = dataclasses.field(default_factory=ImageLimits)
    log_format: str = "text"
    log_level: str = "INFO"
    # One log line per finished call (see ``observability.access_log``).
    access_log: bool = True
    # host:port of the Prometheus /metrics endpoint; "" (the default): no endpoint.
    metrics_address: str = ""
    # OpenTelemetry spans of every call (see ``observability.tracing``).
    tracing: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens_file: str | None = None
    tokens: str | None = dataclasses.field(default=None, repr=False)  # $LAYERGRAD_TOKENS
    workers: int = 1
    # 0: the BLAS library's default with one worker, CPUs / workers with several.
    blas_threads: int = 0
    worker_dispatch: str = LEAST_LOADED
    # Set in the worker processes of ``--workers N`` (see ``workers``): the pipe to
    # report readiness on, the worker's number, how many workers there are and the
    # group's private directory (load table and unix sockets).
    worker_ready_fd: int | None = None
    worker_index: int | None = None
    worker_count: int = 1
    worker_dir: str | None = None

    @property
    def forwarding(self) -> bool:
        """Whether this worker process hands compute calls to less loaded siblings."""
        return self.worker_dir is not None and self.worker_count > 1 and self.worker_dispatch == LEAST_LOADED

    @property
    def handler_threads(self) -> int:
        """gRPC handler threads: more than compute calls can ever hold, so cheap calls always run.

        A worker that hands calls to its siblings also holds a thread for each of those,
        at most as many as the siblings admit.
        """
        own = self.threads or self.compute_slots + self.max_queue + SPARE_THREADS
        if self.forwarding:
            own += (self.worker_count - 1) * (self.compute_slots + self.max_queue)
        return own


# The longest a call may wait for others to share its batch with.
MAX_BATCH_DELAY_MS = 1000.0

# Handler threads beyond those admitted compute calls can hold: for GetModelInfo and
# refusing calls over the limits (health and reflection need no thread).
SPARE_THREADS = 4


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(cpus: int) -> int:
    """One worker on up to 2 CPUs, else one per 2 CPUs, at most 4 (each holds the model:
    ~1.3 GB resident).

    On 2 CPUs one VGG16 pass already keeps both cores busy through BLAS: two workers with
    one BLAS thread each serve at most about 1.3x the calls per second to concurrent
    callers, but each call takes about 1.5x as long and the memory doubles, so that
    trade is left to ``--workers 2``.
    """
    return 1 if cpus <= 2 else min(cpus // 2, 4)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LAYERGRAD_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``layergrad-server``; each defaults to a LAYERGRAD_* environment variable."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="layergrad-server",
        description="Serve gradients of Chainer networks (VGG16 by default) over gRPC. "
        "`layergrad-server weights --help` manages pretrained weights.",
    )
    parser.add_argument(
        "--address",
        default=_env("ADDRESS", defaults.address),
        help=f"host:port to listen on (port 0: any free port; a host alone: port {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--weights",
        default=_env("WEIGHTS"),
        help="PATH.npz (Chainer VGG16Layers layout), PATH.caffemodel, 'auto' (cached or downloaded "
        "pretrained weights) or 'random:SEED'; default: cached pretrained weights, else random:0",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME[=WEIGHTS]",
        help="serve a built-in model (vgg16, vgg19, googlenet, resnet50, resnet101, resnet152) under its "
        "name, with weights as for --weights; repeat for several (the first is the default). "
        "$LAYERGRAD_MODELS: a comma-separated list",
    )
    parser.add_argument(
        "--model-repository",
        default=_env("MODEL_REPOSITORY"),
        metavar="DIR",
        help="serve every DIR/NAME/model.yaml (or .toml): built-ins and your own Chainer models, "
        "versioned weights in DIR/NAME/VERSION/ (see the README)",
    )
    parser.add_argument(
        "--default-model",
        default=_env("DEFAULT_MODEL"),
        metavar="NAME",
        help="the model a request without `model` gets (default: the first configured)",
    )
    parser.add_argument(
        "--device",
        default=_env("DEVICE", defaults.device),
        help="Chainer device specifier: '@numpy' (CPU, default) or '@cupy:N' (GPU N, needs CuPy)",
    )
    parser.add_argument(
        "--cpu-kernels",
        choices=CPU_KERNELS,
        default=_env("CPU_KERNELS", defaults.cpu_kernels),
        help="on the CPU, 'fast' (default) replaces Chainer's convolution, ReLU and max-pooling "
        "kernels by faster numpy ones with bit-identical results; 'stock' keeps Chainer's own",
    )
    parser.add_argument(
        "--max-unary-response-bytes",
        type=int,
        default=int(_env("MAX_UNARY_RESPONSE_BYTES", str(defaults.max_unary_response_bytes))),
    )
    parser.add_argument(
        "--stream-chunk-bytes",
        type=int,
        default=int(_env("STREAM_CHUNK_BYTES", str(defaults.stream_chunk_bytes))),
        help="largest data field of a StreamGradients message (default %(default)s: each message "
        "stays under gRPC's default 4 MiB receive limit)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=int(_env("MAX_REQUEST_BYTES", str(defaults.max_request_bytes))),
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=int(_env("MAX_BATCH_SIZE", str(defaults.max_batch_size)))
    )
    parser.add_argument(
        "--explain-batch-size",
        type=int,
        default=int(_env("EXPLAIN_BATCH_SIZE", str(defaults.explain_batch_size))),
        help="backward passes per internal batch of an Explain call, at most --max-batch-size (default "
        "%(default)s): an explanation's peak memory is one such batch",
    )
    parser.add_argument(
        "--batch-delay-ms",
        type=float,
        default=float(_env("BATCH_DELAY_MS", str(defaults.batch_delay_ms))),
        metavar="MS",
        help="dynamic batching: concurrent calls asking for the same per-example tensors (input, layer "
        "and link gradients, activations; not parameter gradients) wait up to MS milliseconds to be "
        "computed as one batch of at most --max-batch-size inputs; each gets its own rows, equal to "
        "its own call up to float32 rounding, or bit-identical with the request's exact flag. "
        "Only for models that compute each input independently of the others (every built-in "
        "does). Default %(default)s: off",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=_env("KEEP_FREED_MEMORY", "1").lower() in ("1", "true", "yes"),
        help="have glibc's malloc keep freed blocks up to 32 MiB (requests, batches, results, "
        "responses) for reuse instead of unmapping them, so calls do not fault their pages in again "
        "(default on; --no-keep-freed-memory: glibc's defaults, less memory held between calls)",
    )
    parser.add_argument(
        "--compute-slots",
        type=int,
        default=int(_env("COMPUTE_SLOTS", str(defaults.compute_slots))),
        help="calls computing at once (default %(default)s: compute is serialised in one process)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=int(_env("MAX_QUEUE", str(defaults.max_queue))),
        help="calls waiting for a compute slot; beyond, RESOURCE_EXHAUSTED at once (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(_env("THREADS", str(defaults.threads))),
        help="threads running calls' compute and serialization, more than compute slots + queue "
        f"(default: slots + queue + {SPARE_THREADS}); idle or waiting calls hold none",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=float(_env("GRACE", str(defaults.grace_seconds))),
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=float(_env("STALL_TIMEOUT", str(defaults.stall_seconds))),
        help="seconds a call may wait for its request message, or a stream for its reader to take "
        "a message, before it is ended and its place freed (default %(default)s)",
    )
    parser.add_argument(
        "--shared-memory",
        action=argparse.BooleanOptionalAction,
        default=_env("SHARED_MEMORY", "0").lower() in ("1", "true", "yes"),
        help="serve ExportGradients: results written into POSIX shared memory segments that callers "
        "on this host, running as this user, create and name (default off)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(_env("WORKERS", "0")),
        help="server processes sharing the port, each holding the model and computing one call at "
        "a time (default 0: 1 on up to 2 CPUs, else CPUs/2 up to 4)",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=int(_env("BLAS_THREADS", "0")),
        help="BLAS threads per worker process (default 0: the BLAS default with one worker, "
        "CPUs/workers with several); results depend on it in the last bits of some gradients",
    )
    parser.add_argument(
        "--worker-dispatch",
        choices=WORKER_DISPATCH,
        default=_env("WORKER_DISPATCH", defaults.worker_dispatch),
        help="with --workers: 'least-loaded' (default) hands a compute call that arrives at a busy "
        "worker to the least-loaded one; 'connection' keeps every call on the worker its "
        "connection landed on (the kernel spreads connections at random)",
    )
    parser.add_argument("--worker-ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=int(_env("MAX_IMAGE_PIXELS", str(defaults.image_limits.max_pixels))),
    )
    parser.add_argument(
        "--max-image-memory",
        type=int,
        default=int(_env("MAX_IMAGE_MEMORY", str(defaults.image_limits.max_memory_bytes >> 20))),
        help="MiB that decoding and resizing one image may take, estimated from its header "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], default=_env("LOG_FORMAT", defaults.log_format)
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", defaults.log_level))
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=_env("ACCESS_LOG", "1").lower() in ("1", "true", "yes"),
        help="log one line per finished call on the layergrad_server.access logger (default on)",
    )
    parser.add_argument(
        "--metrics-address",
        default=_env("METRICS_ADDRESS", defaults.metrics_address),
        help="host:port to serve Prometheus metrics on, at /metrics (port 0: any free port; "
        "default: no metrics endpoint); with --workers the supervisor serves all workers' sum",
    )
    parser.add_argument(
        "--tracing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="OpenTelemetry spans of every call (needs the tracing extra); default: on when "
        "$LAYERGRAD_TRACING is 1 or $OTEL_TRACES_EXPORTER / $OTEL_EXPORTER_OTLP_ENDPOINT ask for traces",
    )
    parser.add_argument("--tls-cert", default=_env("TLS_CERT"), help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", default=_env("TLS_KEY"), help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        default=_env("TLS_CLIENT_CA"),
        help="PEM CA certificates: require client certificates signed by them (mutual TLS)",
    )
    parser.add_argument(
        "--tokens-file",
        default=_env("TOKENS_FILE"),
        help="bearer tokens and their scopes, one '<token|sha256:HEX> <scope,...> # name' a line "
        "(also $LAYERGRAD_TOKENS; tokens are never taken from the command line)",
    )
    return parser


def listen_address(address: str) -> str:
    """``address`` with :data:`DEFAULT_PORT` if it names only a host; SystemExit if malformed."""
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return address
    if address.startswith("["):
        host, _, rest = address.partition("]")
        host += "]"
    elif address.count(":") > 1:  # a bare IPv6 address has no port
        host, rest = f"[{address}]", ""
    else:
        host, colon, port = address.partition(":")
        rest = colon + port
    if not address:
        raise SystemExit("layergrad-server: --address is empty; write HOST:PORT")
    if not rest:
        return f"{host}:{DEFAULT_PORT}"
    port = rest.removeprefix(":")
    if not rest.startswith(":") or not port.isdigit() or int(port) > 65535:
        raise SystemExit(f"layergrad-server: --address {address!r}: expected HOST:PORT with a port 0-65535")
    return f"{host}:{port}"


def _models(args: argparse.Namespace) -> list[ModelConfig]:
    """The configured models, checked; SystemExit naming what is wrong."""
    flags = args.model
    if flags is None and os.environ.get("LAYERGRAD_MODELS"):
        flags = [item for item in os.environ["LAYERGRAD_MODELS"].split(",") if item.strip()]
    try:
        models = [parse_model_flag(flag) for flag in flags or ()]
        if args.model_repository:
            models += read_repository(args.model_repository)
        if models and args.weights:
            raise ModelConfigError(
                "--weights sets the weights of the default VGG16 only; with --model or "
                "--model-repository give each model its weights (--model vgg16=WEIGHTS)"
            )
        models = models or default_models(args.weights)
        if args.default_model:
            names = [m.name for m in models]
            if args.default_model not in names:
                raise ModelConfigError(
                    f"--default-model {args.default_model!r} is not configured; models: {', '.join(names)}"
                )
            models = [dataclasses.replace(m, default=m.name == args.default_model) for m in models]
        return check_unique(models)
    except ModelConfigError as error:
        raise SystemExit(f"layergrad-server: {error}") from None


def _tracing(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    explicit = _env("TRACING")
    if explicit is not None:
        return explicit.lower() in ("1", "true", "yes")
    from layergrad_server.observability.tracing import tracing_requested

    return tracing_requested()


def _metrics_address(address: str) -> str:
    """``--metrics-address`` checked: "" or ``host:port``; SystemExit if malformed."""
    if not address:
        return ""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise SystemExit(
            f"layergrad-server: --metrics-address {address!r}: expected HOST:PORT with a port 0-65535 "
            "(for example 127.0.0.1:9464)"
        )
    return address


def from_args(args: argparse.Namespace) -> ServerConfig:
    """A config from parsed flags, checked for sane values."""
    for name in (
        "max_unary_response_bytes",
        "stream_chunk_bytes",
        "max_request_bytes",
        "max_batch_size",
        "explain_batch_size",
        "compute_slots",
    ):
        if getattr(args, name) <= 0:
            raise SystemExit(f"layergrad-server: --{name.replace('_', '-')} must be positive")
    if args.cpu_kernels not in CPU_KERNELS:  # a bad $LAYERGRAD_CPU_KERNELS
        raise SystemExit(f"layergrad-server: --cpu-kernels must be one of {', '.join(CPU_KERNELS)}")
    if not 0 <= args.batch_delay_ms <= MAX_BATCH_DELAY_MS:  # also NaN
        raise SystemExit(f"layergrad-server: --batch-delay-ms must be in [0, {MAX_BATCH_DELAY_MS:g}]")
    if args.workers < 0 or args.blas_threads < 0:
        raise SystemExit("layergrad-server: --workers and --blas-threads must not be negative")
    workers = args.workers or default_workers(usable_cpus())
    if workers > 1 and args.address.startswith("unix:") and args.worker_index is None:
        raise SystemExit(
            "layergrad-server: --workers N shares one TCP port (host:port) among the workers; "
            f"{args.address} is a unix socket: use --workers 1 or a TCP address"
        )
    if args.stall_timeout <= 0:
        raise SystemExit("layergrad-server: --stall-timeout must be positive")
    if args.max_queue < 0 or args.threads < 0:
        raise SystemExit("layergrad-server: --max-queue and --threads must not be negative")
    if args.threads and args.threads <= args.compute_slots + args.max_queue:
        raise SystemExit(
            f"layergrad-server: --threads {args.threads} must exceed --compute-slots + --max-queue "
            f"({args.compute_slots + args.max_queue}), or health checks could wait behind compute"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("layergrad-server: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("layergrad-server: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    return ServerConfig(
        address=listen_address(args.address),
        weights=args.weights,
        models=tuple(_models(args)),
        device=args.device,
        cpu_kernels=args.cpu_kernels,
        max_unary_response_bytes=args.max_unary_response_bytes,
        stream_chunk_bytes=args.stream_chunk_bytes,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size,
        explain_batch_size=min(args.explain_batch_size, args.max_batch_size),
        compute_slots=args.compute_slots,
        batch_delay_ms=args.batch_delay_ms,
        keep_freed_memory=args.keep_freed_memory,
        max_queue=args.max_queue,
        threads=args.threads,
        grace_seconds=args.grace,
        stall_seconds=args.stall_timeout,
        shared_memory=args.shared_memory,
        image_limits=ImageLimits(
            max_pixels=args.max_image_pixels, max_memory_bytes=args.max_image_memory << 20
        ),
        log_format=args.log_format,
        log_level=args.log_level.upper(),
        access_log=args.access_log,
        metrics_address=_metrics_address(args.metrics_address),
        tracing=_tracing(args.tracing),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        tokens_file=args.tokens_file,
        tokens=os.environ.get("LAYERGRAD_TOKENS"),
        workers=workers,
        blas_threads=args.blas_threads,
        worker_dispatch=args.worker_dispatch,
        worker_ready_fd=args.worker_ready_fd,
        worker_index=args.worker_index,
        worker_count=args.worker_count,
        worker_dir=args.worker_dir,
    )
