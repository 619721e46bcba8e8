"""The layergrad client: numpy in, numpy out, over a gRPC channel.

::

    import layergrad
    from layergrad.losses import ClassScore

    with layergrad.Client("127.0.0.1:50051") as client:
        saliency = client.input_gradient("cat.jpg", ClassScore("fc8", classes=[281]))

Gradient calls use the StreamGradients RPC, so results of any size (all 138M
parameter gradients are about 553 MB) arrive in chunks that are copied straight
into preallocated arrays. Every failure raises a :class:`layergrad.errors.LayergradError`
subclass chosen by gRPC status code.

Same-host shared memory: ``gradients(..., shared_memory=True)`` has the server
(started with ``--shared-memory``) write the result into a POSIX shared memory
region that the Client creates on first use and reuses (growing it when a result
does not fit), instead of sending it over the connection. With ``copy=False`` the
arrays are read-only views of that region, the fastest way (no copy at all): they
are valid until the next ``shared_memory=True`` call of the same Client, which
overwrites the region. The Client unlinks its regions on :meth:`Client.close`,
when it is garbage collected and at interpreter exit; a process killed outright
leaves them in ``/dev/shm`` until the server, which notices that their owner is
gone, unlinks them (about a second later, for regions it has written into).

Security: ``root_certificates=`` (and ``private_key=`` + ``certificate_chain=``
for servers that require client certificates) or ``credentials=`` open a TLS
channel; ``token=`` sends ``authorization: Bearer <token>`` through gRPC's
call credentials, which gRPC only attaches on a protected channel: over TLS, or
to a loopback target on plaintext (the client then uses gRPC's local
credentials). A token is never sent in clear to another host.

Retries: calls refused with UNAVAILABLE (server starting, shutting down or
unreachable) or with RESOURCE_EXHAUSTED because the server is overloaded are
retried by gRPC itself (service config ``retryPolicy``: up to 4 attempts,
exponential backoff with jitter from 0.25 s, at most 5 s apart, all within the
call's deadline), waiting at least the delay the server asks for
(``grpc-retry-pushback-ms``, sent with a ``google.rpc.RetryInfo`` detail); other
RESOURCE_EXHAUSTED refusals (a result over the unary cap) carry a pushback that
forbids retrying. A client-side retry throttle stops retrying when most calls
fail. ``retry=False`` turns all of this off.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeAlias, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from layergrad import _batching, _channel, _explain
from layergrad._calls import call_info, request_metadata
from layergrad._channel import DEFAULT_PORT, SERVICE_NAME
from layergrad._explain import Explanation
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad._inputs import Images, add_inputs
from layergrad._shm import RegionPool
from layergrad._tensors import (
    AssembledTensor,
    TensorKey,
    _ChunkAssembler,
    dtype_name,
    parse_stream_chunk,
    result_from_tensor,
    touch_pages,
)
from layergrad.errors import (
    ClientClosedError,
    DataLoss,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_grpc_error,
)
from layergrad.losses import Loss

__all__ = [
    "DEFAULT_PORT",
    "Client",
    "GradientResult",
    "InputSpec",
    "LayerInfo",
    "ModelInfo",
    "ParameterInfo",
    "Pattern",
    "Prediction",
    "WeightsInfo",
]

logger = logging.getLogger(__name__)

_VERSION = "0.1.0"
# The name the server gives the input gradient's tensor in a stream.
_INPUT_NAME = "input"
_MAX_MESSAGE_BYTES = 1 << 30
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    # A ping every 5 minutes while a call is open: the gRPC server default minimum
    # interval, so servers with default settings never answer "too many pings".
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.primary_user_agent", f"layergrad-python/{_VERSION}"),
    # Each Client gets its own connection instead of sharing one with every channel of
    # the process to the same target (gRPC's global subchannel pool), so that several
    # Clients spread over the worker processes of a `--workers N` server.
    ("grpc.use_local_subchannel_pool", 1),
)

RETRY_BUFFER_BYTES = 64 << 20
# Streamed results whose layout a Client remembers (see ``Client.gradients``), and the
# smallest tensor it prepares an array for ahead of the stream.
_LAYOUTS_KEPT = 16
_PREPARE_MIN_BYTES = 1 << 20
# ExportGradients calls made again after replacing a region too small or gone.
_REGION_RETRIES = 2
RETRY_SERVICE_CONFIG = _channel.service_config(retry=True, balanced=False)
# Refusals that per-call waiting (``wait_for_ready``) waits out: the server is up but not ready.
_WAIT_REASONS = frozenset({"MODEL_LOADING"})

_T = TypeVar("_T")
Names: TypeAlias = str | Sequence[str]
"""Layer or parameter names: one name, a list of names, or "all" where allowed."""
OutputDType: TypeAlias = Literal["float32", "float16", "bfloat16"] | npt.DTypeLike


class Pattern(enum.StrEnum):
    """How the server runs the backward pass; each value is one Chainer idiom."""

    BACKWARD = "backward"
    """``loss.backward()``: parameter and input gradients; no intermediate layers."""
    BACKWARD_RETAIN_GRAD = "backward_retain_grad"
    """``loss.backward(retain_grad=True)``: every gradient is kept."""
    GRAD = "grad"
    """``chainer.grad([loss], targets)``: only the requested gradients are computed."""


_PATTERN_TO_PROTO = {
    Pattern.BACKWARD: pb.BACKWARD_PATTERN_BACKWARD,
    Pattern.BACKWARD_RETAIN_GRAD: pb.BACKWARD_PATTERN_BACKWARD_RETAIN_GRAD,
    Pattern.GRAD: pb.BACKWARD_PATTERN_GRAD,
}


@dataclass(frozen=True)
class InputSpec:
    """The format of a prepared input."""

    shape: tuple[int, ...]
    dtype: str
    layout: str
    channel_order: str
    mean: tuple[float, ...]
    image_formats: tuple[str, ...]
    #: Empty when only ``shape`` is taken, else the smallest (height, width) accepted.
    min_size: tuple[int, ...] = ()
    #: How images are resized: "bicubic" (Pillow's default, Chainer's prepare) or "custom".
    resize: str = ""


@dataclass(frozen=True)
class LayerInfo:
    """A layer and the shape of its output for one input (no batch dimension)."""

    name: str
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class ParameterInfo:
    """A learnable parameter, named ``"<link>/<W|b>"``."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class WeightsInfo:
    """Where the served weights come from, with their digests (lowercase hex SHA-256)."""

    source: str
    pretrained: bool
    file_sha256: str
    parameters_sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """The served model: input format, layers, parameters, weights and server limits."""

    model_name: str
    input_spec: InputSpec
    layers: tuple[LayerInfo, ...]
    parameters: tuple[ParameterInfo, ...]
    weights: WeightsInfo
    versions: dict[str, str]
    device: str
    max_unary_response_bytes: int
    stream_chunk_bytes: int
    max_batch_size: int
    #: The served name and version to use in calls (``model=``), for example "vgg16".
    model: str = ""
    model_version: str = ""
    #: Class names, index i naming class i (empty when the model has none).
    labels: tuple[str, ...] = ()
    logits_layer: str = ""
    probability_layer: str = ""
    #: Every link (``links=`` targets) in the order the forward first calls them.
    links: tuple[LayerInfo, ...] = ()

    def class_name(self, index: int) -> str:
        """The name of class ``index``, or "" when the model has no labels for it."""
        return self.labels[index] if 0 <= index < len(self.labels) else ""

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Layer names in forward order."""
        return tuple(layer.name for layer in self.layers)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Parameter names in model order."""
        return tuple(param.name for param in self.parameters)

    @property
    def num_parameters(self) -> int:
        """Total number of parameter elements."""
        return sum(param.size for param in self.parameters)

    @property
    def parameter_nbytes(self) -> int:
        """Total size of the parameters in bytes."""
        return sum(param.size * np.dtype(param.dtype).itemsize for param in self.parameters)


