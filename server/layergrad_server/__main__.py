"""``layergrad-server``: the process entry point; logging is configured only here."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time

from layergrad_server import config as config_module

logger = logging.getLogger("layergrad_server")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["weights"]:
        from layergrad_server.weights.cli import weights_main

        return weights_main(argv[1:])
    args = config_module.build_parser().parse_args(argv)
    config = config_module.from_args(args)
    configure_logging(config.log_format, config.log_level)

    # Imported after logging is set up: importing Chainer is slow and may warn.
    from layergrad_server.auth import TokenFileError
    from layergrad_server.engine import WeightsSource
    from layergrad_server.server import GradientServer
    from layergrad_server.weights import WeightsError, resolve_weights

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    try:
        server = GradientServer(config)
    except (TokenFileError, OSError) as error:
        logger.error("cannot start: %s", error)
        return 2
    server.start()
    try:
        resolved = resolve_weights(config.weights)
    except WeightsError as error:
        logger.error("cannot load weights: %s", error)
        server.stop(0)
        return 1
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
    if not stop_requested.is_set():
        try:
            server.load(weights)
        except (ValueError, RuntimeError) as error:  # a bad or unusable --device
            logger.error("cannot use device %s: %s", config.device, error)
            server.stop(0)
            return 2
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
