"""The real KServe v2 clients, tritonclient[grpc] and kserve, against a real server.

Both need protobuf < 7 and cannot share a process, so scripts/client_env.sh builds
their environment (once; reused while its versions match) and each client runs in
its own subprocess (tests/clients/*_probe.py), printing JSON that is compared here
with what layergrad.v1 answers through the real SDK for the same inputs.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess

import layergrad
import numpy as np
import pytest
from conftest import encode, make_rgb

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = 281
IMAGES = np.stack([make_rgb(21, 120, 160), make_rgb(22, 120, 160)])
PNG = encode(make_rgb(23, 100, 90), "PNG")


@pytest.fixture(scope="session")
def client_python() -> str:
    """The client environment's python, built by scripts/client_env.sh if needed."""
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "client_env.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, f"scripts/client_env.sh failed:\n{built.stderr[-4000:]}"
    return str(ROOT / built.stdout.strip().splitlines()[-1])


def probe(client_python: str, name: str, address: str) -> dict:
    job = {
        "address": address,
        "model": "vgg16",
        "images": base64.b64encode(IMAGES.tobytes()).decode(),
        "shape": list(IMAGES.shape),
        "png": base64.b64encode(PNG).decode(),
        "target": TARGET,
    }
    # The client environment only: nothing of layergrad's own on the path.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    ran = subprocess.run(
        [client_python, str(ROOT / "tests" / "clients" / f"{name}_probe.py")],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert ran.returncode == 0, f"{name} probe failed:\n{ran.stderr[-4000:]}"
    return json.loads(ran.stdout)


def unpacked(packed: dict) -> np.ndarray:
    dtype = {"FP32": "<f4", "FP16": "<f2"}[packed["datatype"]]
    return np.frombuffer(base64.b64decode(packed["base64"]), dtype).reshape(packed["shape"])


@pytest.fixture(scope="module")
def reference(client) -> dict:
    """layergrad.v1's answers, through the SDK, for the probes' inputs."""
    loss = layergrad.losses.ClassScore("fc8", [TARGET] * len(IMAGES))
    return {
        "forward": client.predict(list(IMAGES), layers=("fc7", "prob")),
        "forward_bytes": client.predict(PNG, layers=("prob",)),
        "input_gradient": client.gradients(list(IMAGES), loss, input=True).input,
        "fc8_b_fp16": client.gradients(list(IMAGES), loss, parameters=["fc8/b"], dtype="float16").parameters[
            "fc8/b"
        ],
    }


def check_common(out: dict, reference: dict) -> None:
    assert (out["live"], out["ready"], out["model_ready"]) == (True, True, True)
    for name in ("fc7", "prob"):
        np.testing.assert_array_equal(unpacked(out["forward"][name]), reference["forward"][name])
    np.testing.assert_array_equal(unpacked(out["input_gradient"]), reference["input_gradient"])
    assert out["unknown_model_infer"]["status"].endswith("NOT_FOUND")
    assert "'resnet9'" in out["unknown_model_infer"]["message"]
    assert "served models: vgg16" in out["unknown_model_infer"]["message"]


def test_tritonclient(client_python, server, reference):
    out = probe(client_python, "triton", server.address)
    check_common(out, reference)
    assert out["forward_order"] == ["fc7", "prob"]
    metadata = out["metadata"]
    assert (metadata["name"], metadata["versions"]) == ("vgg16", ["1"])
    assert metadata["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": ["-1", "3", "224", "224"]},
        {"name": "targets", "datatype": "INT64", "shape": ["-1"]},
    ]
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert shapes == {
        "prob": ("FP32", ["-1", "1000"]),
        "grad/input": ("FP32", ["-1", "3", "224", "224"]),
        "grad/fc8/W": ("FP32", ["1000", "4096"]),
    }
    assert out["server"] == {"name": "layergrad", "version": layergrad.__version__}
    assert out["fc8_b_fp16"]["datatype"] == "FP16"
    np.testing.assert_array_equal(unpacked(out["fc8_b_fp16"]), reference["fc8_b_fp16"])
    assert out["unknown_model_metadata"]["status"].endswith("NOT_FOUND")
    assert out["bad_output"]["status"].endswith("INVALID_ARGUMENT")
    assert "'fc9'" in out["bad_output"]["message"]


def test_kserve(client_python, server, reference):
    out = probe(client_python, "kserve", server.address)
    check_common(out, reference)
    assert out["forward_order"] == ["prob", "fc7"]
    np.testing.assert_array_equal(unpacked(out["forward_bytes"]["prob"]), reference["forward_bytes"]["prob"])
    assert out["unknown_model_ready"]["status"] == "NOT_FOUND"
