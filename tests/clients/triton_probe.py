"""Calls a layergrad server with the real ``tritonclient[grpc]``; prints one JSON object.

Runs in the client environment (scripts/client_env.sh), never in layergrad's own: the
test passes a JSON job on stdin (address, model, a UINT8 NHWC batch as base64 with its
shape, a class index) and compares what this prints with layergrad.v1's answers.
Arrays come back as {"datatype", "shape", "base64"} of their little-endian bytes.
"""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def packed(array: np.ndarray, datatype: str) -> dict[str, object]:
    return {
        "datatype": datatype,
        "shape": list(array.shape),
        "base64": base64.b64encode(array.tobytes()).decode(),
    }


def failure(error: InferenceServerException) -> dict[str, str]:
    return {"status": str(error.status()), "message": error.message()}


def main() -> None:
    job = json.load(sys.stdin)
    images = np.frombuffer(base64.b64decode(job["images"]), np.uint8).reshape(job["shape"])
    client = triton.InferenceServerClient(job["address"])
    model = job["model"]
    out: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
    }
    metadata = client.get_model_metadata(model, as_json=True)
    out["metadata"] = {
        "name": metadata["name"],
        "versions": metadata.get("versions", []),
        "inputs": metadata["inputs"],
        "outputs": [o for o in metadata["outputs"] if o["name"] in ("prob", "grad/input", "grad/fc8/W")],
    }
    server = client.get_server_metadata(as_json=True)
    out["server"] = {"name": server["name"], "version": server["version"]}

    # Forward: a UINT8 NHWC batch; outputs in the requested order.
    image = triton.InferInput("input", list(images.shape), "UINT8")
    image.set_data_from_numpy(images)
    result = client.infer(
        model, [image], outputs=[triton.InferRequestedOutput("fc7"), triton.InferRequestedOutput("prob")]
    )
    out["forward"] = {name: packed(result.as_numpy(name), "FP32") for name in ("fc7", "prob")}
    out["forward_order"] = [o.name for o in result.get_response().outputs]

    # Input gradient: one class per item as an INT64 input, the loss named by parameters.
    targets = triton.InferInput("targets", [len(images)], "INT64")
    targets.set_data_from_numpy(np.full(len(images), job["target"], np.int64))
    result = client.infer(
        model,
        [image, targets],
        outputs=[triton.InferRequestedOutput("grad/input")],
        parameters={"pattern": "grad", "loss": "class_score", "loss_layer": "fc8"},
    )
    out["input_gradient"] = packed(result.as_numpy("grad/input"), "FP32")

    # A numeric option as tritonclient sends a Python float (double_param), FP16 output.
    result = client.infer(
        model,
        [image],
        outputs=[triton.InferRequestedOutput("grad/fc8/b")],
        parameters={"target_class": float(job["target"]), "output_datatype": "FP16"},
    )
    out["fc8_b_fp16"] = packed(result.as_numpy("grad/fc8/b"), result.get_output("grad/fc8/b").datatype)

    for name, call in [
        ("unknown_model_infer", lambda: client.infer("resnet9", [image])),
        ("unknown_model_metadata", lambda: client.get_model_metadata("resnet9")),
        ("bad_output", lambda: client.infer(model, [image], outputs=[triton.InferRequestedOutput("fc9")])),
    ]:
        try:
            call()
            out[name] = {"status": "OK"}
        except InferenceServerException as error:
            out[name] = failure(error)
    client.close()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
