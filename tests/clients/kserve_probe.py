"""Calls a layergrad server with the real ``kserve`` SDK's gRPC client; prints one JSON object.

Runs in the client environment (scripts/client_env.sh), never in layergrad's own: the
test passes a JSON job on stdin (address, model, a UINT8 NHWC batch as base64 with its
shape, one PNG as base64, a class index) and compares what this prints with
layergrad.v1's answers. Arrays come back as {"datatype", "shape", "base64"}. kserve
refuses float parameters, so the options travel as strings; it adds an int64
``binary_data_size`` parameter to every input.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput


def packed(array: np.ndarray, datatype: str) -> dict[str, object]:
    return {
        "datatype": datatype,
        "shape": list(array.shape),
        "base64": base64.b64encode(array.tobytes()).decode(),
    }


def outputs(response) -> dict[str, dict[str, object]]:
    return {o.name: packed(o.as_numpy(), o.datatype) for o in response.outputs}


async def main() -> None:
    job = json.load(sys.stdin)
    images = np.frombuffer(base64.b64decode(job["images"]), np.uint8).reshape(job["shape"])
    png = base64.b64decode(job["png"])
    model = job["model"]
    client = InferenceGRPCClient(job["address"], timeout=300, retries=0)
    out: dict[str, object] = {
        "live": await client.is_server_live(),
        "ready": await client.is_server_ready(),
        "model_ready": await client.is_model_ready(model),
    }

    # Forward: the UINT8 NHWC batch, then one encoded image as BYTES.
    image = InferInput("input", list(images.shape), "UINT8")
    image.set_data_from_numpy(images, binary_data=True)
    request = InferRequest(model, [image], request_outputs=[RequestedOutput("prob"), RequestedOutput("fc7")])
    response = await client.infer(request)
    out["forward"] = outputs(response)
    out["forward_order"] = [o.name for o in response.outputs]
    encoded = InferInput("input", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([png], dtype=np.object_), binary_data=True)
    response = await client.infer(InferRequest(model, [encoded], request_outputs=[RequestedOutput("prob")]))
    out["forward_bytes"] = outputs(response)

    # Input gradient: one class per item as an INT64 input, the loss named by parameters.
    targets = InferInput("targets", [len(images)], "INT64")
    targets.set_data_from_numpy(np.full(len(images), job["target"], np.int64), binary_data=True)
    request = InferRequest(
        model,
        [image, targets],
        request_outputs=[RequestedOutput("grad/input")],
        parameters={"pattern": "grad", "loss": "class_score", "loss_layer": "fc8"},
    )
    out["input_gradient"] = outputs(await client.infer(request))["grad/input"]

    try:
        await client.infer(InferRequest("resnet9", [image]))
        out["unknown_model_infer"] = {"status": "OK"}
    except grpc.RpcError as error:
        out["unknown_model_infer"] = {"status": error.code().name, "message": error.details()}
    try:
        out["unknown_model_ready"] = {"ready": await client.is_model_ready("resnet9")}
    except grpc.RpcError as error:
        out["unknown_model_ready"] = {"status": error.code().name, "message": error.details()}
    await client.close()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
