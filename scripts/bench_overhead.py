"""Per-call overhead: what the service adds to an input gradient, beside a plain gRPC echo.

Starts one loopback server (``--shared-memory``) on a small model that takes VGG16's input
(3x224x224, so every request and result has VGG16's sizes: 602 KB each way per image) but
computes in about a millisecond, and, in a process of its own, a plain Python gRPC server
whose one unary method returns the request's bytes. For batches 1, 8 and 32 of prepared
inputs, each round makes one call of each kind, in turn:

* ``echo``: the serialized ComputeGradients request sent to the echo server and its bytes
  back: the floor, what moving the same bytes through Python gRPC costs;
* ``stream``: ``client.gradients(x, loss, input=True)`` (StreamGradients, the SDK's default);
* ``unary``: ``client.compute_gradients_unary(...)`` (ComputeGradients);
* ``shm``: ``client.gradients(..., shared_memory=True, copy=False)`` (ExportGradients: the
  result written into the caller's shared memory; the inputs still go over gRPC).

A service call's overhead is its wall time in the SDK minus the server's ``compute`` phase
(``server-timing`` trailer): everything but the forward and backward pass. Medians over the
rounds. Then the same steps without a network, in this process, to find where the time goes:
building and serializing the request (SDK), parsing it and converting the inputs (server),
building and serializing the unary response (server), parsing it into arrays (SDK).

``scripts/bench.py`` calls :func:`measure` and adds :func:`report_lines` and :func:`targets`::

    .venv/bin/python scripts/bench_overhead.py --rounds 20
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
for _path in (ROOT / "client", ROOT / "server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import layergrad_server  # noqa: E402, F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import grpc  # noqa: E402
import layergrad  # noqa: E402
import numpy as np  # noqa: E402
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb  # noqa: E402
from layergrad_server.launch import ServerProcess  # noqa: E402

BATCHES = (1, 8, 32)
FLOOR_RATIO = 1.2
SHM_LIMIT_S = 0.015
ECHO_METHOD = "/bench.Echo/Call"
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

NET_CODE = '''
import chainer
import chainer.functions as F
import chainer.links as L


class Thin(chainer.Chain):
    """VGG16's input, a millisecond of compute: one strided convolution and a classifier."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(3, 2, 8, stride=8)
            self.fc = L.Linear(2 * 7 * 7, 10)

    def forward(self, x, layers=("prob",)):
        out = {}
        h = out["conv"] = F.relu(self.conv(x))
        h = F.average_pooling_2d(h, 4)
        h = out["fc"] = self.fc(h)
        out["prob"] = F.softmax(h)
        return {name: out[name] for name in layers}


def build():
    return Thin()
