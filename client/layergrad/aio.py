"""The asyncio layergrad client, on ``grpc.aio``: the same calls as :class:`layergrad.Client`, awaited.

::

    import layergrad.aio
    from layergrad import ClassScore

    async with layergrad.aio.Client("127.0.0.1:50051", timeout=120) as client:
        await client.wait_for_ready()
        saliency = await client.input_gradient("cat.jpg", ClassScore("fc8", classes=[281]))

Targets (a default port, replicas, DNS names), security, retries, per-call waiting,
batch splitting, typed errors and streaming into preallocated arrays (``out=``)
behave as in the synchronous Client; requests are built and results assembled by
the same code. Not here: shared memory (``shared_memory=True``) and the unary
ComputeGradients call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
import numpy as np

from layergrad import _batching, _channel, _explain
from layergrad._calls import call_info_async, request_metadata
from layergrad._explain import Explanation
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad._inputs import Images
from layergrad._tensors import _ChunkAssembler, parse_stream_chunk, result_from_tensor
from layergrad.client import (
    _WAIT_REASONS,
    GradientResult,
    ModelInfo,
    ModelStatus,
    Names,
    OutputDType,
    Pattern,
    Prediction,
    _ChannelSettings,
    _gradient_result,
    _gradients_request,
    _missing,
    _model_info,
    _model_name,
    _model_statuses,
    _out_arrays,
    _out_mapping,
    _predict_part,
    _predict_request,
    _remaining,
    _summed,
)
from layergrad.errors import ClientClosedError, InvalidArgument, Unavailable, from_grpc_error
from layergrad.losses import Loss

__all__ = ["Client"]

_T = TypeVar("_T")
Progress = Callable[[int, int], None]


class Client:
    """An asyncio connection to a layergrad server; the arguments are those of :class:`layergrad.Client`.

    Use it as ``async with``, or ``await client.close()``. Create it inside the event
    loop that will run its calls.
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
        self.target = settings.target
        self.timeout = timeout
        self.split_batches = split_batches
        self.load_balancing = settings.load_balancing
        self._wait_default = wait_for_ready
        if settings.credentials is None:
            self._channel = grpc.aio.insecure_channel(settings.target, options=settings.options)
        else:
            self._channel = grpc.aio.secure_channel(
                settings.target, settings.credentials, options=settings.options
            )
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        # Stream messages parsed by hand, each chunk's data copied once, into its array.
        self._stream_gradients = self._channel.unary_stream(
            f"/{_channel.SERVICE_NAME}/StreamGradients",
            request_serializer=pb.StreamGradientsRequest.SerializeToString,
            response_deserializer=parse_stream_chunk,
        )
        self._max_batch: int | None = None
        self._closed = False

    async def list_models(
        self, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> list[ModelStatus]:
        """The served models with their state; see :meth:`layergrad.Client.list_models`."""
        response = await self._invoke(
            lambda kwargs: self._stub.ListModels(pb.ListModelsRequest(), **kwargs), timeout, wait_for_ready
        )
        return _model_statuses(response)

    def _model_of(self, model: str | None, version: str | None) -> tuple[str, str]:
        if model is None:
            return self.model, self.model_version if version is None else version
        return _model_name(model), version or ""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<layergrad.aio.Client target={self.target!r} {state}>"

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def close(self) -> None:
        """Closes the channel, cancelling calls in flight; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            await self._channel.close()

    async def wait_for_ready(self, timeout: float | None = None) -> None:
        """Waits until the server (one replica) is ready; see :meth:`layergrad.Client.wait_for_ready`."""
        self._check_open()
        total = self._timeout(timeout)
        await _channel.wait_serving_async(self._channel, None if total is None else time.monotonic() + total)

    async def model_info(
        self,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        model: str | None = None,
        model_version: str | None = None,
    ) -> ModelInfo:
        """Describes a served model; see :meth:`layergrad.Client.model_info`."""
        name, version = self._model_of(model, model_version)
        request = pb.GetModelInfoRequest(model=name, model_version=version)
        response = await self._invoke(
            lambda kwargs: self._stub.GetModelInfo(request, **kwargs), timeout, wait_for_ready
        )
        info = _model_info(response)
        if info.max_batch_size > 0:
            self._max_batch = info.max_batch_size
        return info

    async def predict(
        self,
        images: Images,
        layers: Names = ("prob",),
        *,
        dtype: OutputDType = "float32",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        progress: Progress | None = None,
        model: str | None = None,
        model_version: str | None = None,
        request_id: str | None = None,
        exact: bool = False,
    ) -> Prediction:
        """The outputs of ``layers`` for ``images``; see :meth:`layergrad.Client.predict`."""
        name, version = self._model_of(model, model_version)
        request = _predict_request(images, layers, dtype, name, version, exact)

        async def run(part: pb.PredictRequest) -> Prediction:
            async def predict(kwargs: dict[str, Any]) -> Prediction:
                call = self._stub.Predict(part, **kwargs)
                response = await call
                outputs = {named.name: result_from_tensor(named.tensor) for named in response.activations}
                return Prediction(outputs, *await call_info_async(call))

            return await self._invoke(predict, timeout, wait_for_ready, request_id)

        batch = len(request.inputs)
        whole, limit = await self._whole_or_limit(batch, lambda: run(request), timeout)
        if whole is not None:
            if progress is not None:
                progress(batch, batch)
            return whole
        parts = []
        for start, stop in _batching.bounds(batch, limit):
            part = _predict_part(request, start, stop)
            parts.append(await run(part))
            if progress is not None:
                progress(stop, batch)
        return Prediction(
            _batching.join_predictions(parts), parts[-1].request_id, _summed([p.timings for p in parts])
        )

    async def gradients(
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
        out: GradientResult | None = None,
        wait_for_ready: bool | None = None,
        links: Names = (),
        model: str | None = None,
        model_version: str | None = None,
        progress: Progress | None = None,
        request_id: str | None = None,
        exact: bool = False,
    ) -> GradientResult:
        """The requested gradients of ``loss``, streamed; see :meth:`layergrad.Client.gradients`.

        Each chunk is copied into its tensor's array as it arrives (the arrays of
        ``out`` where given); batches larger than the server takes are split and joined.
        """
        request = _gradients_request(
            pb.StreamGradientsRequest,
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
        if out is not None and not isinstance(out, GradientResult):
            raise TypeError(f"out must be a GradientResult, not {type(out).__name__}")

        async def run(part: pb.StreamGradientsRequest, part_out: GradientResult | None) -> GradientResult:
            provided = _out_arrays(part_out)

            async def stream_into_arrays(kwargs: dict[str, Any]) -> tuple[_ChunkAssembler, Any]:
                call = self._stream_gradients(part, **kwargs)
                try:
                    assembler = _ChunkAssembler(provided)
                    async for chunk in call:
                        assembler.add(chunk)
                    info = await call_info_async(call)
                finally:
                    call.cancel()  # no-op once the stream has ended
                return assembler, info

            assembler, (rid, timings) = await self._invoke(
                stream_into_arrays, timeout, wait_for_ready, request_id
            )
            result = _gradient_result(assembler.finish(), assembler.loss)
            return dataclasses.replace(result, request_id=rid, timings=timings)

        batch = len(request.inputs)
        whole, limit = await self._whole_or_limit(batch, lambda: run(request, out), timeout)
        if whole is not None:
            if progress is not None:
                progress(batch, batch)
            return whole
        join = _batching.GradientJoin(batch, loss._reduction, out)
        results = []
        for start, stop, part in _batching.sub_requests(request, loss, limit):
            result = await run(part, None)
            join.add(result, start, stop)
            results.append((result.request_id, result.timings))
            if progress is not None:
                progress(stop, batch)
        return dataclasses.replace(
            join.finish(), request_id=results[-1][0], timings=_summed([timings for _, timings in results])
        )

    async def explain(
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
        """As :meth:`layergrad.Client.explain`."""
        name, version = self._model_of(model, model_version)
        request = _explain.build_request(
            images, method, target, score_layer=score_layer, dtype=dtype, model=name, **options
        )
        request.model_version = version
        images_given = _explain.image_list(images)

        async def collect(kwargs: dict[str, Any]) -> Explanation:
            call = self._stub.Explain(request, **kwargs)
            try:
                messages = [message async for message in call]
            finally:
                call.cancel()  # no-op once the stream has ended
            return _explain.assemble(messages, images_given)

        return await self._invoke(collect, timeout, wait_for_ready)

    async def input_gradient(
        self,
        images: Images,
        loss: Loss,
        *,
        dtype: OutputDType = "float32",
        timeout: float | None = None,
        out: np.ndarray | None = None,
        wait_for_ready: bool | None = None,
        model: str | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """The gradient of ``loss`` with respect to the prepared input, ``[batch, 3, 224, 224]``."""
        result = await self.gradients(
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

    async def parameter_gradients(
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
        progress: Progress | None = None,
    ) -> dict[str, np.ndarray]:
        """Gradients of ``loss`` with respect to parameters (``loss.backward()``), by name."""
        result = await self.gradients(
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

    async def layer_gradients(
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
        progress: Progress | None = None,
    ) -> dict[str, np.ndarray]:
        """Gradients of ``loss`` with respect to layer outputs (``chainer.grad``), by layer name."""
        result = await self.gradients(
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

    async def _invoke(
        self,
        call: Callable[[dict[str, Any]], Awaitable[_T]],
        timeout: float | None,
        wait: bool | None,
        request_id: str | None = None,
    ) -> _T:
        """As ``layergrad.Client._invoke``: one call, typed errors, waiting for a server still loading."""
        self._check_open()
        wait = self._wait_default if wait is None else wait
        total = self._timeout(timeout)
        deadline = None if total is None else time.monotonic() + total
        while True:
            kwargs: dict[str, Any] = {"timeout": _remaining(deadline), **request_metadata(request_id)}
            if wait:
                kwargs["wait_for_ready"] = True
            try:
                return await call(kwargs)
            except grpc.RpcError as exc:
                error = from_grpc_error(exc)
                if not (wait and isinstance(error, Unavailable) and error.reason in _WAIT_REASONS):
                    raise error from exc
            await _channel.wait_serving_async(self._channel, deadline)

    async def _whole_or_limit(
        self, batch: int, run_whole: Callable[[], Awaitable[_T]], timeout: float | None
    ) -> tuple[_T | None, int]:
        """``(result, 0)`` of one call with the whole batch, or ``(None, sub-batch size)`` to split it."""
        limit = self._max_batch if self.split_batches else None
        if limit is not None and batch > limit:
            return None, limit
        try:
            return await run_whole(), 0
        except InvalidArgument as exc:
            if not self.split_batches or exc.reason != "BATCH_TOO_LARGE":
                raise
            limit = (await self.model_info(timeout=timeout)).max_batch_size
            if not 0 < limit < batch:
                raise
            return None, limit
