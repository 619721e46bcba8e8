"""Server settings, from flags and environment."""

from __future__ import annotations

import argparse
import dataclasses
import os

from layergrad_server.images import ImageLimits

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the server process is configured with."""

    address: str = "127.0.0.1:50051"
    weights: str | None = None
    max_unary_response_bytes: int = 64 * MIB
    stream_chunk_bytes: int = 1 * MIB
    max_request_bytes: int = 64 * MIB
    max_batch_size: int = 32
    threads: int = 8
    grace_seconds: float = 10.0
    image_limits: ImageLimits = dataclasses.field(default_factory=ImageLimits)
    log_format: str = "text"
    log_level: str = "INFO"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LAYERGRAD_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``layergrad-server``; each defaults to a LAYERGRAD_* environment variable."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="layergrad-server",
        description="Serve gradients of a Chainer VGG16 over gRPC. "
        "`layergrad-server weights --help` manages pretrained weights.",
    )
    parser.add_argument(
        "--address",
        default=_env("ADDRESS", defaults.address),
        help="host:port to listen on (port 0: any free port)",
    )
    parser.add_argument(
        "--weights",
        default=_env("WEIGHTS"),
        help="PATH.npz (Chainer VGG16Layers layout), PATH.caffemodel, 'auto' (cached or downloaded "
        "pretrained weights) or 'random:SEED'; default: cached pretrained weights, else random:0",
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
        "--threads",
        type=int,
        default=int(_env("THREADS", str(defaults.threads))),
        help="gRPC handler threads",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=float(_env("GRACE", str(defaults.grace_seconds))),
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=int(_env("MAX_IMAGE_PIXELS", str(defaults.image_limits.max_pixels))),
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], default=_env("LOG_FORMAT", defaults.log_format)
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", defaults.log_level))
    return parser


def from_args(args: argparse.Namespace) -> ServerConfig:
    """A config from parsed flags, checked for sane values."""
    for name in (
        "max_unary_response_bytes",
        "stream_chunk_bytes",
        "max_request_bytes",
        "max_batch_size",
        "threads",
    ):
        if getattr(args, name) <= 0:
            raise SystemExit(f"layergrad-server: --{name.replace('_', '-')} must be positive")
    return ServerConfig(
        address=args.address,
        weights=args.weights,
        max_unary_response_bytes=args.max_unary_response_bytes,
        stream_chunk_bytes=args.stream_chunk_bytes,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size,
        threads=args.threads,
        grace_seconds=args.grace,
        image_limits=ImageLimits(max_pixels=args.max_image_pixels),
        log_format=args.log_format,
        log_level=args.log_level.upper(),
    )