'''

MODEL_YAML = """\
architecture: chain
python_path: ../../code
factory: thin:build
input:
  shape: [3, 224, 224]
  channel_order: BGR
  mean: [0.0, 0.0, 0.0]
layers: [conv, fc, prob]
logits: fc
probability: prob
"""


def echo_child(port_file: str) -> int:
    """The floor's server: one unary method that returns the request's bytes (with the same
    ``malloc`` settings as the service's server, so that the floor is no higher than its)."""
    layergrad.keep_freed_memory()

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4), options=UNLIMITED)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    pathlib.Path(port_file).write_text(str(port))
    server.wait_for_termination()
    return 0


def _repository(root: pathlib.Path) -> pathlib.Path:
    (root / "code").mkdir()
    (root / "code" / "thin.py").write_text(textwrap.dedent(NET_CODE))
    directory = root / "models" / "thin"
    (directory / "1").mkdir(parents=True)
    (directory / "model.yaml").write_text(MODEL_YAML)
    rng = np.random.default_rng(0)
    weights = {
        "conv/W": rng.standard_normal((2, 3, 8, 8)) * 0.05,
        "conv/b": np.zeros(2),
        "fc/W": rng.standard_normal((10, 2 * 7 * 7)) * 0.1,
        "fc/b": np.zeros(10),
    }
    np.savez(directory / "1" / "weights.npz", **{k: v.astype(np.float32) for k, v in weights.items()})
    return root / "models"


def _inputs(batch: int) -> np.ndarray:
    return (np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)) * 50).astype(np.float32)


def _loss(batch: int) -> layergrad.ClassScore:
    return layergrad.ClassScore("fc", [3] * batch)


def _request(x: np.ndarray) -> pb.ComputeGradientsRequest:
    from layergrad.client import _gradients_request

    return _gradients_request(
        pb.ComputeGradientsRequest, x, _loss(len(x)), "grad", None, None, True, (), "float32", "thin"
    )


def measure(rounds: int, batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    """Runs the rounds on servers of their own; the section ``report_lines`` and ``targets`` read.

    This process's ``malloc`` keeps freed memory from here on, as a client making such calls
    would have it (``layergrad.keep_freed_memory``)."""
    layergrad.keep_freed_memory()
    with tempfile.TemporaryDirectory(prefix="layergrad-bench-overhead-") as tmp:
        folder = pathlib.Path(tmp)
        port_file = folder / "echo-port"
        echo = subprocess.Popen(
            [sys.executable, __file__, "--_echo", str(port_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process = plain = None
        try:
            args = [
                "--model-repository",
                str(_repository(folder)),
                "--shared-memory",
                "--max-batch-size",
                "32",
            ]
            process = ServerProcess(args, folder / "server.log")
            plain = ServerProcess([*args, "--no-keep-freed-memory"], folder / "plain.log")
            process.wait_serving()
            plain.wait_serving()
            give_up = time.monotonic() + 120
            while not port_file.exists() or not port_file.read_text():
                if echo.poll() is not None or time.monotonic() > give_up:
                    raise RuntimeError("the echo server did not start")
                time.sleep(0.05)
            channel = grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}", options=UNLIMITED)
            with (
                channel,
                layergrad.Client(process.address, timeout=600, model="thin") as client,
                layergrad.Client(plain.address, timeout=600, model="thin") as plain_client,
            ):
                grpc.channel_ready_future(channel).result(timeout=60)
                section = _run(client, plain_client, channel.unary_unary(ECHO_METHOD), rounds, batches)
        finally:
            for server in (process, plain):
                if server is not None:
                    server.terminate()
            echo.kill()
            echo.wait()
    section["breakdown"] = {str(batch): breakdown(batch) for batch in batches}
    return section


def _run(
    client: layergrad.Client,
    plain_client: layergrad.Client,
    echo: Callable[..., bytes],
    rounds: int,
    batches: tuple[int, ...],
) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": rounds, "batches": {}}
    for batch in batches:
        x = _inputs(batch)
        payload = _request(x).SerializeToString()
        loss = _loss(batch)

        def timed(call: Callable[[], Any]) -> float:
            start = time.perf_counter()
            result = call()
            wall = time.perf_counter() - start
            return wall - result.timings.get("compute", 0.0) if hasattr(result, "timings") else wall

        calls: dict[str, Callable[[], Any]] = {
            "echo": lambda payload=payload: echo(payload, timeout=600),
            "stream": lambda x=x, loss=loss: client.gradients(x, loss, input=True),
            "unary": lambda x=x, loss=loss: client.compute_gradients_unary(x, loss, input=True),
            "shm": lambda x=x, loss=loss: client.gradients(
                x, loss, input=True, shared_memory=True, copy=False
            ),
            "stream, server malloc default": lambda x=x, loss=loss: plain_client.gradients(
                x, loss, input=True
            ),
        }
        for call in calls.values():  # warm-up: connections, the shared memory region, layouts
            call()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                samples[name].append(timed(call))
        reply = echo(payload, timeout=600)
        out["batches"][str(batch)] = {
            "request_bytes": len(payload),
            "echo_reply_bytes": len(reply),
            "result_bytes": int(x.nbytes),
            "median_s": {name: statistics.median(values) for name, values in samples.items()},
            "samples_s": samples,
        }
    return out


def breakdown(batch: int, repeat: int = 5) -> dict[str, float]:
    """Median seconds of each step of an input-gradient call (the server's both ways of answering),
    in this process, no network."""
    from layergrad.client import result_from_tensor
    from layergrad_server import convert, images
    from layergrad_server.engine import GradientResult, Kind, ResultTensor

    x = _inputs(batch)
    steps: dict[str, list[float]] = {}
    gradient = np.ascontiguousarray(x * 0.5)
    result = GradientResult([ResultTensor("input", Kind.INPUT_GRADIENT, gradient)], 1.0)

    def step(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        steps.setdefault(name, []).append(time.perf_counter() - start)
        return value

    for _ in range(repeat):
        request = step("SDK: build request", lambda: _request(x))
        data = step("SDK: serialize it", request.SerializeToString)
        parsed = step("server: parse it", lambda data=data: pb.ComputeGradientsRequest.FromString(data))
        step(
            "server: inputs to one array",
            lambda parsed=parsed: convert.inputs_to_batch(parsed.inputs, None, images.ImageLimits(), 32),
        )
        response = step("server: unary response", lambda: convert.gradients_response_bytes(result))
        step("server: stream frames", lambda: list(convert.gradient_frames(result, 1 << 20)))
        step(
            "SDK: unary response to arrays",
            lambda response=response: result_from_tensor(
                pb.ComputeGradientsResponse.FromString(response).gradients[0].tensor
            ),
        )
    return {name: statistics.median(values) for name, values in steps.items()}


def report_lines(section: dict[str, Any]) -> list[str]:
    if "error" in section:
        return ["", f"per-call overhead: not measured: {section['error']}"]
    lines = [
        "",
        "per-call overhead of an input gradient (client wall time - server compute), VGG16-sized "
        f"inputs and results on a 1 ms model; median of {section['rounds']} rounds, ms:",
        f"  {'batch':>5}{'bytes each way':>16}{'echo floor':>12}{'stream':>9}{'unary':>9}{'shm':>9}"
        f"{'stream/floor':>14}{'unary/floor':>13}{'stream, server malloc default':>31}",
    ]
    for batch, row in section["batches"].items():
        m = {name: seconds * 1e3 for name, seconds in row["median_s"].items()}
        lines.append(
            f"  {batch:>5}{row['request_bytes'] / 1e6:>13.2f} MB{m['echo']:>12.2f}{m['stream']:>9.2f}"
            f"{m['unary']:>9.2f}{m['shm']:>9.2f}{m['stream'] / m['echo']:>14.2f}"
            f"{m['unary'] / m['echo']:>13.2f}{m['stream, server malloc default']:>31.2f}"
        )
    for batch, steps in section.get("breakdown", {}).items():
        shown = ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in steps.items())
        lines.append(f"  batch {batch}, the steps without a network (ms): {shown}")
    return lines


def targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The target entries, in ``scripts/bench.py``'s format."""
    name = "per-call overhead within 1.2x of a plain gRPC echo of the same bytes (batch 1, 8, 32)"
    shm_name = "per-call overhead at batch 32 on the same-host path < 15 ms"
    if "error" in section:
        shown = f"not measured: {section['error']}"
        return [
            {"target": name, "value": float("nan"), "limit": FLOOR_RATIO, "met": False, "shown": shown},
            {"target": shm_name, "value": float("nan"), "limit": SHM_LIMIT_S, "met": False, "shown": shown},
        ]
    ratios = {}
    for batch, row in section["batches"].items():
        m = row["median_s"]
        ratios[batch] = min(m["stream"], m["unary"]) / m["echo"], m["stream"] / m["echo"]
    worst = max(stream for _, stream in ratios.values())
    shown = "; ".join(
        f"batch {batch}: stream {stream:.2f}x, best path {best:.2f}x"
        for batch, (best, stream) in ratios.items()
    )
    out = [
        {"target": name, "value": worst, "limit": FLOOR_RATIO, "met": worst <= FLOOR_RATIO, "shown": shown}
    ]
    big = section["batches"].get("32")
    if big is not None:
        shm = big["median_s"]["shm"]
        out.append(
            {
                "target": shm_name,
                "value": shm,
                "limit": SHM_LIMIT_S,
                "met": shm < SHM_LIMIT_S,
                "shown": f"{shm * 1e3:.1f} ms (results in shared memory; the inputs still go over gRPC)",
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per batch (default 20)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument("--_echo", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._echo:
        return echo_child(args._echo)
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    section = measure(args.rounds)
    print("\n".join(report_lines(section)))
    for t in targets(section):
        print(f"[{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['shown']}")
    if args.json:
        args.json.write_text(json.dumps(section, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
