"""Dynamic batching: 8 concurrent batch-1 callers merged into one batch against one at a time.

Starts one loopback server on VGG16 with seeded random weights and ``--batch-delay-ms``, and
``--callers`` Clients, one thread each. Each round, every caller asks at once (a barrier) for
the input gradient of ``ClassScore("fc8", [its class])`` of its own image, twice: once with
``exact=True`` (never merged: with one compute slot the calls are computed one at a time) and
once without (merged into one batch), in alternating order from round to round. Reported, as
medians over the rounds:

* the wall time of a round, first call sent to last result in hand, and the calls per second;
* ``throughput ratio`` = merged calls per second / one-at-a-time calls per second (target:
  at least 3x, where batching pays: on a GPU; on the CPU a batch of 8 takes far more than 8
  times batch 1's time, see docs/benchmarks.md);
* the batches the server computed (its ``layergrad_batches_total``), to show the calls merged;
* each caller's merged input gradient against its exact one: relative L2 distance, and the
  largest difference as a share of the largest magnitude (the tolerance is documented in the
  README's Dynamic batching paragraph), and its loss value's relative difference.

``scripts/bench.py`` calls :func:`measure` and adds :func:`report_lines` and :func:`target`::

    .venv/bin/python scripts/bench_batching.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
for _path in (ROOT / "client", ROOT / "server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import layergrad_server  # noqa: E402, F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import layergrad  # noqa: E402
import numpy as np  # noqa: E402
from layergrad_server.engine import random_weights_npz  # noqa: E402
from layergrad_server.launch import ServerProcess  # noqa: E402

TARGET_RATIO = 3.0
TARGET = "8 concurrent batch-1 callers, dynamic batching >= 3x the throughput of one at a time"
DELAY_MS = 50


def _scrape(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _images(callers: int) -> list[np.ndarray]:
    return [
        (np.random.default_rng(100 + i).standard_normal((1, 3, 224, 224)) * 50).astype(np.float32)
        for i in range(callers)
    ]


def _round(clients: list[layergrad.Client], images: list[np.ndarray], exact: bool) -> tuple[float, list]:
    """Every caller at once; (seconds from the first call to the last result, results)."""
    barrier = threading.Barrier(len(clients) + 1)

    def call(index: int) -> layergrad.GradientResult:
        barrier.wait()
        loss = layergrad.ClassScore("fc8", [index * 111 % 1000])
        return clients[index].gradients(images[index], loss, input=True, exact=exact)

    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(call, i) for i in range(len(clients))]
        barrier.wait()
        start = time.perf_counter()
        results = [future.result() for future in futures]
        return time.perf_counter() - start, results


def measure(rounds: int, callers: int = 8, device: str = "", delay_ms: float = DELAY_MS) -> dict[str, Any]:
    """Runs the rounds on a server of its own; the section ``report_lines`` and ``target`` read."""
    with tempfile.TemporaryDirectory(prefix="layergrad-bench-batching-") as tmp:
        weights = pathlib.Path(tmp) / "vgg16-random-0.npz"
        weights.write_bytes(random_weights_npz(0).getvalue())
        args = [
            "--weights",
            str(weights),
            "--batch-delay-ms",
            str(delay_ms),
            "--metrics-address",
            "127.0.0.1:0",
        ]
        args += ["--max-queue", str(max(8, callers)), "--max-batch-size", str(max(32, callers))]
        if device:
            args += ["--device", device]
        process = ServerProcess(args, pathlib.Path(tmp) / "server.log")
        try:
            process.wait_serving()
            url = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", process.log()).group(1)
            clients = [layergrad.Client(process.address, timeout=1800) for _ in range(callers)]
            try:
                return _rounds(clients, _images(callers), rounds, url, callers, delay_ms, device)
            finally:
                for client in clients:
                    client.close()
        finally:
            process.terminate()


def _rounds(
    clients: list[layergrad.Client],
    images: list[np.ndarray],
    rounds: int,
    url: str,
    callers: int,
    delay_ms: float,
    device: str,
) -> dict[str, Any]:
    _round(clients, images, exact=True)  # warm-up of both kinds (the merged batch's shapes)
    _round(clients, images, exact=False)
    times: dict[str, list[float]] = {"one at a time": [], "merged": []}
    batches: list[float] = []
    l2: list[float] = []
    worst: list[float] = []
    losses: list[float] = []
    for number in range(rounds):
        order = (True, False) if number % 2 == 0 else (False, True)
        outcome = {}
        for exact in order:
            before = _scrape(url, "layergrad_batches_total")
            seconds, results = _round(clients, images, exact)
            if not exact:
                batches.append(_scrape(url, "layergrad_batches_total") - before)
            times["one at a time" if exact else "merged"].append(seconds)
            outcome[exact] = results
        for merged, alone in zip(outcome[False], outcome[True], strict=True):
            difference = merged.input - alone.input
            l2.append(float(np.linalg.norm(difference) / np.linalg.norm(alone.input)))
            worst.append(float(np.abs(difference).max() / np.abs(alone.input).max()))
            losses.append(abs(merged.loss - alone.loss) / abs(alone.loss))
    rows = {
        name: {
            "round_s": statistics.median(samples),
            "calls_per_s": callers / statistics.median(samples),
            "samples_s": samples,
        }
        for name, samples in times.items()
    }
    return {
        "callers": callers,
        "rounds": rounds,
        "delay_ms": delay_ms,
        "device": device or "@numpy",
        "rows": rows,
        "ratio": rows["merged"]["calls_per_s"] / rows["one at a time"]["calls_per_s"],
        "batches_per_round": batches,
        "input_gradient_rel_l2": {"median": statistics.median(l2), "max": max(l2)},
        "input_gradient_max_share": max(worst),
        "loss_rel_diff_max": max(losses),
    }


def report_lines(section: dict[str, Any]) -> list[str]:
    if "error" in section:
        return ["", f"dynamic batching: not measured: {section['error']}"]
    lines = [
        "",
        f"dynamic batching ({section['callers']} concurrent callers, batch 1 each, VGG16 input gradient, "
        f"--batch-delay-ms {section['delay_ms']:g}, {section['device']}; "
        f"median of {section['rounds']} rounds):",
        f"  {'calls':<15}{'round':>9}{'calls/s':>10}",
    ]
    for name, row in section["rows"].items():
        lines.append(f"  {name:<15}{row['round_s']:>8.3f}s{row['calls_per_s']:>10.2f}")
    l2 = section["input_gradient_rel_l2"]
    lines.append(
        f"  throughput ratio {section['ratio']:.2f}x; batches per merged round "
        f"{', '.join(f'{b:g}' for b in section['batches_per_round'])}; merged vs alone: input gradient "
        f"relative L2 median {l2['median']:.2e}, max {l2['max']:.2e}, largest difference "
        f"{section['input_gradient_max_share']:.2e} of the largest magnitude, "
        f"loss {section['loss_rel_diff_max']:.1e}"
    )
    return lines


def target(section: dict[str, Any]) -> dict[str, Any]:
    """The target entry, in ``scripts/bench.py``'s format."""
    if "error" in section:
        shown = f"not measured: {section['error']}"
        return {"target": TARGET, "value": float("nan"), "limit": TARGET_RATIO, "met": False, "shown": shown}
    ratio = section["ratio"]
    shown = f"{ratio:.2f}x on {section['device']}"
    if section["device"] == "@numpy":
        shown += " (the target is for a GPU; not measured there without a device)"
    return {
        "target": TARGET,
        "value": ratio,
        "limit": TARGET_RATIO,
        "met": bool(ratio >= TARGET_RATIO),
        "shown": shown,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each kind (default 3)")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers (default 8)")
    parser.add_argument("--device", default="", help="the server's --device (default: the CPU)")
    parser.add_argument(
        "--delay-ms", type=float, default=DELAY_MS, help=f"--batch-delay-ms (default {DELAY_MS})"
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()
    if args.rounds < 1 or args.callers < 2:
        parser.error("--rounds must be positive and --callers at least 2")
    section = measure(args.rounds, args.callers, args.device, args.delay_ms)
    print("\n".join(report_lines(section)))
    t = target(section)
    print(f"[{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['shown']}")
    if args.json:
        args.json.write_text(json.dumps(section, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
