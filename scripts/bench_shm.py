"""All 553 MB of parameter gradients (BACKWARD, float32): StreamGradients vs ExportGradients.

Starts one loopback server with ``--shared-memory`` on seeded random weights and
one Client, makes one warm-up call of each kind (the first shared-memory call
also creates the Client's region, pre-faults it and has the server map it: that
one-time cost is reported apart), checks that all paths return identical
arrays, then runs ``--calls`` rounds, each making one call of every variant in
turn:

* ``compute-only``: the same forward and backward pass, returning only ``fc8/b``
  (4 kB), through the stream: what a call costs without moving the result;
* ``stream``: ``client.gradients(...)`` (StreamGradients);
* ``shm zero-copy``: ``client.gradients(..., shared_memory=True, copy=False)``,
  the arrays are views of the Client's region;
* ``shm copy``: ``client.gradients(..., shared_memory=True)``, each array copied
  out of the region into memory of its own (the default).

Every figure is a median over the rounds, 1 GB = 1e9 bytes. Per path:

* ``call``: wall time of the SDK call, request to numpy arrays in hand;
* ``after backward``: the part of the call after the backward pass. For the
  shared-memory paths, call time minus the server's own ``pre`` (admission,
  decoding, planning, region checks) and ``compute`` (forward + backward)
  times from the ``server-timing`` trailer: that is, the server's copy into the
  region, the response, and the client's views or copies, plus the request's
  way to the server. For the stream, the time after the first message arrived
  (as ``scripts/bench.py`` reports it): the stream's first message leaves once
  the backward pass is done, so this is all the transfer but one 1 MiB chunk;
* ``GB/s`` = result bytes / median ``after backward``; ``GB/s per call``: the
  slowest and fastest call's rate. ``GB/s end to end`` = bytes / median ``call``,
  which includes the forward and backward pass.

The JSON (``--json``) also holds every sample, the server's phases, and
``call - compute-only``: the split estimated a second way, for all paths alike,
which is only meaningful on a quiet machine (a difference of the medians of two
calls whose compute time varies by seconds when other work shares the CPUs). ``scripts/bench.py`` calls
:func:`measure` and adds :func:`report_lines` and :func:`target` to its report::

    .venv/bin/python scripts/bench_shm.py --calls 5
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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

TARGET_BYTES_PER_S = 4e9
TARGET = "shared-memory download >= 4 GB/s (zero-copy, after backward)"
VARIANTS = ("compute-only", "stream", "shm zero-copy", "shm copy")


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _server_timing(metadata: Any) -> dict[str, float]:
    """Seconds per phase from a ``server-timing`` trailer (``name;dur=<ms>, ...``)."""
    for key, value in metadata or ():
        if key == "server-timing":
            phases = {}
            for part in value.split(","):
                name, _, duration = part.strip().partition(";dur=")
                phases[name] = float(duration) / 1e3
            return phases
    return {}


class _Probe:
    """Wraps a Client's stubs: notes the stream's first message and ExportGradients' server timing."""

    def __init__(self, client: layergrad.Client) -> None:
        self.first_message: float | None = None
        self.server: dict[str, float] = {}
        stub = client._stub
        stream, export = stub.StreamGradients, stub.ExportGradients
        probe = self

        class TimedStream:
            def __init__(self, call: Any) -> None:
                self._call = call

            def __iter__(self) -> TimedStream:
                return self

            def __next__(self) -> Any:
                item = next(self._call)
                if probe.first_message is None:
                    probe.first_message = time.perf_counter()
                return item

            def cancel(self) -> bool:
                return self._call.cancel()

        class TimedExport:
            """ExportGradients as the SDK calls it (``with_call``), noting the server's timing."""

            def with_call(self, request: Any, **kwargs: Any) -> tuple[Any, Any]:
                response, call = export.with_call(request, **kwargs)
                probe.server = _server_timing(call.trailing_metadata())
                return response, call

        stub.StreamGradients = lambda *args, **kwargs: TimedStream(stream(*args, **kwargs))
        stub.ExportGradients = TimedExport()

    def time(self, fn: Callable[[], layergrad.GradientResult]) -> tuple[dict[str, float], Any]:
        """One call: its wall time, and the split at the end of the backward pass where known."""
        self.first_message, self.server = None, {}
        start = time.perf_counter()
        result = fn()
        end = time.perf_counter()
        sample = {"call_s": end - start}
        if self.first_message is not None:
            sample["after_backward_s"] = end - self.first_message
        elif self.server:
            sample["after_backward_s"] = end - start - self.server["pre"] - self.server["compute"]
            sample.update({f"server_{name}_s": seconds for name, seconds in self.server.items()})
        return sample, result


