"""The GradientService RPCs: validate -> convert -> engine -> convert back."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import platform
import queue
import threading
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
from layergrad_server.dynamic_batching import Batcher
from layergrad_server.errors import Cancelled, FailedPrecondition, ResultTooLarge
from layergrad_server.observability.context import SERVER_TIMING_KEY, CallRecord
from layergrad_server.registry import ModelState, Registry
from layergrad_server.shm import RegionMaps, check_region

logger = logging.getLogger(__name__)

GradientsRequest = pb.ComputeGradientsRequest | pb.StreamGradientsRequest | pb.ExportGradientsRequest

# gRPC reports a call without a deadline as one centuries away.
_NO_DEADLINE = 1e8
# StreamGradients messages converted ahead of the one being sent (1 MiB each by default):
# float16 output then streamed 1.25x faster on 2 cores; float32 has nothing to overlap.
FRAMES_AHEAD = 4
# Target names a call's record lists before it says only how many more there are.
SHOWN_TARGETS = 3


_STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Serves the engines of a model ``Registry``; each call names its model."""

    def __init__(self, config: ServerConfig, admission: Admission, models: Registry | None = None) -> None:
        self._config = config
        self._admission = admission
        self.models = models if models is not None else Registry()
        self._regions = RegionMaps() if config.shared_memory else None
        # Concurrent calls' per-example work computed as one batch (``--batch-delay-ms``).
        self.batcher = (
            Batcher(config.batch_delay_ms / 1e3, config.max_batch_size) if config.batch_delay_ms > 0 else None
        )

    def close(self) -> None:
        """Unmaps the ExportGradients shared memory segments (on server stop); the callers own them."""
        if self._regions is not None:
            self._regions.close()

    def attach(self, model: engine.Engine, name: str | None = None, *, default: bool = False) -> None:
        """Starts serving ``model`` under ``name`` (default: its architecture in lower case);
        until then calls naming it are UNAVAILABLE (MODEL_LOADING)."""
        name = name or model.adapter.name.lower()
        if name not in {entry.name for entry in self.models.entries()}:
            self.models.add(name, model.adapter.version, model.adapter.name, default=default)
        entry = self.models.entry(name)
        self.models.ready(name, model, model.weights.source, self._describe(name, entry.version, model))

    def _model(self, request: object) -> engine.Engine:
        """The engine of the model ``request`` names (``model``, ``model_version``)."""
        found = self.models.get(request.model, request.model_version)
        assert found.engine is not None
        return found.engine

    def model_name(self, request: object) -> str:
        """The name of the model a request is for: its ``model`` field, or the served model's
        (lowercase, as the metrics and access log name it)."""
        return getattr(request, "model", "") or self.models.default

    def describe(self, method: str, request: object, record: CallRecord) -> None:
        """Fills a call's record from its request: model, pattern, targets and batch size."""
        record.model = self.model_name(request)
        inputs = getattr(request, "inputs", None)
        record.batch = 0 if inputs is None else len(inputs)
        if isinstance(request, pb.PredictRequest):
            record.targets = _names_summary("layers", list(request.layers) or ["default"], False)
        elif isinstance(request, GradientsRequest):
            try:
                pattern = pb.BackwardPattern.Name(request.pattern).removeprefix("BACKWARD_PATTERN_")
            except ValueError:  # a number the contract does not define: refused by the call itself
                pattern = "unknown"
            record.pattern = pattern.lower()
            record.targets = targets_summary(request)

    def ComputeGradients(  # noqa: N802
        self, request: pb.ComputeGradientsRequest, context: grpc.ServicerContext
    ) -> pb.ComputeGradientsResponse:
        model = self._model(request)
        with self._admit(cost_kind(request), request, context) as call:
            plan = self._plan(model, request)
            if plan.result_bytes > self._config.max_unary_response_bytes:
                raise ResultTooLarge(
                    f"the result is {plan.result_bytes} bytes, above the unary limit of "
                    f"{self._config.max_unary_response_bytes} bytes; use StreamGradients, which streams "
                    "any size",
                    reason="USE_STREAM_GRADIENTS",
                )
            result = self._gradients(model, plan, call, request.exact)
            result, exponents = convert.encode_result(result, request.float16_scaling)
            return convert.gradients_response_bytes(result, exponents)

    def StreamGradients(  # noqa: N802
        self, request: pb.StreamGradientsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Yields serialized StreamGradientsResponse messages (see ``convert.gradient_frames``)."""
        model = self._model(request)
        with self._admit(cost_kind(request), request, context) as call:
            plan = self._plan(model, request)
            if request.parameters_when_ready and plan.parameters:
                frames = self._frames_when_ready(model, plan, call, request.float16_scaling)
                with contextlib.closing(frames):  # stops the computation if the caller goes
                    yield from frames
                return
            result = self._gradients(model, plan, call, request.exact)
            # Reduced output types are checked (refused, if need be) before the first message, then
            # converted chunk by chunk, ahead of the one being sent.
            result, exponents = convert.encode_result(result, request.float16_scaling, defer=True)
            frames = convert.gradient_frames(result, self._config.stream_chunk_bytes, exponents)
            if convert.converts(result):
                frames = convert.ahead(frames, FRAMES_AHEAD)
            with contextlib.closing(frames):  # a helper thread stops with the call
                for frame in frames:
                    call.checkpoint()  # stop sending once the caller is gone
                    yield frame

    def _frames_when_ready(
        self, model: engine.Engine, plan: engine.Plan, call: AdmittedCall, scaling: bool
    ) -> Iterator[bytes]:
        """StreamGradients with ``parameters_when_ready``: the computation runs in a thread of its
        own, and each parameter gradient it finishes early is sent while it goes on; then the
        other tensors, in plan order. Every tensor carries its plan position."""
        ready: queue.Queue[tuple[str, object, float | None]] = queue.Queue()
        stop = threading.Event()

        def checkpoint() -> None:
            if stop.is_set():
                raise Cancelled("the stream stopped; the computation was stopped", reason="CANCELLED")
            call.checkpoint()

        def compute() -> None:
            try:
                with call.computing():
                    result = model.gradients(
                        plan,
                        checkpoint=checkpoint,
                        defer_dtype=True,
                        on_final=lambda tensor, loss: ready.put(("tensor", tensor, loss)),
                    )
            except BaseException as error:  # raised in the sending thread
                ready.put(("error", error, None))
            else:
                ready.put(("done", result, result.loss))

        positions = {(spec.kind, spec.name): i for i, spec in enumerate(plan.results)}
        worker = threading.Thread(target=compute, name="gradients", daemon=True)
        worker.start()
        try:
            loss_pending, sent = True, set()
            while True:
                what, item, loss = ready.get()
                if what == "error":
                    raise item  # type: ignore[misc]
                if what == "tensor":
                    tensors = [item]
                else:
                    tensors = [t for t in item.tensors if (t.kind, t.name) not in sent]  # type: ignore[attr-defined]
                for tensor in tensors:
                    key = (tensor.kind, tensor.name)
                    [encoded], [exponent] = convert.encode_outputs(
                        [tensor], scaling, defer=True, sent=len(sent)
                    )
                    frames = convert.tensor_frames(
                        encoded,
                        self._config.stream_chunk_bytes,
                        exponent,
                        loss if loss_pending else None,
                        positions[key],
                    )
                    loss_pending = False
                    for frame in frames:
                        call.checkpoint()  # stop sending once the caller is gone
                        yield frame
                    sent.add(key)
                if what == "done":
                    return
        finally:
            stop.set()
            worker.join()

    def ExportGradients(  # noqa: N802
        self, request: pb.ExportGradientsRequest, context: grpc.ServicerContext
    ) -> pb.ExportGradientsResponse:
        """StreamGradients' result written into the caller's shared memory region (see ``shm``).

        Adds to the ``server-timing`` trailer (which every call has: ``queue``, ``compute``,
        ``send``) ``pre`` (admission, decoding, planning, mapping the region) and ``write``
        (converting to a reduced output type, if asked, and copying into the region), each
        ``<name>;dur=<milliseconds>``.
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
        model = self._model(request)
        with self._admit(cost_kind(request), request, context) as call:
            plan = self._plan(model, request)
            with self._regions.lease(region, plan.results) as target:
                computing = time.perf_counter()
                result = self._gradients(model, plan, call, request.exact)
                computed = time.perf_counter()
                call.checkpoint()  # nothing written for a caller already gone
                result, exponents = convert.encode_result(result, request.float16_scaling, defer=True)
                target.write(result.tensors, exponents)
                written = time.perf_counter()
        response = pb.ExportGradientsResponse(
            tensors=[
                pb.TensorRef(
                    name=tensor.name,
                    kind=convert.KINDS[tensor.kind],
                    dtype=convert.dtype_enum(tensor.output_dtype),
                    shape=tensor.array.shape,
                    offset=offset,
                    scale_exponent=exponent,
                )
                for tensor, offset, exponent in zip(result.tensors, target.offsets, exponents, strict=True)
            ],
        )
        if result.loss is not None:
            response.loss = result.loss
        phases = {"pre": computing - started, "write": written - computed}
        timing = ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in phases.items())
        context.set_trailing_metadata(((SERVER_TIMING_KEY, timing),))
        return response

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:  # noqa: N802
        model = self._model(request)
        with self._admit(cost_kind(request), request, context) as call:
            dtype = convert.output_dtype(request.output_dtype)
            size = model.predict_bytes(
                len(request.inputs), request.layers, dtype, convert.prepared_shape(request.inputs)
            )
            if size > self._config.max_unary_response_bytes:
                raise ResultTooLarge(
                    f"the result is {size} bytes, above the unary limit of "
                    f"{self._config.max_unary_response_bytes} bytes; nothing was computed: ask for "
                    "fewer layers or inputs, or stream the activations with StreamGradients' "
                    "activation_layers",
                    reason="USE_STREAM_GRADIENTS",
                )
            batch = convert.inputs_to_batch(
                request.inputs, model.adapter, self._config.image_limits, self._config.max_batch_size
            )
            if self.batcher is None or request.exact:
                with call.computing():
                    result = model.predict(batch, tuple(request.layers), dtype, checkpoint=call.checkpoint)
            else:
                result = self.batcher.predict(model, batch, tuple(request.layers), dtype, call)
            return convert.predict_response(result, request.float16_scaling)

    def Explain(  # noqa: N802
        self, request: pb.ExplainRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExplainResponse]:
        """Yields the maps of an explanation in chunks (see ``explain_rpc.frames``): one admitted call
        whose size is every backward pass it takes."""
        model = self._model(request)
        # Options are checked before admission: a bad one is refused at once, whatever the load.
        method = explain_rpc.method_from_proto(request)
        score_layer = explain.check_method(model, method, request.score_layer)
        classes = np.asarray(request.targets.classes, dtype=np.int64) if request.targets.classes else None
        rows = explain.check_targets(model, score_layer, classes, request.targets.top_k, len(request.inputs))
        explain.check_passes(rows, method)
        record = getattr(context, "record", None)
        with self._admission.enter(
            explain_rpc.cost_kind(request),
            explain_rpc.passes_of(request),
            _deadline(context),
            context.is_active,
            on_computed=None if record is None else record.admitted,
        ) as call:
            query = explain_rpc.query_from_proto(
                request, model.adapter, self._config.image_limits, self._config.max_batch_size
            )
            plan = explain.plan(model, query)
            with call.computing():
                result = explain.explain(
                    model, plan, checkpoint=call.checkpoint, batch_size=self._config.explain_batch_size
                )
            for message in explain_rpc.frames(result, self._config.stream_chunk_bytes):
                call.checkpoint()  # stop sending once the caller is gone
                yield message

    def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return self.models.get(request.model, request.model_version).described

    def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelStatus(
                    name=entry.name,
                    version=entry.version,
                    state=_STATES[entry.state],
                    architecture=entry.architecture,
                    message=entry.message,
                    weights_source=entry.weights_source,
                )
                for entry in self.models.entries()
            ],
            default_model=self.models.default,
        )

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
        record = getattr(context, "record", None)
        return self._admission.enter(
            kind,
            len(request.inputs),
            _deadline(context),
            context.is_active,
            on_computed=None if record is None else record.admitted,
        )

    def _gradients(
        self, model: engine.Engine, plan: engine.Plan, call: AdmittedCall, exact: bool
    ) -> engine.GradientResult:
        """The planned gradients, with other calls' (dynamic batching) unless ``exact`` or off."""
        if self.batcher is None or exact:
            with call.computing():
                return model.gradients(plan, checkpoint=call.checkpoint, defer_dtype=True)
        return self.batcher.gradients(model, plan, call, defer_dtype=True)

    def _plan(
        self,
        model: engine.Engine,
        request: pb.ComputeGradientsRequest | pb.StreamGradientsRequest | pb.ExportGradientsRequest,
    ) -> engine.Plan:
        query = convert.query_from_proto(
            request, model.adapter, self._config.image_limits, self._config.max_batch_size
        )
        return model.plan(query)

    def _describe(self, name: str, version: str, model: engine.Engine) -> pb.GetModelInfoResponse:
        weights = model.weights
        adapter = model.adapter
        spec = adapter.input_spec
        labels = adapter.labels() or ()
        return pb.GetModelInfoResponse(
            model_name=adapter.name,
            model=name,
            model_version=version,
            input_spec=pb.InputSpec(
                shape=spec.shape,
                dtype=pb.DATA_TYPE_FLOAT32,
                layout=spec.layout,
                channel_order=spec.channel_order,
                mean=spec.mean,
                image_formats=self._config.image_limits.formats,
                min_size=spec.min_size or (),
                resize=adapter.resize,
            ),
            labels=labels,
            logits_layer=adapter.logits_layer or "",
            probability_layer=adapter.probability_layer or "",
            layers=[pb.LayerInfo(name=name, output_shape=shape) for name, shape in model.layer_info()],
            links=[pb.LayerInfo(name=info.name, output_shape=info.shape) for info in model.description.links],
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


def _names_summary(kind: str, names: list[str], every: bool) -> str:
    if every:
        return f"{kind}:all"
    shown = ",".join(names[:SHOWN_TARGETS])
    more = f",+{len(names) - SHOWN_TARGETS}" if len(names) > SHOWN_TARGETS else ""
    return f"{kind}:{shown}{more}"


def targets_summary(request: GradientsRequest) -> str:
    """What a gradient call asks for, short: ``input layers:conv5_3 parameters:all``."""
    targets = request.targets
    parts = ["input"] if targets.input else []
    if targets.layers or targets.all_layers:
        parts.append(_names_summary("layers", list(targets.layers), targets.all_layers))
    if targets.parameters or targets.all_parameters:
        parts.append(_names_summary("parameters", list(targets.parameters), targets.all_parameters))
    if request.activation_layers:
        parts.append(_names_summary("activations", list(request.activation_layers), False))
    return " ".join(parts)


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
