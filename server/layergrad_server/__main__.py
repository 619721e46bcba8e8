"""``layergrad-server``: the process entry point; logging is configured only here."""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from layergrad_server import config as config_module
    from layergrad_server.engine import Engine, WeightsSource
    from layergrad_server.models.repository import ModelConfig
    from layergrad_server.weights import ResolvedWeights

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
    if config.keep_freed_memory:
        from layergrad.memory import keep_freed_memory

        keep_freed_memory()
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
    from layergrad_server.models.repository import default_models
    from layergrad_server.server import GradientServer

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
    models = list(config.models) or default_models(config.weights)
    server.expect(models)
    server.start()
    failures = load_models(config, models, server.attach, server.fail, stop_requested)
    if len(failures) == len(models) and not stop_requested.is_set():
        server.stop(0)
        return failures[0]
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0


def load_models(
    config: config_module.ServerConfig,
    models: list[ModelConfig],
    ready: Callable[[Engine, str], None],
    failed: Callable[[str, str], None],
    stop_requested: threading.Event,
) -> list[int]:
    """Loads ``models`` one after another, handing each to ``ready`` or its error to ``failed``;
    returns the exit status each failure stands for (1 weights or model code, 2 the device)."""
    from layergrad_server.server import load_model
    from layergrad_server.weights import WeightsError

    failures = []
    try:
        import chainer

        chainer.get_device(config.device).xp.zeros(1)
    except (ValueError, RuntimeError, ImportError) as error:  # a bad or unusable --device
        logger.error("cannot use device %s: %s", config.device, error)
        for model in models:
            failed(model.name, f"cannot use device {config.device}: {error}")
        return [2] * len(models)
    for model in models:
        if stop_requested.is_set():
            break
        try:
            engine = load_model(config, load_weights_source(config, model), model)
        except WeightsError as error:
            logger.error("model %s: cannot load weights: %s", model.name, error)
            failed(model.name, f"cannot load weights: {error}")
            failures.append(1)
        except Exception as error:  # a user model's own code may raise anything
            logger.exception("model %s: cannot be loaded", model.name)
            failed(model.name, f"{type(error).__name__}: {error}")
            failures.append(1)
        else:
            ready(engine, model.name)
    return failures


def serve_worker(config: config_module.ServerConfig, stop_requested: threading.Event) -> int:
    """A worker of ``--workers N``: loads the models first, then listens (port shared) and serves."""
    from layergrad_server.auth import TokenFileError
    from layergrad_server.models.repository import default_models
    from layergrad_server.server import GradientServer
    from layergrad_server.workers import report_ready

    models = list(config.models) or default_models(config.weights)
    loaded: list[tuple[Engine, str]] = []
    errors: list[tuple[str, str]] = []
    failures = load_models(
        config,
        models,
        lambda engine, name: loaded.append((engine, name)),
        lambda name, message: errors.append((name, message)),
        stop_requested,
    )
    if len(failures) == len(models) and failures:
        return failures[0]
    if stop_requested.is_set():
        return 0
    try:
        server = GradientServer(config)
    except (TokenFileError, OSError, RuntimeError) as error:
        logger.error("cannot start: %s", error)
        return 2
    server.expect(models)
    for name, message in errors:
        server.fail(name, message)
    for engine, name in loaded:
        server.attach(engine, name)
    server.start()
    assert config.worker_ready_fd is not None
    report_ready(config.worker_ready_fd)
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0


def load_weights_source(
    config: config_module.ServerConfig, model: ModelConfig | None = None
) -> WeightsSource:
    """A model's weights (default: VGG16's ``--weights``), resolved (downloaded or converted if
    need be); WeightsError if not."""
    from layergrad_server.engine import WeightsSource
    from layergrad_server.models.repository import CHAIN, default_models
    from layergrad_server.weights import resolve_weights

    model = model or default_models(config.weights)[0]
    if model.architecture == CHAIN:
        resolved = resolve_chain_weights(model)
    else:
        resolved = resolve_weights(model.weights, model.architecture)
    from layergrad_server.models.vision import random_seed_of

    seed = None if resolved.npz_path is None else random_seed_of(resolved.npz_path)
    weights = WeightsSource(
        source=resolved.source if seed is None else f"{resolved.source} (random:{seed})",
        pretrained=resolved.pretrained and seed is None,
        npz_path=None if resolved.npz_path is None else str(resolved.npz_path),
        random_seed=resolved.random_seed,
        file_sha256=resolved.file_sha256,
    )
    if not weights.pretrained:
        logger.warning(
            "model %s: serving RANDOM weights (%s): gradients are those of an untrained network; "
            "run `layergrad-server weights fetch --model %s` or give the model a weights file",
            model.name,
            weights.source,
            model.architecture,
        )
    return weights


def resolve_chain_weights(model: ModelConfig) -> ResolvedWeights:
    """A user Chain's weights: an npz (named in its model file) or ``random:SEED`` (Chainer's own
    initialisers, seeded)."""
    from layergrad_server.weights import ResolvedWeights, WeightsError
    from layergrad_server.weights.store import sha256_file

    choice = (model.weights or "random:0").strip()
    if choice.startswith("random"):
        _, _, seed = choice.partition(":")
        try:
            value = int(seed or 0)
        except ValueError:
            raise WeightsError(f"random weights need an integer seed, got {choice!r}") from None
        return ResolvedWeights(
            npz_path=None, random_seed=value, source=f"random:{value}", pretrained=False, file_sha256=""
        )
    path = pathlib.Path(choice)
    if not path.is_file():
        raise WeightsError(f"weights file {choice!r} does not exist")
    return ResolvedWeights(
        npz_path=path, random_seed=None, source=f"npz:{path}", pretrained=True, file_sha256=sha256_file(path)
    )


if __name__ == "__main__":
    sys.exit(main())
