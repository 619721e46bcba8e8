"""``layergrad-server``: the process entry point; logging is configured only here."""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layergrad_server import config as config_module
    from layergrad_server.engine import WeightsSource

logger = logging.getLogger("layergrad_server")

# Modules of the `server` extra (the SDK alone, `pip install .`, installs the script but not these).
SERVER_MODULES = {
    "PIL": "pillow",
    "chainer": "chainer",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "prometheus_client": "prometheus-client",
    "threadpoolctl": "threadpoolctl",
}

MISSING_SERVER_HELP = """\
layergrad-server: the server's dependencies are not installed (missing: {missing}).
`pip install .` installs the SDK and the `layergrad` command only. For the server, in a virtual
environment (Chainer 7.8.1 is an sdist that needs setuptools<81 and no build isolation):

    pip install --upgrade pip "setuptools>=77,<81" wheel
    pip install --no-build-isolation "chainer==7.8.1"
    pip install '.[server]'

or run scripts/install.sh (what `make setup` does)."""


def missing_server_modules() -> list[str]:
    """Distributions of the `server` extra whose modules cannot be imported here."""
    return [dist for module, dist in SERVER_MODULES.items() if importlib.util.find_spec(module) is None]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):  # an access log line: its fields, not its text
            entry.update(access)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str, level: str, worker: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        tag = "" if worker is None else f"[worker {worker}] "
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def limit_blas_threads(count: int) -> None:
    """Caps this process's BLAS threads (a worker's are already capped by its environment)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=count, user_api="blas")
    logger.info("BLAS limited to %d thread(s)", count)


def supervise(config: config_module.ServerConfig, argv: list[str]) -> int:
    """``--workers N`` with N > 1: runs the workers (see ``workers``) until SIGTERM/SIGINT."""
    from layergrad_server.workers import Supervisor

    try:
        supervisor = Supervisor(config, argv)
    except OSError as error:
        if str(error).startswith("could not serve metrics"):
            logger.error("cannot start: %s", error)
        else:
            logger.error("cannot listen on %s: %s", config.address, error)
        return 2

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s; stopping the workers", signal.Signals(signum).name)
        supervisor.request_stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return supervisor.run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    missing = missing_server_modules()
    if missing:
        print(MISSING_SERVER_HELP.format(missing=", ".join(missing)), file=sys.stderr)
        return 2
    from layergrad_server import config as config_module

    if argv[:1] == ["weights"]:
        from layergrad_server.weights.cli import weights_main

        return weights_main(argv[1:])
    args = config_module.build_parser().parse_args(argv)
    config = config_module.from_args(args)
    configure_logging(config.log_format, config.log_level, config.worker_index)
    if config.workers > 1:
        return supervise(config, argv)
    worker = config.worker_ready_fd is not None
    if worker:
        from layergrad_server.workers import follow_parent

        follow_parent()
    elif config.blas_threads:
        limit_blas_threads(config.blas_threads)

    # Imported after logging is set up: importing Chainer is slow and may warn.
    from layergrad_server.auth import TokenFileError
    from layergrad_server.server import GradientServer, load_model
    from layergrad_server.weights import WeightsError

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    if worker:
        return serve_worker(config, stop_requested)
    try:
        server = GradientServer(config)
    except (TokenFileError, OSError) as error:
        logger.error("cannot start: %s", error)
        return 2
    server.start()
    try:
        weights = load_weights_source(config)
    except WeightsError as error:
        logger.error("cannot load weights: %s", error)
        server.stop(0)
        return 1
    if not stop_requested.is_set():
        try:
            server.attach(load_model(config, weights))
        except (ValueError, RuntimeError) as error:  # a bad or unusable --device
            logger.error("cannot use device %s: %s", config.device, error)
            server.stop(0)
            return 2
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0


def serve_worker(config: config_module.ServerConfig, stop_requested: threading.Event) -> int:
    """A worker of ``--workers N``: loads the model first, then listens (port shared) and serves."""
    from layergrad_server.auth import TokenFileError
    from layergrad_server.server import GradientServer, load_model
    from layergrad_server.weights import WeightsError
    from layergrad_server.workers import report_ready

    try:
        model = load_model(config, load_weights_source(config))
    except WeightsError as error:
        logger.error("cannot load weights: %s", error)
        return 1
    except (ValueError, RuntimeError) as error:  # a bad or unusable --device
        logger.error("cannot use device %s: %s", config.device, error)
        return 2
    if stop_requested.is_set():
        return 0
    try:
        server = GradientServer(config)
    except (TokenFileError, OSError, RuntimeError) as error:
        logger.error("cannot start: %s", error)
        return 2
    server.attach(model)
    server.start()
    assert config.worker_ready_fd is not None
    report_ready(config.worker_ready_fd)
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0


def load_weights_source(config: config_module.ServerConfig) -> WeightsSource:
    """The configured weights, resolved (downloaded or converted if need be); WeightsError if not."""
    from layergrad_server.engine import WeightsSource
    from layergrad_server.weights import resolve_weights

    resolved = resolve_weights(config.weights)
    weights = WeightsSource(
        source=resolved.source,
        pretrained=resolved.pretrained,
        npz_path=None if resolved.npz_path is None else str(resolved.npz_path),
        random_seed=resolved.random_seed,
        file_sha256=resolved.file_sha256,
    )
    if not weights.pretrained:
        logger.warning(
            "serving RANDOM weights (%s): gradients are those of an untrained network; "
            "run `layergrad-server weights fetch` or pass --weights PATH for pretrained VGG16",
            weights.source,
        )
    return weights


if __name__ == "__main__":
    sys.exit(main())