def run(client: layergrad.Client, calls: int, warmup: int = 1) -> dict[str, Any]:
    """Times the variants on ``client`` (a --shared-memory server on this host); returns the summary."""
    image = np.zeros((1, 3, 224, 224), np.float32)
    loss = layergrad.SumOfSquares("fc8")
    full: dict[str, Any] = {"pattern": "backward", "parameters": "all"}
    probe = _Probe(client)
    calls_by_variant: dict[str, Callable[[], layergrad.GradientResult]] = {
        "compute-only": lambda: client.gradients(image, loss, pattern="backward", parameters=["fc8/b"]),
        "stream": lambda: client.gradients(image, loss, **full),
        "shm zero-copy": lambda: client.gradients(image, loss, shared_memory=True, copy=False, **full),
        "shm copy": lambda: client.gradients(image, loss, shared_memory=True, **full),
    }
    first_shm, zero_copy = probe.time(calls_by_variant["shm zero-copy"])
    regions = client.shared_memory_regions
    streamed = calls_by_variant["stream"]().parameters
    copied = calls_by_variant["shm copy"]().parameters
    identical = list(streamed) == list(zero_copy.parameters) == list(copied) and all(
        np.array_equal(streamed[name], zero_copy.parameters[name])
        and np.array_equal(streamed[name], copied[name])
        for name in streamed
    )
    nbytes = sum(array.nbytes for array in streamed.values())
    count = len(streamed)
    del streamed, copied, zero_copy
    for _ in range(warmup):
        for name in VARIANTS:
            calls_by_variant[name]()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(calls):
        for name in VARIANTS:
            sample, result = probe.time(calls_by_variant[name])
            samples[name].append(sample)
            del result
    compute_only = _median([s["call_s"] for s in samples["compute-only"]])
    rows = {}
    for name in VARIANTS[1:]:
        call = _median([s["call_s"] for s in samples[name]])
        after = _median([s["after_backward_s"] for s in samples[name] if "after_backward_s" in s])
        row = {
            "call_s": call,
            "after_backward_s": after,
            "after_backward_bytes_per_s": nbytes / after,
            "call_minus_compute_only_s": call - compute_only,
            "end_to_end_bytes_per_s": nbytes / call,
            "samples": samples[name],
        }
        write = [s["server_write_s"] for s in samples[name] if "server_write_s" in s]
        if write:
            row["server_write_s"] = _median(write)
            row["server_compute_s"] = _median([s["server_compute_s"] for s in samples[name]])
        rows[name] = row
    return {
        "bytes": nbytes,
        "tensors": count,
        "calls": calls,
        "identical": identical,
        "compute_only_s": compute_only,
        "compute_only_samples": samples["compute-only"],
        "first_shm_call": first_shm,
        "regions": regions,
        "rows": rows,
    }


def measure(calls: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Starts a ``--shared-memory`` server on random weights, runs :func:`run`, stops the server."""
    with tempfile.TemporaryDirectory(prefix="layergrad-bench-shm-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        weights = tmp / "weights.npz"
        weights.write_bytes(random_weights_npz(0).getvalue())
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
        server = ServerProcess(
            ["--weights", str(weights), "--workers", "1", "--shared-memory"], tmp / "server.log", env
        )
        try:
            server.wait_serving()
            with layergrad.Client(server.address, timeout=600) as client:
                return run(client, calls, warmup)
        finally:
            server.terminate()


def report_lines(section: dict[str, Any]) -> list[str]:
    """The table of :func:`measure`'s result."""
    if "error" in section:
        return ["shared-memory download (ExportGradients):", f"  {section['error']}"]
    first = section["first_shm_call"]
    lines = [
        f"shared-memory download (ExportGradients) vs stream: {section['bytes'] / 1e6:.1f} MB, "
        f"{section['tensors']} float32 parameter gradients; medians of {section['calls']} interleaved "
        f"rounds; compute-only call (fc8/b) {section['compute_only_s']:.3f} s; "
        f"results {'identical' if section['identical'] else 'DIFFERENT'} on all paths",
        f"  {'path':<15}{'call':>9}{'after backward':>16}{'GB/s':>7}{'GB/s per call':>16}"
        f"{'GB/s end to end':>17}",
    ]
    for name, row in section["rows"].items():
        rates = [section["bytes"] / s["after_backward_s"] / 1e9 for s in row["samples"]]
        lines.append(
            f"  {name:<15}{row['call_s']:>8.3f}s{row['after_backward_s']:>15.3f}s"
            f"{row['after_backward_bytes_per_s'] / 1e9:>7.2f}{f'{min(rates):.2f}-{max(rates):.2f}':>16}"
            f"{row['end_to_end_bytes_per_s'] / 1e9:>17.3f}"
        )
    zero = section["rows"]["shm zero-copy"]
    lines.append(
        f"  shm: server copy into the region {zero['server_write_s'] * 1e3:.1f} ms "
        f"({section['bytes'] / zero['server_write_s'] / 1e9:.2f} GB/s); stream 'after backward' is "
        "after its first message; first shared-memory call (creates, pre-faults and maps the "
        f"region) {first['call_s']:.3f} s, of which server pre {first.get('server_pre_s', 0.0):.3f} s"
    )
    return lines


def target(section: dict[str, Any]) -> dict[str, Any]:
    """The target entry, in ``scripts/bench.py``'s format."""
    if "error" in section:
        return {
            "target": TARGET,
            "value": float("nan"),
            "limit": TARGET_BYTES_PER_S,
            "met": False,
            "shown": f"not measured: {section['error']}",
        }
    rows = section["rows"]
    rate = rows["shm zero-copy"]["after_backward_bytes_per_s"]
    copying = rows["shm copy"]["after_backward_bytes_per_s"]
    stream = rows["stream"]["after_backward_bytes_per_s"]
    return {
        "target": TARGET,
        "value": rate,
        "limit": TARGET_BYTES_PER_S,
        "met": bool(rate >= TARGET_BYTES_PER_S and section["identical"]),
        "shown": f"{rate / 1e9:.2f} GB/s (copying {copying / 1e9:.2f} GB/s; stream {stream / 1e9:.2f} GB/s "
        "after first message)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be positive")
    section = measure(args.calls)
    print("\n".join(report_lines(section)))
    t = target(section)
    print(f"[{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['shown']}")
    if args.json:
        args.json.write_text(json.dumps(section, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