class TopClass(tuple):
    """One ranked class: unpacks as ``(index, probability)``; ``name`` is the class name."""

    name: str

    def __new__(cls, index: int, probability: float, name: str = "") -> TopClass:
        self = super().__new__(cls, (index, probability))
        self.name = name
        return self

    @property
    def index(self) -> int:
        return self[0]

    @property
    def probability(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        return f"TopClass(index={self[0]}, probability={self[1]:.6g}, name={self.name!r})"


@dataclass(frozen=True)
class ModelStatus:
    """A served model and whether it can be called: state "loading", "ready" or "failed"."""

    name: str
    version: str
    state: str
    architecture: str
    default: bool = False
    #: Why loading failed (state "failed").
    message: str = ""
    weights_source: str = ""


_MODEL_STATES = {
    pb.MODEL_STATE_LOADING: "loading",
    pb.MODEL_STATE_READY: "ready",
    pb.MODEL_STATE_FAILED: "failed",
}


def _model_statuses(response: pb.ListModelsResponse) -> list[ModelStatus]:
    return [
        ModelStatus(
            name=m.name,
            version=m.version,
            state=_MODEL_STATES.get(m.state, "unknown"),
            architecture=m.architecture,
            default=m.name == response.default_model,
            message=m.message,
            weights_source=m.weights_source,
        )
        for m in response.models
    ]


@dataclass(frozen=True)
class GradientResult:
    """The tensors a gradient call returned.

    Attributes:
        input: gradient with respect to the prepared input, ``[batch, 3, 224, 224]``, or None.
        layers: gradients with respect to layer outputs, by layer name, in forward order.
        parameters: gradients with respect to parameters (summed over the batch), by name.
        activations: forward outputs of the requested layers, by layer name.
        loss: the loss value, or None for an UpstreamGradient loss.
        links: gradients with respect to link outputs, by link path (``"res4/b5"``).
        request_id: the call's request id (``x-request-id``: the one passed to the call, or
            the server's); for a batch split into several calls, the last call's.
        timings: seconds the server spent in each phase (``queue``, ``compute``, ``send``,
            from its ``server-timing`` trailer); summed over the calls of a split batch.
    """

    input: np.ndarray | None = None
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, np.ndarray] = field(default_factory=dict)
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    loss: float | None = None
    links: dict[str, np.ndarray] = field(default_factory=dict)
    request_id: str | None = field(default=None, compare=False)
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, np.ndarray]:
        """Every tensor under one flat key, for ``np.savez``.

        Keys: ``"input"``, ``"layer/<name>"``, ``"link/<path>"``, ``"param/<name>"``,
        ``"activation/<name>"``.
        """
        flat: dict[str, np.ndarray] = {}
        if self.input is not None:
            flat["input"] = self.input
        flat.update({f"layer/{name}": array for name, array in self.layers.items()})
        flat.update({f"link/{path}": array for path, array in self.links.items()})
        flat.update({f"param/{name}": array for name, array in self.parameters.items()})
        flat.update({f"activation/{name}": array for name, array in self.activations.items()})
        return flat


