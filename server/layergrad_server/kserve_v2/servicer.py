"""The Open Inference Protocol's RPCs, each a synchronous behaviour run through ``handlers``.

ModelInfer runs no compute of its own: it converts the request into the equivalent
layergrad.v1 request (``convert.to_v1``), runs that layergrad.v1 behaviour (the same
callable GradientService serves, so admission, limits, deadlines, planning and,
under ``--workers``, dispatch to a sibling are the ones layergrad.v1 calls get) and
converts its response back (``convert.to_v2``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb

from layergrad_server import __version__, engine
from layergrad_server._gen.inference import grpc_predict_v2_pb2 as v2
from layergrad_server.errors import FailedPrecondition, OutOfRange, ResultTooLarge, Unavailable
from layergrad_server.kserve_v2 import convert
from layergrad_server.registry import ModelEntry
from layergrad_server.servicer import GradientServicer
from layergrad_server.status import required_scopes

SERVER_NAME = "layergrad"
PLATFORM = "chainer"
#: Protocol extensions served: none of the optional ones (model repository, shared memory,
#: statistics, ...); every other GRPCInferenceService method is UNIMPLEMENTED.
EXTENSIONS: tuple[str, ...] = ()

V1Behavior = Callable[[Any, grpc.ServicerContext], Any]


class InferenceServicer:
    """GRPCInferenceService on top of GradientService's behaviours.

    ``predict`` and ``compute_gradients`` are the layergrad.v1 behaviours exactly as
    GradientService registers them (wrapped by the dispatcher under ``--workers``);
    ``serving`` says whether the server's health is SERVING (the model is loaded and
    the server is not shutting down): ServerReady and ModelReady follow it.
    """

    def __init__(
        self,
        gradients: GradientServicer,
        predict: V1Behavior,
        compute_gradients: V1Behavior,
        serving: Callable[[], bool] = lambda: True,
    ) -> None:
        self._gradients = gradients
        self._v1 = {"Predict": predict, "ComputeGradients": compute_gradients}
        self._serving = serving

    # ---- the one lookup of a request's model ---------------------------------------

    def _entry(self, name: str, version: str) -> ModelEntry:
        """The served model ``name`` at ``version`` ("" for the default model and its version):
        NOT_FOUND naming the served models, UNAVAILABLE while loading, FAILED_PRECONDITION
        for one that failed to load (the registry's rules, as for layergrad.v1)."""
        return self._gradients.models.get(name, version)

    def _engine(self, name: str, version: str) -> engine.Engine:
        found = self._entry(name, version)
        assert found.engine is not None
        return found.engine

    # ---- health and metadata ---------------------------------------------------------

    def ServerLive(  # noqa: N802
        self, request: v2.ServerLiveRequest, context: grpc.ServicerContext
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    def ServerReady(  # noqa: N802
        self, request: v2.ServerReadyRequest, context: grpc.ServicerContext
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._ready("", ""))

    def ModelReady(  # noqa: N802
        self, request: v2.ModelReadyRequest, context: grpc.ServicerContext
    ) -> v2.ModelReadyResponse:
        return v2.ModelReadyResponse(ready=self._ready(request.name, request.version))

    def _ready(self, name: str, version: str) -> bool:
        """Whether the model serves; NOT_FOUND for a model not served here."""
        try:
            self._engine(name, version)
        except (Unavailable, FailedPrecondition):
            return False
        return self._serving()

    def ServerMetadata(  # noqa: N802
        self, request: v2.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    def ModelMetadata(  # noqa: N802
        self, request: v2.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> v2.ModelMetadataResponse:
        entry = self._entry(request.name, request.version)
        model = entry.engine
        assert model is not None
        tensor = v2.ModelMetadataResponse.TensorMetadata
        input_shape = convert.prepared_shape(model.adapter.input_spec)
        outputs = [
            tensor(name=name, datatype="FP32", shape=[-1, *shape]) for name, shape in model.layer_info()
        ]
        outputs.append(tensor(name=convert.INPUT_GRADIENT, datatype="FP32", shape=[-1, *input_shape]))
        outputs += [
            tensor(name=convert.GRADIENT_PREFIX + name, datatype="FP32", shape=[-1, *shape])
            for name, shape in model.layer_info()
        ]
        outputs += [
            tensor(name=convert.GRADIENT_PREFIX + name, datatype="FP32", shape=list(shape))
            for name, shape, _ in model.parameter_info()
        ]
        outputs.append(tensor(name=convert.LOSS_OUTPUT, datatype="FP64", shape=[1]))
        return v2.ModelMetadataResponse(
            name=entry.name,
            versions=[entry.version],
            platform=PLATFORM,
            inputs=[
                tensor(name=convert.IMAGE_INPUT, datatype="FP32", shape=[-1, *input_shape]),
                tensor(name=convert.TARGETS_INPUT, datatype="INT64", shape=[-1]),
            ],
            outputs=outputs,
        )

    # ---- inference -------------------------------------------------------------------

    def equivalent(self, request: v2.ModelInferRequest, *, with_inputs: bool = True) -> convert.V1Call:
        """The layergrad.v1 call that asks for what ``request`` asks for."""
        entry = self._entry(request.model_name, request.model_version)
        model = entry.engine
        assert model is not None
        names = convert.ModelNames(layers=model.layer_names, parameters=model.parameter_names)
        adapter = model.adapter
        call = convert.to_v1(
            request,
            names,
            adapter.input_spec,
            adapter.probability_layer or adapter.default_output,
            adapter.logits_layer or adapter.default_output,
            with_inputs=with_inputs,
        )
        call.request.model, call.request.model_version = entry.name, entry.version
        return call

    def scopes(self, method: str, request: v2.ModelInferRequest) -> set[str]:
        """The token scopes of the equivalent layergrad.v1 call (see ``auth``)."""
        if method != "ModelInfer":
            return set()
        call = self.equivalent(request, with_inputs=False)
        return required_scopes(call.method, call.request)

    def ModelInfer(  # noqa: N802
        self, request: v2.ModelInferRequest, context: grpc.ServicerContext
    ) -> v2.ModelInferResponse:
        call = self.equivalent(request)
        try:
            answer = self._v1[call.method](call.request, context)
        except OutOfRange as error:  # FLOAT16 unscaled (v2 has no field for a scale)
            raise OutOfRange(
                f"{error.message.split('; nothing was sent')[0]}; nothing was sent: KServe v2 outputs "
                "carry no scale, so FP16 is never scaled: ask for BF16 (float32's range in half the "
                "bytes) or FP32",
                reason=error.reason,
                metadata=error.metadata,
            ) from None
        except ResultTooLarge as error:
            raise ResultTooLarge(
                f"{error.message.split(';')[0]}; ModelInfer answers in one message: ask for fewer outputs "
                "or a smaller batch, or stream the same result with layergrad.v1 "
                "GradientService/StreamGradients",
                reason=error.reason,
                metadata=error.metadata,
            ) from None
        if isinstance(answer, bytes):  # computed by a sibling worker
            response_type = pb.PredictResponse if call.method == "Predict" else pb.ComputeGradientsResponse
            answer = response_type.FromString(answer)
        return convert.to_v2(call, answer, call.request.model, call.request.model_version, request.id)
