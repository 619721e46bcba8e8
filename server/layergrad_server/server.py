"""Assembles the gRPC server: GradientService, health, reflection, error mapping."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc

from layergrad_server.config import MIB, ServerConfig
from layergrad_server.engine import Engine, WeightsSource
from layergrad_server.interceptors import ErrorInterceptor
from layergrad_server.servicer import GradientServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name


class GradientServer:
    """A running gRPC server; serves once ``load`` has attached a warmed-up model.

    Health is NOT_SERVING (and GradientService calls UNAVAILABLE) until the
    model is loaded and one backward pass has run.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="rpc"),
            interceptors=[ErrorInterceptor()],
            options=[
                ("grpc.max_receive_message_length", config.max_request_bytes),
                ("grpc.max_send_message_length", config.max_unary_response_bytes + MIB),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._servicer = GradientServicer(config)
        self._health = health.HealthServicer(experimental_non_blocking=True)
        pb_grpc.add_GradientServiceServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._server.add_insecure_port(config.address)
        if self.port == 0:
            raise RuntimeError(f"could not listen on {config.address}")
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = self.config.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> None:
        self._server.start()
        logger.info("listening on %s (health NOT_SERVING until the model is ready)", self.address)

    def load(self, weights: WeightsSource) -> Engine:
        """Loads the model, runs one warm-up backward pass, then starts serving it."""
        started = time.perf_counter()
        model = Engine(weights, max_batch_size=self.config.max_batch_size)
        loaded = time.perf_counter()
        model.warm_up()
        self.attach(model)
        logger.info(
            "serving VGG16 weights=%s pretrained=%s file_sha256=%s parameters_sha256=%s "
            "load=%.2fs warm_up=%.2fs",
            weights.source,
            weights.pretrained,
            weights.file_sha256 or "-",
            model.parameters_sha256,
            loaded - started,
            time.perf_counter() - loaded,
        )
        return model

    def attach(self, model: Engine) -> None:
        """Serves an already warmed-up model."""
        self._servicer.attach(model)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _set_health(self, status: int) -> None:
        self._health.set("", status)
        self._health.set(SERVICE_NAME, status)

    def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, gives in-flight calls ``grace`` seconds, then closes."""
        grace = self.config.grace_seconds if grace is None else grace
        self._health.enter_graceful_shutdown()
        logger.info("shutting down; in-flight calls get %.1fs", grace)
        self._server.stop(grace).wait()
        self._stopped.set()
        logger.info("stopped")

    def wait(self) -> None:
        """Blocks until ``stop`` has finished."""
        self._stopped.wait()
