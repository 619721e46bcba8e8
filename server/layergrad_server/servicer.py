"""The GradientService RPCs: validate -> convert -> engine -> convert back."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator

import chainer
import grpc
import numpy as np
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc

from layergrad_server import __version__, convert, engine
from layergrad_server.admission import Admission, AdmittedCall
from layergrad_server.config import ServerConfig
from layergrad_server.errors import FailedPrecondition, ResultTooLarge, Unavailable
from layergrad_server.shm import SegmentRegistry

logger = logging.getLogger(__name__)

# gRPC reports a call without a deadline as one centuries away.
_NO_DEADLINE = 1e8


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Serves one ``Engine``."""

    def __init__(self, config: ServerConfig, admission: Admission) -> None:
        self._config = config
        self._admission = admission
        self._engine: engine.Engine | None = None
        self._model_info: pb.GetModelInfoResponse | None = None
        self._segments = SegmentRegistry(config.shm_claim_seconds) if config.shared_memory else None

    def close(self) -> None:
        """Unlinks every ExportGradients segment not claimed yet (on server stop)."""
        if self._segments is not None:
            self._segments.close()

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
        with self._admit(f"gradients/{request.pattern}", request, context) as call:
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
        with self._admit(f"gradients/{request.pattern}", request, context) as call:
            plan = self._plan(model, request)
            with call.computing():
                result = model.gradients(plan, checkpoint=call.checkpoint, defer_dtype=True)
            for frame in convert.gradient_frames(result, self._config.stream_chunk_bytes):
                call.checkpoint()  # stop sending once the caller is gone
                yield frame

    def ExportGradients(  # noqa: N802
        self, request: pb.ExportGradientsRequest, context: grpc.ServicerContext
    ) -> pb.ExportGradientsResponse:
        """StreamGradients' result in one shared memory segment that the caller unlinks."""
        if self._segments is None:
            raise FailedPrecondition(
                "ExportGradients (shared memory results) is disabled on this server: start it with "
                "--shared-memory, or use StreamGradients",
                reason="SHARED_MEMORY_DISABLED",
            )
        model = self._model
        with self._admit(f"gradients/{request.pattern}", request, context) as call:
            plan = self._plan(model, request)
            with call.computing():
                result = model.gradients(plan, checkpoint=call.checkpoint, defer_dtype=True)
            call.checkpoint()  # no segment for a caller already gone
            name, size, offsets = self._segments.export(result.tensors)
        response = pb.ExportGradientsResponse(
            segment_name=name,
            segment_bytes=size,
            tensors=[
                pb.TensorRef(
                    name=tensor.name,
                    kind=convert.KINDS[tensor.kind],
                    dtype=convert.dtype_enum(tensor.output_dtype),
                    shape=tensor.array.shape,
                    offset=offset,
                )
                for tensor, offset in zip(result.tensors, offsets, strict=True)
            ],
        )
        if result.loss is not None:
            response.loss = result.loss
        return response

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:  # noqa: N802
        model = self._model
        with self._admit("predict", request, context) as call:
            batch = convert.inputs_to_batch(
                request.inputs, self._config.image_limits, self._config.max_batch_size
            )
            dtype = convert.output_dtype(request.output_dtype)
            with call.computing():
                result = model.predict(batch, tuple(request.layers), dtype, checkpoint=call.checkpoint)
            return convert.predict_response(result)

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
        remaining = context.time_remaining()
        deadline = None if remaining is None or remaining > _NO_DEADLINE else time.monotonic() + remaining
        return self._admission.enter(kind, len(request.inputs), deadline, context.is_active)

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
