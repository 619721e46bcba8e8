"""The asyncio Client against a real server: the same results as the synchronous one.

Each test runs its coroutine with ``asyncio.run``; the session's server answers both clients.
"""

from __future__ import annotations

import asyncio
import pathlib

import layergrad
import layergrad.aio
import numpy as np
import pytest
from conftest import make_rgb
from grpc_health.v1 import health_pb2
from layergrad_server.launch import ServerProcess

LOSS = layergrad.ClassScore("fc8", classes=[281])


def test_gradients_equal_the_sync_clients(client: layergrad.Client) -> None:
    image = make_rgb(30)
    targets = dict(
        pattern="backward_retain_grad", parameters=["fc8/W", "fc8/b"], layers=["conv5_3"], input=True
    )
    want = client.gradients(image, LOSS, **targets, activations=["fc8"])

    async def main() -> layergrad.GradientResult:
        async with layergrad.aio.Client(client.target, timeout=300) as aio_client:
            return await aio_client.gradients(image, LOSS, **targets, activations=["fc8"])

    got = asyncio.run(main())
    assert got.as_dict().keys() == want.as_dict().keys()
    for key, array in want.as_dict().items():
        np.testing.assert_array_equal(got.as_dict()[key], array, err_msg=key)
    assert got.loss == want.loss


def test_stream_is_written_into_the_given_arrays(client: layergrad.Client) -> None:
    image = make_rgb(31)
    want = client.parameter_gradients(image, LOSS, ["fc8/W"])["fc8/W"]
    given = {"fc8/W": np.full((1000, 4096), np.nan, np.float32)}

    async def main() -> dict[str, np.ndarray]:
        async with layergrad.aio.Client(client.target, timeout=300) as aio_client:
            return await aio_client.parameter_gradients(image, LOSS, ["fc8/W"], out=given)

    got = asyncio.run(main())
    assert got["fc8/W"] is given["fc8/W"]
    np.testing.assert_array_equal(given["fc8/W"], want)


def test_predict_and_model_info_equal_the_sync_clients(client: layergrad.Client) -> None:
    image = make_rgb(32)

    async def main() -> tuple[dict[str, np.ndarray], layergrad.ModelInfo]:
        async with layergrad.aio.Client(client.target, timeout=300) as aio_client:
            return await aio_client.predict(image, ["prob", "fc7"]), await aio_client.model_info()

    outputs, info = asyncio.run(main())
    want = client.predict(image, ["prob", "fc7"])
    for layer in want:
        np.testing.assert_array_equal(outputs[layer], want[layer])
    assert info == client.model_info()


def test_errors_are_the_typed_ones_with_their_details(client: layergrad.Client) -> None:
    async def main() -> None:
        async with layergrad.aio.Client(client.target, timeout=300) as aio_client:
            await aio_client.layer_gradients(make_rgb(33), LOSS, ["conv9"])

    with pytest.raises(layergrad.InvalidArgument) as refused:
        asyncio.run(main())
    with pytest.raises(layergrad.InvalidArgument) as sync_refused:
        client.layer_gradients(make_rgb(33), LOSS, ["conv9"])
    assert refused.value.reason == sync_refused.value.reason == "UNKNOWN_LAYER"
    assert refused.value.message == sync_refused.value.message
    assert refused.value.field_violations == sync_refused.value.field_violations
    assert refused.value.field_violations


def test_closed_client_refuses_calls(client: layergrad.Client) -> None:
    async def main() -> None:
        aio_client = layergrad.aio.Client(client.target)
        await aio_client.close()
        await aio_client.close()  # again: nothing happens
        assert aio_client.closed
        await aio_client.model_info()

    with pytest.raises(layergrad.ClientClosedError):
        asyncio.run(main())


def test_call_during_model_load_waits_then_a_large_batch_is_split(
    weights_file: pathlib.Path, tmp_path: pathlib.Path, client: layergrad.Client
) -> None:
    images = [make_rgb(40 + i) for i in range(3)]
    steps: list[tuple[int, int]] = []
    server = ServerProcess(["--weights", str(weights_file), "--max-batch-size", "2"], tmp_path / "server.log")

    async def main() -> dict[str, np.ndarray]:
        async with layergrad.aio.Client(server.address, timeout=300) as aio_client:
            outputs = await aio_client.predict(
                images, wait_for_ready=True, progress=lambda done, total: steps.append((done, total))
            )
            await aio_client.wait_for_ready(timeout=1.0)  # ready now: returns at once
            return outputs

    try:
        assert server.health(layergrad.client.SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        outputs = asyncio.run(main())
    finally:
        server.terminate()
    assert steps == [(2, 3), (3, 3)]
    np.testing.assert_allclose(outputs["prob"], client.predict(images)["prob"], rtol=1e-4, atol=1e-7)
