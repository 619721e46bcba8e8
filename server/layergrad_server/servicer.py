"""The GradientService RPCs: validate -> convert -> engine -> convert back."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import platform
import time
from collections.abc import Iterator

import chainer
import grpc
import numpy as np
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc

from layergrad_server import __version__, convert, engine, explain, explain_rpc
from layergrad_server.admission import Admission, AdmittedCall
from layergrad_server.config import ServerConfig
from layergrad_server.errors import FailedPrecondition, NotFound, ResultTooLarge, Unavailable, shown
from layergrad_server.shm import RegionMaps, check_region

logger = logging.getLogger(__name__)

GradientsRequest = pb.ComputeGradientsRequest | pb.StreamGradientsRequest | pb.ExportGradientsRequest

# gRPC reports a call without a deadline as one centuries away.
_NO_DEADLINE = 1e8
# StreamGradients messages converted ahead of the one being sent (1 MiB each by default):
# float16 output then streams 1.25x faster on 2 cores; float32 has nothing to overlap.
FRAMES_AHEAD = 4
# Trailer of ExportGradients with the server's time per phase (see ``ExportGradients``).
SERVER_TIMING_KEY = "server-timing"


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Serves one ``Engine``."""

    def __init__(self, config: ServerConfig, admission: Admission) -> None:
        self._config = config
        self._admission = admission
        self._engine: engine.Engine | None = None
        self._model_info: pb.GetModelInfoResponse | None = None
        self._regions = RegionMaps() if config.shared_memory else None

    def close(self) -> None:
        """Unmaps the ExportGradients shared memory segments (on server stop); the callers own them."""
        if self._regions is not None:
            self._regions.close()

    def attach(self, model: engine.Engine) -> None:
        """Starts serving ``model``; until then every call is UNAVAILABLE."""
        self._model_info = self._describe(model)
        self._engine = model

    @property
    def _model(self) -> engine.Engine:
        if self._engine is None:
            raise Unavailable("the model is still loading; retry shortly", reason="MODEL_LOADING")
        return self._engine

    def ComputeGradients(  # noqa: N802
        self, request: pb.ComputeGradientsRequest, context: grpc.ServicerContext
    ) -> pb.ComputeGradientsResponse:
        model = self._model
        with self._admit(cost_kind(request), request, context) as call:
            plan = self._plan(model, request)
            if plan.result_bytes > self._config.max_unary_response_bytes:
                raise ResultTooLarge(
                    f"the result is {plan.result_bytes} bytes, above the unary limit of "
                    f"{self._config.max_unary_response_bytes} bytes; use StreamGradients, which streams "
                    "any size",
                    reason="USE_STREAM_GRADIENTS",
                )
            with call.computing():
                result = model.gradients(plan, checkpoint=call.checkpoint)
            return convert.gradients_response(result)

    def StreamGradients(  # noqa: N802
        self, request: pb.StreamGradientsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Yields serialized StreamGradientsResponse messages (see ``convert.gradient_frames``)."""
        model = self._model
        with self._admit(cost_kind(request), request, context) as call:
            plan = self._plan(model, request)
            with call.computing():
                result = model.gradients(plan, checkpoint=call.checkpoint, defer_dtype=True)
            frames = convert.gradient_frames(result, self._config.stream_chunk_bytes)
            if convert.converts(result):  # float16 output: convert while sending
                frames = convert.ahead(frames, FRAMES_AHEAD)
            with contextlib.closing(frames):  # a helper thread stops with the call
                for frame in frames:
                    call.checkpoint()  # stop sending once the caller is gone
                    yield frame

    def ExportGradients(  # noqa: N802
        self, request: pb.ExportGradientsRequest, context: grpc.ServicerContext
    ) -> pb.ExportGradientsResponse:
        """StreamGradients' result written into the caller's shared memory region (see ``shm``).

        Sends a ``server-timing`` trailer: ``pre`` (admission, decoding, planning,
        mapping the region), ``compute`` (forward and backward) and ``write`` (copying
        into the region), each ``<name>;dur=<milliseconds>``.
        """
        started = time.perf_counter()
        if self._regions is None:
            raise FailedPrecondition(
                "ExportGradients (shared memory results) is disabled on this server: start it with "
                "--shared-memory, or use StreamGradients",
                reason="SHARED_MEMORY_DISABLED",
            )
        if not _is_local_peer(context.peer()):
            raise FailedPrecondition(
                "ExportGradients writes into shared memory on the server's host: call it over a "
                "loopback address or a unix socket, or use StreamGradients",
                reason="SHARED_MEMORY_NOT_LOCAL",
            )
        region = check_region(request)
        model = self._model
        with self._admit(cost_kind(request), request, context) as call:
            plan = self._plan(model, request)
            with self._regions.lease(region, plan.results) as target:
                with call.computing():
                    computing = time.perf_counter()
                    result = model.gradients(plan, checkpoint=call.checkpoint, defer_dtype=True)
                    computed = time.perf_counter()
                call.checkpoint()  # nothing written for a caller already gone
                target.write(result.tensors)
                written = time.perf_counter()
        response = pb.ExportGradientsResponse(
            tensors=[
                pb.TensorRef(
                    name=tensor.name,
                    kind=convert.KINDS[tensor.kind],
                    dtype=convert.dtype_enum(tensor.output_dtype),
                    shape=tensor.array.shape,
                    offset=offset,
                )
                for tensor, offset in zip(result.tensors, target.offsets, strict=True)
            ],
        )
        if result.loss is not None:
            response.loss = result.loss
        phases = {"pre": computing - started, "compute": computed - computing, "write": written - computed}
        timing = ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in phases.items())
        context.set_trailing_metadata(((SERVER_TIMING_KEY, timing),))
        return response

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:  # noqa: N802
        model = self._model
        with self._admit(cost_kind(request), request, context) as call:
            dtype = convert.output_dtype(request.output_dtype)
            size = model.predict_bytes(len(request.inputs), request.layers, dtype)
            if size > self._config.max_unary_response_bytes:
                raise ResultTooLarge(
                    f"the result is {size} bytes, above the unary limit of "
                    f"{self._config.max_unary_response_bytes} bytes; nothing was computed: ask for "
                    "fewer layers or inputs, or stream the activations with StreamGradients' "
                    "activation_layers",
                    reason="USE_STREAM_GRADIENTS",
                )
            batch = convert.inputs_to_batch(
                request.inputs, self._config.image_limits, self._config.max_batch_size
            )
            with call.computing():
                result = model.predict(batch, tuple(request.layers), dtype, checkpoint=call.checkpoint)
            return convert.predict_response(result)

    def Explain(  # noqa: N802
        self, request: pb.ExplainRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExplainResponse]:
        """Yields the maps of an explanation in chunks (see ``explain_rpc.frames``): one admitted call
        whose size is every backward pass it takes."""
        model = self._explain_model(request.model, request.model_version)
        # Options are checked before admission: a bad one is refused at once, whatever the load.
        method = explain_rpc.method_from_proto(request)
        score_layer = explain.check_method(model, method, request.score_layer)
        classes = np.asarray(request.targets.classes, dtype=np.int64) if request.targets.classes else None
        rows = explain.check_targets(model, score_layer, classes, request.targets.top_k, len(request.inputs))
        explain.check_passes(rows, method)
        with self._admission.enter(
            explain_rpc.cost_kind(request),
            explain_rpc.passes_of(request),
            _deadline(context),
            context.is_active,
        ) as call:
            query = explain_rpc.query_from_proto(
                request, self._config.image_limits, self._config.max_batch_size
            )
            plan = explain.plan(model, query)
            with call.computing():
                result = explain.explain(
                    model, plan, checkpoint=call.checkpoint, batch_size=self._config.explain_batch_size
                )
            for message in explain_rpc.frames(result, self._config.stream_chunk_bytes):
                call.checkpoint()  # stop sending once the caller is gone
                yield message

    def _explain_model(self, name: str, version: str) -> engine.Engine:
        """The engine serving ``name`` (empty: the default model) at ``version`` (empty: any)."""
        model = self._model
        served = model.adapter.name.lower()
        if name and name.lower() != served:
            raise NotFound(
                f"no model {shown(name)} is served; served models: {served}",
                field="model",
                reason="UNKNOWN_MODEL",
            )
        if version and version != model.adapter.version:
            raise NotFound(
                f"model {served} has no version {shown(version)}; served version: {model.adapter.version}",
                field="model_version",
                reason="UNKNOWN_MODEL_VERSION",
            )
        return model

    def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        if self._model_info is None:
            raise Unavailable("the model is still loading; retry shortly", reason="MODEL_LOADING")
        return self._model_info

    def _admit(
        self,
        kind: str,
        request: pb.ComputeGradientsRequest
        | pb.StreamGradientsRequest
        | pb.ExportGradientsRequest
        | pb.PredictRequest,
        context: grpc.ServicerContext,
    ) -> contextlib.AbstractContextManager[AdmittedCall]:
        """A place among the admitted calls (before decoding anything), or a refusal."""
        return self._admission.enter(kind, len(request.inputs), _deadline(context), context.is_active)

    def _plan(
        self,
        model: engine.Engine,
        request: pb.ComputeGradientsRequest | pb.StreamGradientsRequest | pb.ExportGradientsRequest,
    ) -> engine.Plan:
        query = convert.query_from_proto(request, self._config.image_limits, self._config.max_batch_size)
        return model.plan(query)

    def _describe(self, model: engine.Engine) -> pb.GetModelInfoResponse:
        weights = model.weights
        return pb.GetModelInfoResponse(
            model_name=engine.MODEL_NAME,
            input_spec=pb.InputSpec(
                shape=engine.INPUT_SHAPE,
                dtype=pb.DATA_TYPE_FLOAT32,
                layout="CHW",
                channel_order="BGR",
                mean=engine.MEAN_BGR,
                image_formats=self._config.image_limits.formats,
            ),
            layers=[pb.LayerInfo(name=name, output_shape=shape) for name, shape in model.layer_info()],
            parameters=[
                pb.ParameterInfo(name=name, shape=shape, dtype=convert.dtype_enum(dtype))
                for name, shape, dtype in model.parameter_info()
            ],
            weights=pb.WeightsInfo(
                source=weights.source,
                pretrained=weights.pretrained,
                file_sha256=weights.file_sha256,
                parameters_sha256=model.parameters_sha256,
            ),
            versions={
                "layergrad": __version__,
                "chainer": chainer.__version__,
                "numpy": np.__version__,
                "grpcio": grpc.__version__,
                "python": platform.python_version(),
            },
            device=str(model.device),
            max_unary_response_bytes=self._config.max_unary_response_bytes,
            stream_chunk_bytes=self._config.stream_chunk_bytes,
            max_batch_size=self._config.max_batch_size,
        )


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline in ``time.monotonic()`` seconds, or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE else time.monotonic() + remaining


def cost_kind(request: GradientsRequest | pb.PredictRequest) -> str:
    """The kind of a call for compute-time estimates: calls of one kind cost about the same per
    input. Gradient calls are of one kind when they share the pattern, the loss and its layer,
    and the targets (how far the backward pass goes and what it keeps); Predict calls when they
    ask for the same layers. Names are hashed, so a kind stays short."""
    if isinstance(request, pb.PredictRequest):
        parts = ["predict", *sorted(request.layers)]
    else:
        targets = request.targets
        loss = request.loss.WhichOneof("kind") or "-"
        parts = [
            f"gradients/{request.pattern}",
            loss,
            getattr(getattr(request.loss, loss, None), "layer", ""),
            "input" if targets.input else "",
            "all-layers" if targets.all_layers else ",".join(sorted(targets.layers)),
            "all-parameters" if targets.all_parameters else ",".join(sorted(targets.parameters)),
            ",".join(sorted(request.activation_layers)),
        ]
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()
    return f"{parts[0]}/{digest}"


def _is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``) is this host."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    if peer.startswith("ipv4:"):
        host = peer.removeprefix("ipv4:").rsplit(":", 1)[0]
    elif peer.startswith("ipv6:"):
        host = peer.removeprefix("ipv6:").rsplit(":", 1)[0].strip("[]")
    else:
        return False
    host = host.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))
