"""All 553 MB of parameter gradients (BACKWARD, float32) via ExportGradients vs StreamGradients.

Starts one loopback server with ``--shared-memory`` on random weights, makes one
warm-up call of each kind, then alternates ``--calls`` timed calls of: the stream,
shared memory, and a tiny result (``fc8/b`` only) that costs the same forward and
backward pass. ``transfer = total - tiny`` estimates the time spent moving the
result; its GB/s is reported per path (medians)::

    python scripts/bench_shm.py --calls 5
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import layergrad_server  # noqa: F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import layergrad
import numpy as np
from layergrad import _shm
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad.client import _gradients_request
from layergrad_server.engine import random_weights_npz
from layergrad_server.launch import ServerProcess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "weights.npz"
        weights.write_bytes(random_weights_npz(0).getvalue())
        server = ServerProcess(
            ["--weights", str(weights), "--workers", "1", "--shared-memory"], pathlib.Path(tmp) / "server.log"
        )
        try:
            server.wait_serving()
            with layergrad.Client(server.address, timeout=600) as client:
                return run(client, args.calls)
        finally:
            server.terminate()


def run(client: layergrad.Client, calls: int) -> int:
    image = np.zeros((3, 224, 224), np.float32)
    loss = layergrad.SumOfSquares("fc8")
    full = dict(pattern="backward", parameters="all")
    variants = {
        "tiny": lambda: client.gradients(image, loss, pattern="backward", parameters=["fc8/b"]),
        "stream": lambda: client.gradients(image, loss, **full),
        "shm": lambda: client.gradients(image, loss, shared_memory=True, **full),
    }
    request = _gradients_request(
        pb.ExportGradientsRequest, image, loss, "backward", "all", None, False, (), "float32"
    )
    parts: dict[str, list[float]] = {"rpc": [], "copy": []}

    def shm_parts() -> None:
        started = time.perf_counter()
        response = client._stub.ExportGradients(request, timeout=600)
        copied = time.perf_counter()
        _shm.read_segment(response)
        parts["rpc"].append(copied - started)
        parts["copy"].append(time.perf_counter() - copied)

    variants["shm-parts"] = shm_parts
    nbytes = sum(a.nbytes for a in variants["shm"]().parameters.values())
    variants["stream"]()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(calls):
        for name, call in variants.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    tiny = statistics.median(times["tiny"])
    print(f"result: {nbytes / 1e6:.1f} MB; compute-only call (fc8/b): {tiny:.3f} s (median of {calls})")
    for name in ("stream", "shm"):
        total = statistics.median(times[name])
        transfer = total - tiny
        print(
            f"{name:>6}: total {total:.3f} s, transfer {transfer:.3f} s = {nbytes / transfer / 1e9:.2f} GB/s "
            f"(all: {', '.join(f'{t:.3f}' for t in times[name])})"
        )
    rpc, copy = statistics.median(parts["rpc"]), statistics.median(parts["copy"])
    print(
        f"shm parts: ExportGradients RPC {rpc:.3f} s (server write {rpc - tiny:.3f} s = "
        f"{nbytes / (rpc - tiny) / 1e9:.2f} GB/s), client copy-out + unlink {copy:.3f} s = "
        f"{nbytes / copy / 1e9:.2f} GB/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