class Prediction(dict[str, np.ndarray]):
    """What :meth:`Client.predict` returns: the outputs by layer name (a ``dict``), with the
    call's ``request_id`` and the server's ``timings`` (see :class:`GradientResult`)."""

    request_id: str | None = None
    timings: dict[str, float]

    def __init__(
        self,
        outputs: Mapping[str, np.ndarray],
        request_id: str | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(outputs)
        self.request_id = request_id
        self.timings = dict(timings or {})


def _summed(timings: Sequence[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for one in timings:
        for phase, seconds in one.items():
            total[phase] = total.get(phase, 0.0) + seconds
    return total


class Client:
    """A connection to a layergrad server.

    Args:
        target: the server address, for example ``"127.0.0.1:50051"``; a host without a
            port means port 50051 (:data:`DEFAULT_PORT`). Replicas: a list of IP addresses
            (``["10.0.0.5:50051", "10.0.0.6:50051"]``), gRPC's ``"ipv4:a:p,b:p"`` form, or a
            DNS name (``"dns:///layergrad-headless.ns.svc:50051"``, a headless Service);
            calls are then spread over the replicas that are SERVING (see ``load_balancing``).
        timeout: deadline of each call in seconds, unless a call passes its own;
            None means no deadline.
        credentials: channel credentials for TLS (``grpc.ssl_channel_credentials(...)``);
            with none of these and no ``root_certificates``, the channel is plaintext.
        root_certificates: PEM CA certificates to verify the server with (opens TLS);
            ``b""`` is not allowed, pass None for the system roots via ``credentials``.
        private_key: PEM private key of the client certificate, for mutual TLS.
        certificate_chain: PEM client certificate chain, for mutual TLS.
        token: a bearer token, sent as ``authorization: Bearer <token>`` metadata on
            every call. Needs TLS, or a loopback target (127.0.0.0/8, ::1, localhost).
        retry: whether gRPC retries UNAVAILABLE and overload refusals (see the module).
        wait_for_ready: the default of every call's ``wait_for_ready``: whether a call
            waits, within its deadline, for a server that is not listening yet or is
            still loading its model, instead of failing with Unavailable.
        load_balancing: whether to balance calls over the target's addresses with gRPC's
            ``round_robin`` policy and client-side health checking (each connection
            watches the server's ``grpc.health.v1`` status and leaves the rotation while
            it is not SERVING: loading, draining or gone); a refused or broken call is
            retried on another replica by the retry policy. None (the default) turns it
            on for lists of addresses and ``dns:`` names and off for one address.
        split_batches: whether calls with more inputs than the server accepts
            (``ModelInfo.max_batch_size``) are split into several calls whose results
            are joined (see :meth:`gradients`); if False they are refused with
            InvalidArgument (reason ``BATCH_TOO_LARGE``).
        options: extra gRPC channel options, ``(name, value)`` pairs or a mapping;
            they override :data:`DEFAULT_CHANNEL_OPTIONS` of the same name.
        model: the served model every call uses unless it names its own (``model=``);
            empty means the server's default model (see :meth:`list_models`).
        model_version: its version; empty means the served one.

    Use it as a context manager, or call :meth:`close`. A closed client raises
    :class:`~layergrad.errors.ClientClosedError` and cannot be reopened.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        retry: bool = True,
        wait_for_ready: bool = False,
        load_balancing: bool | None = None,
        split_batches: bool = True,
        options: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
        model: str = "",
        model_version: str = "",
    ) -> None:
        self.model = _model_name(model)
        self.model_version = model_version
        settings = _ChannelSettings.of(
            target,
            credentials=credentials,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
            retry=retry,
            load_balancing=load_balancing,
            options=options,
        )
        target = self.target = settings.target
        self.timeout = timeout
        self._wait_default = wait_for_ready
        self.split_batches = split_batches
        self.load_balancing = settings.load_balancing
        channel_options = self._channel_options = settings.options
        credentials = settings.credentials
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._regions = RegionPool()
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        # Stream messages are parsed by hand so each chunk's data is copied only once,
        # straight into its preallocated array (see ``parse_stream_chunk``).
        self._stub.StreamGradients = self._channel.unary_stream(
            f"/{SERVICE_NAME}/StreamGradients",
            request_serializer=pb.StreamGradientsRequest.SerializeToString,
            response_deserializer=parse_stream_chunk,
            _registered_method=True,
        )
        # GetModelInfo's response as bytes: an unchanged answer reuses its ModelInfo.
        self._stub.GetModelInfo = self._channel.unary_unary(
            f"/{SERVICE_NAME}/GetModelInfo",
            request_serializer=pb.GetModelInfoRequest.SerializeToString,
            _registered_method=True,
        )
        self._stub.Explain = self._channel.unary_stream(
            f"/{SERVICE_NAME}/Explain",
            request_serializer=pb.ExplainRequest.SerializeToString,
            response_deserializer=pb.ExplainResponse.FromString,
            _registered_method=True,
        )
        self._model_info: dict[tuple[str, str], tuple[bytes, ModelInfo]] = {}
        # The most inputs per call, once learned from the server (see ``split_batches``).
        self._max_batch: int | None = None
        self._layouts: OrderedDict[tuple[Any, ...], tuple[_TensorLayout, ...]] = OrderedDict()
        self._layouts_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<layergrad.Client target={self.target!r} {state}>"

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Closes the channel, cancelling calls in flight, and unlinks the shared memory regions.

        Calling it again does nothing. Arrays returned with ``copy=False`` keep their
        memory (no longer shared) for as long as they live.
        """
        if not self._closed:
            self._closed = True
            self._channel.close()
            self._regions.close()

    @property
    def shared_memory_regions(self) -> list[str]:
        """POSIX names of the shared memory segments this Client holds now (see ``shared_memory``)."""
        return self._regions.names()

    def free_shared_memory(self) -> None:
        """Unlinks this Client's shared memory regions now; the next ``shared_memory`` call makes a new one.

        A region is as large as the largest result so far (553 MB for every parameter
        gradient), and stays until the Client is closed unless freed here.
        """
        self._regions.clear()

    def wait_for_ready(self, timeout: float | None = None) -> None:
        """Blocks until the server is ready to compute: listening, with its model loaded.

        With replicas, until one of them is. ``timeout``: seconds to wait at most (None
        uses the client's timeout); DeadlineExceeded when it passes first. Polls the
        server's ``grpc.health.v1`` status of the GradientService.
        """
        self._check_open()
        total = self._timeout(timeout)
        deadline = None if total is None else time.monotonic() + total
        try:
            _channel.wait_serving(self._channel, deadline)
        except ValueError as exc:
            if self._closed:
                raise ClientClosedError("the client was closed while waiting") from exc
            raise

    def model_info(
        self,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        model: str | None = None,
        model_version: str | None = None,
    ) -> ModelInfo:
        """Describes a served model (default: the Client's ``model``): input format, layers,
        links, parameters, weights, labels, limits."""
        name, version = self._model_of(model, model_version)
        request = pb.GetModelInfoRequest(model=name, model_version=version)
        raw = self._invoke(lambda kwargs: self._stub.GetModelInfo(request, **kwargs), timeout, wait_for_ready)
        known = self._model_info.get((name, version))
        if known is None or known[0] != raw:
            known = (raw, _model_info(pb.GetModelInfoResponse.FromString(raw)))
            self._model_info[(name, version)] = known
            if known[1].max_batch_size > 0:
                self._max_batch = known[1].max_batch_size
        # Everything in a ModelInfo is immutable but ``versions``: each caller gets its own.
        return dataclasses.replace(known[1], versions=dict(known[1].versions))

    def _model_of(self, model: str | None, version: str | None) -> tuple[str, str]:
        """The (model, version) a call names: its own, else the Client's."""
        if model is None:
            return self.model, self.model_version if version is None else version
        return _model_name(model), version or ""

    def predict(
        self,
        images: Images,
        layers: Names = ("prob",),
        *,
        dtype: OutputDType = "float32",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        progress: Callable[[int, int], None] | None = None,
        model: str | None = None,
        model_version: str | None = None,
        request_id: str | None = None,
        exact: bool = False,
    ) -> Prediction:
        """Runs the forward pass and returns the outputs of ``layers``, each ``[batch] + layer shape``.

        ``wait_for_ready``: wait for a server not ready yet; a batch larger than the
        server takes is split into several calls, their outputs concatenated, with
        ``progress`` called after each (see :meth:`gradients`). ``request_id``: the call's
        ``x-request-id`` (the server makes one if None); the result is a dict of the
        outputs with the ``request_id`` and server ``timings`` of the call. ``exact``: never
        computed together with other callers' calls (see :meth:`gradients`).
        """
        name, version = self._model_of(model, model_version)
        request = _predict_request(images, layers, dtype, name, version, exact)

        def run(part: pb.PredictRequest) -> Prediction:
            response, call = self._invoke(
                lambda kwargs: self._stub.Predict.with_call(part, **kwargs),
                timeout,
                wait_for_ready,
                request_id,
            )
            outputs = {named.name: result_from_tensor(named.tensor) for named in response.activations}
            return Prediction(outputs, *call_info(call))

        batch = len(request.inputs)
        whole, limit = self._whole_or_limit(lambda: run(request), batch, progress, timeout)
        if limit is None:
            return whole
        parts = []
        for start, stop in _batching.bounds(batch, limit):
            part = _predict_part(request, start, stop)
            parts.append(run(part))
            if progress is not None:
                progress(stop, batch)
        return Prediction(
            _batching.join_predictions(parts), parts[-1].request_id, _summed([p.timings for p in parts])
        )

    def explain(
        self,
        images: Images,
        method: str = "gradcam",
        target: int | Sequence[int] | str | None = None,
        *,
        score_layer: str = "",
        dtype: OutputDType = "float32",
        model: str | None = None,
        model_version: str | None = None,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        **options: Any,
    ) -> Explanation:
        """An attribution map of each target, computed by the server (the Explain RPC).

        ``method``: saliency, gradient_x_input, smoothgrad, smoothgrad_sq, vargrad,
        integrated_gradients (``ig``), gradcam, gradcam_pp, guided_backprop or
        guided_gradcam. ``target``: a class for every image, a list with one class per
        image, or ``"topK"`` (each image's K best classes; default ``"top1"``). The score
        explained is ``score_layer`` (default the logits, before softmax). ``options``:
        SmoothGrad ``samples``, ``noise_level``, ``seed``, ``unbiased``; Integrated
        Gradients ``steps``, ``rule``, ``baseline`` (``mean``, ``black``, ``noise``,
        ``blur`` or a prepared array), ``seed``, ``blur_sigma``; the Grad-CAM methods
        ``layer``, ``relu``, ``upsampling``, ``align_corners``. See
        ``docs/explanations.md``. The whole explanation is one call: it is not split.
        """
        name, version = self._model_of(model, model_version)
        request = _explain.build_request(
            images, method, target, score_layer=score_layer, dtype=dtype, model=name, **options
        )
        request.model_version = version
        images_given = _explain.image_list(images)
        return self._invoke(
            lambda kwargs: _explain.assemble(self._stub.Explain(request, **kwargs), images_given),
            timeout,
            wait_for_ready,
        )

    def top_classes(
        self,
        images: Images,
        k: int = 5,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        model: str | None = None,
    ) -> list[list[TopClass]]:
        """The ``k`` most probable classes per image, best first: ``(index, probability)`` pairs
        whose ``.name`` is the class name (empty when the model has no labels).

        Reads the model's probability layer (``ModelInfo.probability_layer``, VGG16's ``prob``).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        info = self.model_info(timeout=timeout, wait_for_ready=wait_for_ready, model=model)
        layer = info.probability_layer
        if not layer:
            raise ValueError(f"model {info.model!r} has no probability layer to rank classes by")
        prob = self.predict(
            images, (layer,), timeout=timeout, wait_for_ready=wait_for_ready, model=info.model
        )[layer]
        best = np.argsort(-prob, axis=1, kind="stable")[:, :k]
        return [
            [TopClass(int(c), float(row[c]), info.class_name(int(c))) for c in order]
            for row, order in zip(prob, best, strict=True)
        ]

    def list_models(
        self, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> list[ModelStatus]:
        """The models the server serves, with their state (the default one has ``default``)."""
        response = self._invoke(
            lambda kwargs: self._stub.ListModels(pb.ListModelsRequest(), **kwargs), timeout, wait_for_ready
        )
        return _model_statuses(response)

    def gradients(
        self,
        images: Images,
        loss: Loss,
        *,
        pattern: Pattern | str = Pattern.GRAD,
        parameters: Names | None = None,
        layers: Names | None = None,
        input: bool = False,
        activations: Names = (),
        dtype: OutputDType = "float32",
        timeout: float | None = None,
        shared_memory: bool = False,
        copy: bool = True,
        out: GradientResult | None = None,
        wait_for_ready: bool | None = None,
        links: Names = (),
        model: str | None = None,
        model_version: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        request_id: str | None = None,
        exact: bool = False,
    ) -> GradientResult:
        """Computes the requested gradients of ``loss``, streamed so any size works.

        Args:
            images: one image or a batch (see :mod:`layergrad._inputs` for the accepted kinds).
            loss: the objective, one of :mod:`layergrad.losses`.
            pattern: how backward runs: "grad", "backward" or "backward_retain_grad".
            parameters: parameter names (``"fc8/W"``) or ``"all"``.
            layers: layer names (``"conv5_3"``) or ``"all"`` (every layer up to the loss layer).
                Not allowed with pattern "backward".
            input: whether to return the gradient with respect to the prepared input.
            activations: layers whose forward outputs to return too.
            dtype: element type on the wire, "float32", "float16" or "bfloat16". The two
                reduced types halve the bytes sent and come back as float32 arrays holding
                the values received: bfloat16 keeps float32's range with 8 significant bits;
                float16 keeps 11, each tensor scaled by a power of two into float16's range
                on the server and unscaled here. A tensor float16 (or bfloat16) cannot hold
                without a value becoming infinite or zero raises OutOfRange (reason
                FLOAT16_OUT_OF_RANGE or BFLOAT16_OUT_OF_RANGE; ``error_info.metadata`` counts
                the values) rather than lose them.
            links: link paths (``"res4/b5"``, see ``ModelInfo.links``) whose outputs' gradients
                to return (in ``GradientResult.links``). Not allowed with pattern "backward".
            model, model_version: the served model to use; None uses the Client's ``model``
                (an empty name: the server's default model).
            timeout: deadline of the whole call in seconds; None uses the client's timeout.
            shared_memory: have the server write the result into this Client's POSIX shared
                memory region (the ExportGradients RPC) instead of sending it over the
                connection: the same tensors, much faster for large results. Only for a
                server on this host (a loopback or ``unix:`` target) started with
                ``--shared-memory``, running as the same user; FailedPrecondition if the
                server has it off. The region is created on first use, reused by later
                calls and replaced by a bigger one when a result does not fit (one region
                per call in flight); :meth:`close` unlinks it. OSError if the region cannot be
                created (for example ``/dev/shm`` is full).
            copy: with ``shared_memory``, whether to copy each tensor out of the region
                into its own array (the default: the arrays are yours to keep). With
                ``copy=False`` the arrays are read-only views of the region, with no copy
                at all: they are valid until the next ``shared_memory=True`` call of this
                Client, which overwrites them, so copy what you keep. Without
                ``shared_memory`` it has no effect (streamed arrays are always your own).
            out: arrays to write the result into instead of new ones, typically the
                result of the previous call when computing gradients repeatedly: every
                tensor of the result that ``out`` holds (``out.parameters["fc8/W"]``,
                ``out.input``, ...) is written in place and the returned result holds that
                same array; the other tensors get new arrays. ValueError if such an array
                does not have the tensor's shape and dtype or is read-only or not
                C-contiguous; after any error, arrays of ``out`` may hold part of the new
                result. Not with ``shared_memory``.
            wait_for_ready: whether the call waits, within its deadline, for a server
                that is not reachable yet (gRPC's ``wait_for_ready``) or answers
                Unavailable because its model is still loading; None uses the Client's
                ``wait_for_ready``. Without waiting such a call fails with Unavailable
                after gRPC's few retries.
            progress: called as ``progress(inputs_done, inputs_total)`` after each call
                to the server (once, or once per sub-batch; see below).
            request_id: sent as the call's ``x-request-id`` metadata, to find the call in the
                server's access log (every sub-batch's call gets it); None: the server makes
                one. The result's ``request_id`` and ``timings`` say what the server reported.
            exact: never have the call computed together with other callers'. A server
                started with ``--batch-delay-ms`` computes concurrent calls that ask for
                the same per-input tensors (no parameter gradients) as one batch; each gets
                its own rows, equal to its own call to float32 rounding but where rounding
                moves a ReLU or max-pooling input across its tie (README, Dynamic batching).
                With ``exact`` the result is bit-identical to the same Chainer code in-process.

        Batches larger than the server takes (``ModelInfo.max_batch_size``) are split
        into consecutive sub-batches, one call each (``timeout`` applies to each), and
        joined as one call with every input would return them: parameter gradients
        and loss values summed, per-input gradients and activations concatenated,
        SoftmaxCrossEntropy (a batch mean) weighted by each sub-batch's share of the
        inputs. They agree with one big call to float32 rounding: within
        ``rtol=1e-4`` of each tensor's largest magnitude (the sums over the batch are
        added in another order). The loss's per-input data (classes, labels, targets,
        upstream gradients) must then hold one entry per input (ValueError otherwise).
        The Client learns the limit from :meth:`model_info` (or the server's first
        ``BATCH_TOO_LARGE`` refusal); ``split_batches=False`` turns splitting off.

        A Client remembers the layout (names, shapes, dtypes) of recent results; when a
        call asks for the same targets as an earlier one, the arrays of its large tensors
        are allocated and their memory mapped while the server computes, before the
        first chunk arrives.
        """
        kind = pb.ExportGradientsRequest if shared_memory else pb.StreamGradientsRequest
        if shared_memory and not _is_local(self.target):
            raise ValueError(
                f"shared_memory=True needs a server on this host (a loopback or unix: target), "
                f"not {self.target!r}"
            )
        request = _gradients_request(
            kind,
            images,
            loss,
            pattern,
            parameters,
            layers,
            input,
            activations,
            dtype,
            *self._model_of(model, model_version),
            links,
            exact,
        )
        if shared_memory and out is not None:
            raise ValueError("out= is not supported with shared_memory=True")
        if out is not None and not isinstance(out, GradientResult):
            raise TypeError(f"out must be a GradientResult, not {type(out).__name__}")

        def run(part: Any, part_out: GradientResult | None) -> GradientResult:
            if shared_memory:
                return self._export_gradients(part, timeout, copy, wait_for_ready, request_id)
            return self._stream_gradients(part, part_out, timeout, wait_for_ready, request_id)

        return self._batched_gradients(request, loss, run, out, progress, timeout)

    def _batched_gradients(
        self,
        request: Any,
        loss: Loss,
        run: Callable[[Any, GradientResult | None], GradientResult],
        out: GradientResult | None,
        progress: _batching.Progress | None,
        timeout: float | None,
    ) -> GradientResult:
        """``run(request, out)``, split into sub-batches if it has more inputs than the server takes."""
        batch = len(request.inputs)
        whole, limit = self._whole_or_limit(lambda: run(request, out), batch, progress, timeout)
        if limit is None:
            return whole
        join = _batching.GradientJoin(batch, loss._reduction, out)
        results = []
        for start, stop, part in _batching.sub_requests(request, loss, limit):
            result = run(part, None)
            join.add(result, start, stop)
            results.append((result.request_id, result.timings))
            if progress is not None:
                progress(stop, batch)
        return dataclasses.replace(
            join.finish(), request_id=results[-1][0], timings=_summed([timings for _, timings in results])
        )

    def _whole_or_limit(
        self,
        call: Callable[[], _T],
        batch: int,
        progress: _batching.Progress | None,
        timeout: float | None,
    ) -> tuple[_T | None, int | None]:
        """(the whole batch's answer, None) when one call takes it; else (None, the limit to split
        at): the known limit, or the one learnt from the server refusing the batch as too large."""
        limit = self._max_batch if self.split_batches else None
        if limit is not None and batch > limit:
            return None, limit
        try:
            answer = call()
        except InvalidArgument as exc:
            limit = self._batch_limit_after(exc, batch, timeout)
            if limit is None:
                raise
            return None, limit
        if progress is not None:
            progress(batch, batch)
        return answer, None

    def _batch_limit_after(self, error: InvalidArgument, batch: int, timeout: float | None) -> int | None:
        """The server's batch limit after it refused a batch as too large; None if splitting cannot help."""
        if not self.split_batches or error.reason != "BATCH_TOO_LARGE":
            return None
        limit = self.model_info(timeout=timeout).max_batch_size
        logger.debug("%s takes at most %d inputs per call; splitting %d", self.target, limit, batch)
        return limit if 0 < limit < batch else None

    def _stream_gradients(
        self,
        request: pb.StreamGradientsRequest,
        out: GradientResult | None,
        timeout: float | None,
        wait_for_ready: bool | None,
        request_id: str | None = None,
    ) -> GradientResult:
        """One StreamGradients call, its chunks written into ``out``'s or new arrays."""
        provided = _out_arrays(out)
        key = _layout_key(request)
        with self._layouts_lock:
            layout = self._layouts.get(key)

        def stream_into_arrays(kwargs: dict[str, Any]) -> tuple[_ChunkAssembler, Any]:
            stream = self._stub.StreamGradients(request, **kwargs)
            try:
                prepared = _prepare_arrays(layout, provided) if layout else None
                assembler = _ChunkAssembler(provided, prepared)
                for chunk in stream:
                    assembler.add(chunk)
            finally:
                stream.cancel()  # no-op once the stream has ended; frees it on a local error
            return assembler, stream

        assembler, stream = self._invoke(stream_into_arrays, timeout, wait_for_ready, request_id)
        tensors = assembler.finish()
        self._remember_layout(key, tensors)
        return _gradient_result(tensors, assembler.loss, stream)

    def _remember_layout(self, key: tuple[Any, ...], tensors: Sequence[AssembledTensor]) -> None:
        """Keeps the layout of a streamed result for later calls with the same targets."""
        layout = tuple(_TensorLayout(t.kind, t.name, t.array.shape, t.array.dtype) for t in tensors)
        with self._layouts_lock:
            self._layouts[key] = layout
            self._layouts.move_to_end(key)
            while len(self._layouts) > _LAYOUTS_KEPT:
                self._layouts.popitem(last=False)

    def _export_gradients(
        self,
        request: pb.ExportGradientsRequest,
        timeout: float | None,
        copy: bool,
        wait: bool | None,
        request_id: str | None = None,
    ) -> GradientResult:
        """``gradients(shared_memory=True)``: ExportGradients into a region of this Client's pool.

        A region too small for the result (the server says how many bytes it needs,
        before computing anything) or unlinked by someone else is replaced and the
        call made again, within the same deadline.
        """
        self._check_open()
        total = self._timeout(timeout)
        deadline = None if total is None else time.monotonic() + total
        region = self._regions.acquire()
        try:
            retries = 0
            while True:
                request.region.CopyFrom(region.to_proto())
                remaining = _remaining(deadline)
                try:
                    response, call = self._invoke(
                        lambda kwargs: self._stub.ExportGradients.with_call(request, **kwargs),
                        remaining,
                        wait,
                        request_id,
                    )
                    break
                except (InvalidArgument, NotFound) as exc:
                    size = _region_size_needed(exc, region.size)
                    if size is None or retries == _REGION_RETRIES:
                        raise
                retries += 1
                region = self._regions.replace(region, size)
            try:
                tensors = region.read(response, copy=copy)
            except ValueError as exc:
                if self._closed:  # the region was unmapped by close() from another thread
                    raise ClientClosedError("the client was closed during the call") from exc
                raise
        finally:
            self._regions.release(region)
        return _gradient_result(tensors, response.loss if response.HasField("loss") else None, call)

    def compute_gradients_unary(
        self,
        images: Images,
        loss: Loss,
        *,
        pattern: Pattern | str = Pattern.GRAD,
        parameters: Names | None = None,
        layers: Names | None = None,
        input: bool = False,
        activations: Names = (),
        dtype: OutputDType = "float32",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        links: Names = (),
        model: str | None = None,
        model_version: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        request_id: str | None = None,
        exact: bool = False,
    ) -> GradientResult:
        """Same as :meth:`gradients` through the unary ComputeGradients RPC.

        The server refuses with ResourceExhausted a result above
        ``ModelInfo.max_unary_response_bytes``; use :meth:`gradients` for those.
        """
        request = _gradients_request(
            pb.ComputeGradientsRequest,
            images,
            loss,
            pattern,
            parameters,
            layers,
            input,
            activations,
            dtype,
            *self._model_of(model, model_version),
            links,
            exact,
        )

        def run(part: pb.ComputeGradientsRequest, _out: GradientResult | None) -> GradientResult:
            response, call = self._invoke(
                lambda kwargs: self._stub.ComputeGradients.with_call(part, **kwargs),
                timeout,
                wait_for_ready,
                request_id,
            )
            tensors = [
                AssembledTensor(named.name, named.kind, result_from_tensor(named.tensor))
                for named in [*response.gradients, *response.activations]
            ]
            return _gradient_result(tensors, response.loss if response.HasField("loss") else None, call)

        return self._batched_gradients(request, loss, run, None, progress, timeout)

    def input_gradient(
        self,
        images: Images,
        loss: Loss,
        *,
        dtype: OutputDType = "float32",
        timeout: float | None = None,
        out: np.ndarray | None = None,
        wait_for_ready: bool | None = None,
        model: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """The gradient of ``loss`` with respect to the prepared input, ``[batch, 3, 224, 224]``.

        ``out``: an array to write it into (see ``gradients``).
        """
        result = self.gradients(
            images,
            loss,
            pattern=Pattern.GRAD,
            input=True,
            dtype=dtype,
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            model=model,
            progress=progress,
            out=None if out is None else GradientResult(input=out),
        )
        if result.input is None:
            raise _missing("input gradient")
        return result.input

    def parameter_gradients(
        self,
        images: Images,
        loss: Loss,
        parameters: Names = "all",
        *,
        dtype: OutputDType = "float32",
        timeout: float | None = None,
        out: Mapping[str, np.ndarray] | None = None,
        wait_for_ready: bool | None = None,
        model: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Gradients of ``loss`` with respect to parameters (``loss.backward()``), by name.

        ``out``: arrays by parameter name to write the gradients into, typically the
        previous call's result (see ``gradients``)::

            grads = client.parameter_gradients(x, loss)
            for x in batches:
                grads = client.parameter_gradients(x, loss, out=grads)  # no new memory
        """
        result = self.gradients(
            images,
            loss,
            pattern=Pattern.BACKWARD,
            parameters=parameters,
            dtype=dtype,
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            model=model,
            progress=progress,
            out=None if out is None else GradientResult(parameters=_out_mapping(out)),
        )
        return result.parameters

    def layer_gradients(
        self,
        images: Images,
        loss: Loss,
        layers: Names,
        *,
        dtype: OutputDType = "float32",
        timeout: float | None = None,
        out: Mapping[str, np.ndarray] | None = None,
        wait_for_ready: bool | None = None,
        model: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Gradients of ``loss`` with respect to layer outputs (``chainer.grad``), by layer name.

        ``out``: arrays by layer name to write the gradients into (see ``gradients``).
        """
        result = self.gradients(
            images,
            loss,
            pattern=Pattern.GRAD,
            layers=layers,
            dtype=dtype,
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            model=model,
            progress=progress,
            out=None if out is None else GradientResult(layers=_out_mapping(out)),
        )
        return result.layers

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the client has been closed; create a new Client")

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _invoke(
        self,
        call: Callable[[dict[str, Any]], _T],
        timeout: float | None,
        wait: bool | None,
        request_id: str | None = None,
    ) -> _T:
        """``call(kwargs)``, a stub call given ``kwargs`` (its timeout, wait_for_ready and the
        metadata carrying ``request_id``), as one call.

        Errors become typed ones. When waiting, a refusal because the server is not
        ready yet is followed by waiting for its health to be SERVING and calling
        again, all within the one deadline.
        """
        wait = self._wait_default if wait is None else wait
        total = self._timeout(timeout)
        metadata = request_metadata(request_id)
        if not wait:
            with self._rpc():
                return call({"timeout": total, **metadata})
        deadline = None if total is None else time.monotonic() + total
        while True:
            try:
                with self._rpc():
                    return call({"timeout": _remaining(deadline), "wait_for_ready": True, **metadata})
            except Unavailable as exc:
                if exc.reason not in _WAIT_REASONS:
                    raise
                logger.debug("%s is not ready (%s); waiting", self.target, exc.reason)
            _channel.wait_serving(self._channel, deadline)

    @contextmanager
    def _rpc(self) -> Iterator[None]:
        """Refuses a closed client and turns grpc.RpcError into typed errors."""
        self._check_open()
        try:
            yield
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        except ValueError as exc:
            if self._closed:  # grpc raises ValueError for a channel closed mid-call
                raise ClientClosedError("the client was closed during the call") from exc
            raise


@dataclass(frozen=True)
class _ChannelSettings:
    """Everything a channel of the sync or the asyncio Client is opened with."""

    target: str
    load_balancing: bool
    options: list[tuple[str, Any]]
    credentials: grpc.ChannelCredentials | None

    @classmethod
    def of(
        cls,
        target: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None,
        root_certificates: bytes | None,
        private_key: bytes | None,
        certificate_chain: bytes | None,
        token: str | None,
        retry: bool,
        load_balancing: bool | None,
        options: Sequence[tuple[str, Any]] | Mapping[str, Any] | None,
    ) -> _ChannelSettings:
        normalized, replicas = _channel.normalize_target(target)
        balanced = replicas if load_balancing is None else load_balancing
        config = _channel.service_config(retry=retry, balanced=balanced)
        channel_args: list[tuple[str, Any]] = [("grpc.enable_retries", 1 if retry else 0)]
        if retry:
            # gRPC retries only calls whose request fits this buffer (default 256 KiB).
            channel_args.append(("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES))
        if config is not None:
            channel_args.append(("grpc.service_config", json.dumps(config)))
        return cls(
            target=normalized,
            load_balancing=balanced,
            options=_merge_options([*DEFAULT_CHANNEL_OPTIONS, *channel_args], options),
            credentials=_channel_credentials(
                normalized, credentials, root_certificates, private_key, certificate_chain, token
            ),
        )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _channel_credentials(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    token: str | None,
) -> grpc.ChannelCredentials | None:
    """The channel credentials for the Client's arguments; None means plaintext without a token."""
    pem = root_certificates is not None or private_key is not None or certificate_chain is not None
    if credentials is not None and pem:
        raise ValueError("pass either credentials or root_certificates/private_key/certificate_chain")
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (a client certificate)")
    if pem:
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    if token is None:
        return credentials
    if not token or any(c.isspace() for c in token):
        raise ValueError("token must be a non-empty string without whitespace")
    if credentials is None:
        if not _is_loopback(target):
            raise ValueError(
                f"refusing to send a token in clear to {target!r}: pass root_certificates= or "
                "credentials= for TLS (plaintext is allowed only to a loopback address)"
            )
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    return grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))


def _is_loopback(target: str) -> bool:
    """Whether every address of ``target`` (normalized: ``host:port``, ``[v6]:port``, ``dns:///host:port``,
    ``ipv4:a:p,b:p``) names this machine."""
    return all(_is_loopback_address(address) for address in _channel.addresses(target))


def _is_loopback_address(address: str) -> bool:
    host = address.rsplit(":", 1)[0] if not address.startswith("[") else address[1 : address.find("]")]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_local(target: str) -> bool:
    """Whether ``target`` is on this host: a loopback address or a unix socket."""
    return target.startswith(("unix:", "unix-abstract:")) or _is_loopback(target)


def _merge_options(
    defaults: Sequence[tuple[str, Any]], extra: Sequence[tuple[str, Any]] | Mapping[str, Any] | None
) -> list[tuple[str, Any]]:
    merged = dict(defaults)
    merged.update(extra.items() if isinstance(extra, Mapping) else (extra or ()))
    return list(merged.items())


def _predict_request(
    images: Images, layers: Names, dtype: OutputDType, model: str, model_version: str, exact: bool
) -> pb.PredictRequest:
    """A Predict call's request, its inputs written in place (see ``_inputs.add_inputs``)."""
    request = pb.PredictRequest()
    add_inputs(request.inputs, images)
    request.MergeFrom(
        pb.PredictRequest(
            layers=_names(layers, "layers"),
            output_dtype=_output_dtype(dtype),
            model=model,
            model_version=model_version,
            float16_scaling=True,  # this SDK undoes the scale (see _tensors.decode_into)
            exact=exact,
        )
    )
    return request


def _predict_part(request: pb.PredictRequest, start: int, stop: int) -> pb.PredictRequest:
    """The request for inputs ``start:stop`` of ``request`` (a batch split at the server's limit)."""
    part = pb.PredictRequest(
        layers=request.layers,
        output_dtype=request.output_dtype,
        model=request.model,
        model_version=request.model_version,
        float16_scaling=request.float16_scaling,
        exact=request.exact,
    )
    part.inputs.extend(request.inputs[start:stop])
    return part


def _gradients_request(
    message_type: type[pb.ComputeGradientsRequest]
    | type[pb.StreamGradientsRequest]
    | type[pb.ExportGradientsRequest],
    images: Images,
    loss: Loss,
    pattern: Pattern | str,
    parameters: Names | None,
    layers: Names | None,
    want_input: bool,
    activations: Names,
    dtype: OutputDType,
    model: str = "",
    model_version: str = "",
    links: Names = (),
    exact: bool = False,
) -> Any:
    if not isinstance(loss, Loss):
        raise TypeError(
            f"loss must be one of layergrad.losses (e.g. SumOfSquares()), not {type(loss).__name__}"
        )
    targets = _targets(parameters, layers, want_input, links)
    extra = {}
    if message_type is pb.StreamGradientsRequest and (targets.parameters or targets.all_parameters):
        # Parameter gradients are sent while the backward pass goes on; the assembler puts
        # the tensors back in the documented order (their ``position``).
        extra["parameters_when_ready"] = True
    message = message_type()
    add_inputs(message.inputs, images)
    message.MergeFrom(
        message_type(
            loss=loss._to_proto(),
            pattern=_pattern(pattern),
            targets=targets,
            activation_layers=_names(activations, "activations"),
            output_dtype=_output_dtype(dtype),
            model=_model_name(model),
            model_version=model_version,
            float16_scaling=True,  # this SDK undoes the scale (see _tensors.decode_into)
            exact=bool(exact),
            **extra,
        )
    )
    return message


def _model_name(model: str | None) -> str:
    if model is None:
        return ""
    if not isinstance(model, str):
        raise TypeError(f"model must be a model name (str), not {type(model).__name__}")
    return model


def _targets(
    parameters: Names | None, layers: Names | None, want_input: bool, links: Names = ()
) -> pb.GradientTargets:
    targets = pb.GradientTargets(input=bool(want_input), links=_names(links, "links"))
    if parameters == "all":
        targets.all_parameters = True
    elif parameters is not None:
        targets.parameters.extend(_names(parameters, "parameters"))
    if layers == "all":
        targets.all_layers = True
    elif layers is not None:
        targets.layers.extend(_names(layers, "layers"))
    if not (
        targets.input
        or targets.all_parameters
        or targets.parameters
        or targets.all_layers
        or targets.layers
        or targets.links
    ):
        raise ValueError("no gradient requested: set input=True, parameters=..., layers=... or links=...")
    return targets


def _names(names: Names, what: str) -> list[str]:
    items = [names] if isinstance(names, str) else list(names)
    if not all(isinstance(name, str) and name for name in items):
        raise TypeError(f"{what} must be names (strings), got {items!r}")
    return items


def _pattern(pattern: Pattern | str) -> int:
    try:
        return _PATTERN_TO_PROTO[Pattern(pattern)]
    except ValueError:
        choices = ", ".join(p.value for p in Pattern)
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {choices}") from None


def _output_dtype(dtype: OutputDType) -> int:
    if isinstance(dtype, str) and dtype == "bfloat16":
        return pb.DATA_TYPE_BFLOAT16
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt == np.float32:
        return pb.DATA_TYPE_FLOAT32
    if dt == np.float16:
        return pb.DATA_TYPE_FLOAT16
    raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', not {dtype!r}")


@dataclass(frozen=True)
class _TensorLayout:
    """Where a streamed tensor goes and what it looks like."""

    kind: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def _layout_key(request: pb.StreamGradientsRequest) -> tuple[Any, ...]:
    """What determines a result's layout: everything in the request but the inputs' content."""
    return (
        request.pattern,
        request.targets.SerializeToString(deterministic=True),
        tuple(request.activation_layers),
        request.output_dtype,
        len(request.inputs),
    )


def _out_mapping(out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(out, Mapping):
        raise TypeError(f"out must be a mapping of names to arrays, not {type(out).__name__}")
    return dict(out)


def _out_arrays(out: GradientResult | None) -> dict[TensorKey, np.ndarray]:
    """The arrays of ``out`` by (kind, name); the input gradient under the name "input"."""
    if out is None:
        return {}
    arrays: dict[TensorKey, np.ndarray] = {}
    if out.input is not None:
        arrays[(pb.TENSOR_KIND_INPUT_GRADIENT, _INPUT_NAME)] = out.input
    for kind, group in (
        (pb.TENSOR_KIND_LAYER_GRADIENT, out.layers),
        (pb.TENSOR_KIND_PARAMETER_GRADIENT, out.parameters),
        (pb.TENSOR_KIND_ACTIVATION, out.activations),
        (pb.TENSOR_KIND_LINK_GRADIENT, out.links),
    ):
        arrays.update({(kind, name): array for name, array in group.items()})
    return arrays


def _prepare_arrays(
    layout: Sequence[_TensorLayout], provided: Mapping[TensorKey, np.ndarray]
) -> dict[TensorKey, np.ndarray]:
    """New arrays, their memory mapped, for the large tensors of an expected result not in ``provided``."""
    prepared = {}
    for tensor in layout:
        key = (tensor.kind, tensor.name)
        if key in provided or math.prod(tensor.shape) * tensor.dtype.itemsize < _PREPARE_MIN_BYTES:
            continue
        array = np.empty(tensor.shape, tensor.dtype)
        touch_pages(array)
        prepared[key] = array
    return prepared


def _gradient_result(
    tensors: Sequence[AssembledTensor], loss: float | None, call: Any = None
) -> GradientResult:
    """The result of ``tensors``, with the request id and timings of the finished ``call``."""
    request_id, timings = call_info(call) if call is not None else (None, {})
    input_gradient = None
    groups: dict[int, dict[str, np.ndarray]] = {
        pb.TENSOR_KIND_LAYER_GRADIENT: {},
        pb.TENSOR_KIND_PARAMETER_GRADIENT: {},
        pb.TENSOR_KIND_ACTIVATION: {},
        pb.TENSOR_KIND_LINK_GRADIENT: {},
    }
    for tensor in tensors:
        if tensor.kind == pb.TENSOR_KIND_INPUT_GRADIENT:
            input_gradient = tensor.array
        elif tensor.kind in groups:
            groups[tensor.kind][tensor.name] = tensor.array
        else:
            logger.warning("ignoring tensor %r of unknown kind %d", tensor.name, tensor.kind)
    return GradientResult(
        input=input_gradient,
        layers=groups[pb.TENSOR_KIND_LAYER_GRADIENT],
        parameters=groups[pb.TENSOR_KIND_PARAMETER_GRADIENT],
        activations=groups[pb.TENSOR_KIND_ACTIVATION],
        loss=loss,
        links=groups[pb.TENSOR_KIND_LINK_GRADIENT],
        request_id=request_id,
        timings=timings,
    )


def _region_size_needed(error: InvalidArgument | NotFound, size: int) -> int | None:
    """The size of a region to retry ExportGradients with, or None when retrying cannot help."""
    if error.reason == "REGION_NOT_FOUND":
        return size
    if error.reason != "REGION_TOO_SMALL" or error.error_info is None:
        return None
    try:
        needed = int(error.error_info.metadata["needed_bytes"])
    except (KeyError, ValueError):
        return None
    return needed if needed > size else None


def _missing(what: str) -> Exception:
    return DataLoss(f"the server returned no {what}")


def _model_info(response: pb.GetModelInfoResponse) -> ModelInfo:
    spec = response.input_spec
    weights = response.weights
    return ModelInfo(
        model_name=response.model_name,
        input_spec=InputSpec(
            shape=tuple(spec.shape),
            dtype=dtype_name(spec.dtype),
            layout=spec.layout,
            channel_order=spec.channel_order,
            mean=tuple(spec.mean),
            image_formats=tuple(spec.image_formats),
            min_size=tuple(spec.min_size),
            resize=spec.resize,
        ),
        layers=tuple(LayerInfo(layer.name, tuple(layer.output_shape)) for layer in response.layers),
        parameters=tuple(
            ParameterInfo(param.name, tuple(param.shape), dtype_name(param.dtype))
            for param in response.parameters
        ),
        weights=WeightsInfo(
            source=weights.source,
            pretrained=weights.pretrained,
            file_sha256=weights.file_sha256,
            parameters_sha256=weights.parameters_sha256,
        ),
        versions=dict(sorted(response.versions.items())),
        device=response.device,
        max_unary_response_bytes=response.max_unary_response_bytes,
        stream_chunk_bytes=response.stream_chunk_bytes,
        max_batch_size=response.max_batch_size,
        model=response.model,
        model_version=response.model_version,
        labels=tuple(response.labels),
        logits_layer=response.logits_layer,
        probability_layer=response.probability_layer,
        links=tuple(LayerInfo(link.name, tuple(link.output_shape)) for link in response.links),
    )
