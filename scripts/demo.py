"""`make run`: starts layergrad-server on a free loopback port, makes a demo call of each kind
through the SDK, prints what came back, and stops the server.

Extra arguments go to the server, e.g. `make run SERVER_ARGS="--weights auto"`.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import layergrad
import numpy as np
from layergrad_server.launch import ServerProcess
from PIL import Image


def demo_image() -> bytes:
    """A 320x240 PNG: a red disc on a blue-green gradient."""
    yy, xx = np.mgrid[0:240, 0:320]
    rgb = np.stack([xx * 0.5, yy * 0.8, 255 - xx * 0.6], axis=-1)
    rgb[(xx - 160) ** 2 + (yy - 120) ** 2 < 60**2] = (220, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def summary(name: str, array: np.ndarray) -> str:
    shape = str(list(array.shape))
    return f"  {name:<12} shape={shape:<20} L2={np.linalg.norm(array):.4g}  max|g|={np.abs(array).max():.4g}"


def main(server_args: list[str]) -> int:
    log = Path(tempfile.mkdtemp(prefix="layergrad-demo-")) / "server.log"
    print(f"starting layergrad-server {' '.join(server_args)} (log: {log})")
    with ServerProcess(server_args, log) as server:
        server.wait_serving()
        print(f"server is SERVING on {server.address}\n")
        image = demo_image()
        with layergrad.Client(server.address, timeout=600) as client:
            info = client.model_info()
            print(f"model {info.model_name}: {len(info.layers)} layers, {info.num_parameters:,} parameters")
            print(f"weights {info.weights.source} (pretrained={info.weights.pretrained})")
            print(f"  parameters sha256 {info.weights.parameters_sha256}\n")

            probs = client.predict([image], layers=["prob"])["prob"][0]
            top = np.argsort(-probs)[:5]
            print(
                "Predict: top-5 classes "
                + ", ".join(f"{c} {info.class_name(int(c))!r} ({probs[c]:.3f})" for c in top)
                + "\n"
            )

            loss = layergrad.ClassScore("fc8", [int(top[0])])
            started = time.perf_counter()
            saliency = client.input_gradient([image], loss)
            print(
                f"input gradient of the fc8 score of class {top[0]} ({time.perf_counter() - started:.2f}s):"
            )
            print(summary("input", saliency))
            print(f"  saliency map (max |grad| over channels): {np.abs(saliency[0]).max(axis=0).shape}\n")

            square_loss = layergrad.SumOfSquares("prob")
            print("pattern 1, loss.backward(): parameter .grad")
            for name, grad in client.parameter_gradients([image], square_loss, parameters=["fc8/W"]).items():
                print(summary(name, grad))
            print("pattern 2, loss.backward(retain_grad=True): every layer")
            result = client.gradients([image], square_loss, pattern="backward_retain_grad", layers="all")
            for name in ("conv1_1", "conv5_3", "fc7", "prob"):
                print(summary(name, result.layers[name]))
            print("pattern 3, chainer.grad([loss], [conv5_3]):")
            for name, grad in client.layer_gradients([image], square_loss, layers=["conv5_3"]).items():
                print(summary(name, grad))
            print(f"\nloss sum(square(prob)) = {result.loss:.6g}")
    print("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
