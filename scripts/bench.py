"""Benchmark of the layergrad service against the same Chainer code run in-process.

Run with ``make bench`` (or ``.venv/bin/python scripts/bench.py``). The script

* writes seeded random VGG16 weights to a temporary npz and starts its own
  ``python -m layergrad_server`` on a free loopback port with them;
* loads the same npz into an in-process Chainer ``VGG16Layers``;
* times every case both ways, side by side and interleaved (warm-up first,
  ``time.perf_counter``, medians over ``--repeat`` repetitions), and reports
  service / in-process ratios;
* measures GetModelInfo latency, concurrent-client throughput (one server process,
  then ``--workers 2 --blas-threads 1``, and as its ceiling two one-thread processes
  computing in-process at once), the bytes/s of the full parameter-gradient
  download, and peak memory of server and client;
* prints a table and a "targets" section and writes everything as JSON
  (``--out``, default ``bench-results/bench.json``).

PyTorch (optional, ``pip install torch==2.13.0``) runs the same network on the
CPU as an outside reference for the input gradient, in a child process so that
its thread pool does not disturb the other measurements. The client's peak
memory is measured in a child process too, which imports only the SDK.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
for _path in (ROOT / "client", ROOT / "server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import grpc  # noqa: E402
import layergrad  # noqa: E402
from layergrad_server._gen.inference import grpc_predict_v2_pb2 as v2  # noqa: E402
from layergrad_server._gen.inference import grpc_predict_v2_pb2_grpc as v2_grpc  # noqa: E402
from layergrad_server.weights.convert import VGG16_LAYOUT  # noqa: E402

SEED = 0
CLASS = 7
# Batch sizes of the input-gradient rows besides batch 1.
BATCHES = (2, 4)
# Two workers, one BLAS thread each (the CPUs split between them), each call to the least-loaded one.
WORKERS_ARGS = ("--workers", "2", "--blas-threads", "1")
DEFAULT_OUT = ROOT / "bench-results" / "bench.json"
TORCH_HINT = "torch not installed (pip install torch==2.13.0)"
ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
# (layer, inputs, outputs) of VGG16's conv and fc layers, from the one layout table.
VGG_CONVS = tuple((k[:-2], s[1], s[0]) for k, s in VGG16_LAYOUT.items() if k.endswith("/W") and len(s) == 4)
VGG_FCS = tuple((k[:-2], s[1], s[0]) for k, s in VGG16_LAYOUT.items() if k.endswith("/W") and len(s) == 2)
POOL_AFTER = {"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"}


# ---- small helpers ------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes (Linux /proc)."""
    out: dict[str, int] = {}
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for key in ("VmRSS", "VmHWM"):
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            out[key] = int(match.group(1)) * 1024
    return out


class CpuMeter:
    """How much CPU other processes on the machine used while a section ran.

    Busy time of the whole machine (/proc/stat) minus the CPU time of this process,
    its finished children and the servers (``server_pids``, with their children: the
    workers of ``--workers N``). Other work on the machine slows both sides of a
    comparison, not always equally, so it is reported with every section.
    """

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pids: list[int] = [] if server_pid is None else [server_pid]
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _process_tree_s(self, pid: int) -> float:
        """CPU seconds of ``pid`` (its waited-for children included) and of its live children."""
        total = 0.0
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(stat.parent.name) == pid:
                    total += sum(int(v) for v in fields[11:15]) / self._tick
                elif int(fields[1]) == pid:
                    total += (int(fields[11]) + int(fields[12])) / self._tick
        return total

    def _machine_busy_s(self) -> float:
        try:
            fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return math.nan
        values = [int(v) for v in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        guest = sum(values[8:10]) if len(values) > 9 else 0  # already counted in user/nice
        return (sum(values) - idle - guest) / self._tick

    def _own_s(self) -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        for pid in self.server_pids:
            total += self._process_tree_s(pid)
        return total

    def snapshot(self) -> tuple[float, float, float]:
        return time.perf_counter(), self._machine_busy_s(), self._own_s()

    @staticmethod
    def other_cpus(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
        """Average number of CPUs kept busy by other processes between two snapshots."""
        wall = end[0] - start[0]
        if wall <= 0:
            return math.nan
        return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall)


class Sections:
    """Consecutive named sections of the run, each with the CPU other processes used meanwhile."""

    def __init__(self, meter: CpuMeter) -> None:
        self.meter = meter
        self.background_cpus: dict[str, float] = {}
        self._current: tuple[str, tuple[float, float, float]] | None = None

    def start(self, name: str) -> None:
        self.stop()
        log(name)
        self._current = (name, self.meter.snapshot())

    def stop(self) -> None:
        if self._current is not None:
            name, begin = self._current
            self.background_cpus[name] = self.meter.other_cpus(begin, self.meter.snapshot())
            self._current = None


def prepared_input() -> np.ndarray:
    """A deterministic prepared batch of one: float32 (1, 3, 224, 224), BGR, mean subtracted."""
    rng = np.random.default_rng(SEED + 1)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32)
    channels = [
        120 * np.sin(xx / rng.uniform(5, 30) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 30))
        for _ in range(3)
    ]
    image = np.stack(channels) + rng.normal(0, 8, size=(3, 224, 224))
    return image.astype(np.float32)[None]


def fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def fmt_bytes(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def side_by_side(
    a: Callable[[], Any],
    b: Callable[[], Any],
    repeat: int,
    warmup: int,
    meter: CpuMeter | None = None,
    max_other_cpus: float = 0.25,
) -> dict[str, Any]:
    """Times ``a`` and ``b`` in pairs, alternating which goes first.

    A pair during which other processes kept more than ``max_other_cpus`` CPUs busy
    is set aside and measured again, up to ``repeat`` extra pairs; if quiet pairs
    stay short, the least disturbed ``repeat`` pairs are used. Returns the samples,
    the attempt index of each used pair, how many pairs were set aside, and the
    warm-up results (for a correctness check).
    """
    ra = rb = None
    for _ in range(warmup):
        ra = a()
        rb = b()
    pairs: list[tuple[int, float, float, float]] = []  # (attempt, a seconds, b seconds, other CPUs)

    def quiet() -> list[tuple[int, float, float, float]]:
        return [p for p in pairs if not p[3] > max_other_cpus]

    for attempt in range(2 * repeat):
        if len(quiet()) >= repeat or (attempt >= repeat and meter is None):
            break
        begin = meter.snapshot() if meter is not None else None
        order = (a, b) if attempt % 2 == 0 else (b, a)
        times = {fn: timed(fn)[0] for fn in order}
        other = meter.other_cpus(begin, meter.snapshot()) if meter is not None else 0.0
        pairs.append((attempt, times[a], times[b], other))
    used = quiet()[:repeat]
    if len(used) < repeat:
        used = sorted(sorted(pairs, key=lambda p: p[3])[:repeat])
    return {
        "a": [p[1] for p in used],
        "b": [p[2] for p in used],
        "attempts": [p[0] for p in used],
        "other_cpus": [p[3] for p in used],
        "set_aside": len(pairs) - len(used),
        "result_a": ra,
        "result_b": rb,
    }


def max_rel_diff(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    """max |a - e| / max |e| over all tensors (0 = identical)."""
    worst = 0.0
    for name, exp in expected.items():
        act = np.asarray(actual[name], dtype=np.float32)
        exp = np.asarray(exp, dtype=np.float32)
        if act.shape != exp.shape:
            return math.inf
        scale = float(np.abs(exp).max()) or 1.0
        worst = max(worst, float(np.abs(act - exp).max()) / scale)
    return worst


def rel_l2_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """||a - e|| / ||e||."""
    diff = np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(diff) / (np.linalg.norm(expected) or 1.0))


# ---- machine description -------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, AttributeError):
        match = re.search(r"^MemTotal:\s+(\d+) kB", pathlib.Path("/proc/meminfo").read_text(), re.MULTILINE)
        mem_total = int(match.group(1)) * 1024
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_bytes": mem_total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "layergrad_sdk": getattr(layergrad, "__version__", "?"),
        "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }
    with contextlib.suppress(Exception):
        import google.protobuf

        info["protobuf"] = google.protobuf.__version__
    info["blas"] = blas_info()
    return info


def blas_info() -> Any:
    try:
        from threadpoolctl import threadpool_info

        return [
            {
                k: pool.get(k)
                for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture")
            }
            for pool in threadpool_info()
        ]
    except ImportError:
        pass
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return {"source": "numpy.show_config", "name": blas.get("name"), "version": blas.get("version")}
    except Exception as error:  # show_config's layout differs between numpy versions
        return {"source": "numpy.show_config", "error": str(error)}


def blas_summary(blas: Any) -> str:
    if isinstance(blas, list):
        parts = [
            f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads, "
            f"{p.get('architecture') or p.get('threading_layer')})"
            for p in blas
        ]
        return "; ".join(parts) or "none found"
    return f"{blas.get('name')} {blas.get('version')}"


# ---- the server subprocess -----------------------------------------------------------


class Server:
    """``python -m layergrad_server`` on 127.0.0.1:<free port>, serving ``weights``."""

    def __init__(self, weights: pathlib.Path, log_path: pathlib.Path, extra: Sequence[str] = ()) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "layergrad_server",
                "--address",
                "127.0.0.1:0",
                "--weights",
                str(weights),
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.address = f"127.0.0.1:{self._wait_port()}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")

    def _wait_port(self, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on [\d.]+:(\d+)", self.log())
            if match:
                return int(match.group(1))
            self._check_alive()
            time.sleep(0.05)
        raise TimeoutError(f"server did not report its port:\n{self.log()[-4000:]}")

    def wait_serving(self, timeout: float = 300.0) -> None:
        """Waits until GetModelInfo answers, i.e. the model is loaded and warmed up (and, with
        --workers, until the parent reports every worker serving)."""
        deadline = time.monotonic() + timeout
        while "--workers" in self.process.args and "workers serving" not in self.log():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not serving after {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        with layergrad.Client(self.address, timeout=5) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    client.model_info()
                    return
                except layergrad.LayergradError:
                    time.sleep(0.2)
        raise TimeoutError(f"server not serving after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# ---- in-process Chainer: the same code the tests use as reference --------------------


def load_chainer() -> Any:
    from layergrad_server import _compat

    _compat.apply()  # numpy 2 shims; must precede the chainer import
    import chainer

    return chainer


class InProcess:
    """A plain Chainer ``VGG16Layers`` on the same weights, running each case's Chainer idiom."""

    def __init__(self, weights: pathlib.Path) -> None:
        chainer = load_chainer()
        from chainer.links.model.vision import vgg
        from layergrad_server import kernels

        # The same CPU kernels as the server (its default, --cpu-kernels fast), so that the
        # service/in-process ratios measure the service alone; stock Chainer is timed separately.
        kernels.install()
        self.kernels = kernels
        self.chainer = chainer
        self.F = chainer.functions
        self.net = vgg.VGG16Layers(pretrained_model=str(weights))
        names = list(self.net.available_layers)
        self.layers_to_fc8 = names[: names.index("fc8") + 1]
        self.classes = np.array([CLASS], dtype=np.int32)

    def _class_score(self, acts: dict[str, Any]) -> Any:
        classes = np.full(len(acts["fc8"]), CLASS, dtype=np.int32)  # one per input of the batch
        return self.F.sum(self.F.select_item(acts["fc8"], classes))

    def input_gradient(self, x: np.ndarray) -> np.ndarray:
        """``chainer.grad([loss], [x])``."""
        chainer = self.chainer
        with chainer.using_config("train", False):
            xv = chainer.Variable(x)
            acts = self.net.forward(xv, layers=["fc8"])
            (gx,) = chainer.grad([self._class_score(acts)], [xv])
        return gx.array

    def parameter_gradients(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``net.cleargrads(); loss.backward()`` and read every parameter's ``.grad``."""
        chainer = self.chainer
        with chainer.using_config("train", False):
            acts = self.net.forward(chainer.Variable(x), layers=["fc8"])
            loss = self.F.softmax_cross_entropy(acts["fc8"], self.classes)
        self.net.cleargrads()
        loss.backward()
        grads = {name.lstrip("/"): param.grad for name, param in self.net.namedparams()}
        self.net.cleargrads()
        return grads

    def layer_gradient(self, x: np.ndarray, layer: str = "conv5_3") -> np.ndarray:
        """``chainer.grad([loss], [acts[layer]])``."""
        chainer = self.chainer
        with chainer.using_config("train", False):
            acts = self.net.forward(chainer.Variable(x), layers=[layer, "fc8"])
            (g,) = chainer.grad([self._class_score(acts)], [acts[layer]])
        return g.array

    def all_layer_gradients(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``net.cleargrads(); loss.backward(retain_grad=True)`` and read every layer's ``.grad``."""
        chainer = self.chainer
        with chainer.using_config("train", False):
            acts = self.net.forward(chainer.Variable(x), layers=self.layers_to_fc8)
            loss = self._class_score(acts)
        self.net.cleargrads()
        loss.backward(retain_grad=True)
        grads = {name: acts[name].grad for name in self.layers_to_fc8}
        self.net.cleargrads()
        return grads

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Forward only, like ``VGG16Layers.extract``."""
        chainer = self.chainer
        with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
            return self.net.forward(x, layers=["prob"])["prob"].array


# ---- SDK side ------------------------------------------------------------------------


class _TimedStream:
    """Passes a gRPC response stream through, noting when its first message arrived."""

    def __init__(self, call: Any, probe: StreamProbe) -> None:
        self._call = call
        self._probe = probe

    def __iter__(self) -> _TimedStream:
        return self

    def __next__(self) -> Any:
        item = next(self._call)
        if self._probe.first_message is None:
            self._probe.first_message = time.perf_counter()
        self._probe.messages += 1
        return item

    def cancel(self) -> bool:
        return self._call.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class StreamProbe:
    """Wraps a client's StreamGradients stub so a call's time to first message is known.

    With ``when_ready=False`` the requests go without ``parameters_when_ready`` (which the
    SDK sets for parameter targets): the server then sends every tensor once the backward
    pass is over, in the documented order, as before that option existed."""

    def __init__(self, client: layergrad.Client, when_ready: bool = True) -> None:
        self.first_message: float | None = None
        self.messages = 0
        stub = getattr(client, "_stub", None)
        self.installed = stub is not None and hasattr(stub, "StreamGradients")
        if self.installed:
            original = stub.StreamGradients

            def wrapped(request: Any, *args: Any, **kwargs: Any) -> _TimedStream:
                if not when_ready and request.parameters_when_ready:
                    request = type(request).FromString(request.SerializeToString())
                    request.parameters_when_ready = False
                return _TimedStream(original(request, *args, **kwargs), self)

            stub.StreamGradients = wrapped

    def call(self, fn: Callable[[], Any]) -> dict[str, Any]:
        """Runs ``fn`` (one streamed SDK call); returns its total time and time to first message."""
        self.first_message = None
        self.messages = 0
        start = time.perf_counter()
        value = fn()
        end = time.perf_counter()
        first = self.first_message
        return {
            "total_s": end - start,
            "first_message_s": None if first is None else first - start,
            "after_first_message_s": None if first is None else end - first,
            "messages": self.messages,
            "value": value,
        }


def download_runs(
    probe: StreamProbe,
    fn: Callable[[], dict[str, np.ndarray]],
    repeat: int,
    warmup: int,
    wire_itemsize: int = 4,
) -> dict[str, Any]:
    """Repeated full parameter-gradient downloads: medians of total and post-first-message time.

    ``wire_itemsize``: bytes per element on the wire (2 for float16 and bfloat16, which the
    SDK hands back as float32)."""
    nbytes = 0
    for _ in range(warmup):
        nbytes = sum(a.size for a in fn().values()) * wire_itemsize
    runs = []
    for _ in range(repeat):
        run = probe.call(fn)
        nbytes = sum(a.size for a in run.pop("value").values()) * wire_itemsize
        runs.append(run)
    return summarize_download(runs, nbytes)


def summarize_download(runs: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    total = median([r["total_s"] for r in runs])
    after = [r["after_first_message_s"] for r in runs if r["after_first_message_s"] is not None]
    first = [r["first_message_s"] for r in runs if r["first_message_s"] is not None]
    return {
        "bytes": nbytes,
        "runs": runs,
        "total_s_median": total,
        "first_message_s_median": median(first),
        "after_first_message_s_median": median(after),
        "end_to_end_bytes_per_s": nbytes / total,
        "transfer_bytes_per_s": nbytes / median(after) if after else math.nan,
        "messages": runs[-1]["messages"] if runs else 0,
    }


# ---- reduced-precision output ----------------------------------------------------------

# The cases on which float16 output used to lose values silently: (label, loss, targets, tensor).
PRECISION_CASES = (
    (
        "input gradient of SumOfSquares(prob)",
        layergrad.SumOfSquares("prob"),
        {"pattern": "backward", "input": True},
        "input",
    ),
    (
        "conv1_1/W gradient of SumOfSquares(conv1_2)",
        layergrad.SumOfSquares("conv1_2"),
        {"pattern": "backward", "parameters": ["conv1_1/W"]},
        "conv1_1/W",
    ),
)
# Bound on the relative L2 error of each output type: half an ulp at 8 and 11 significant bits.
PRECISION_BOUNDS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def precision_error(values: np.ndarray, full: np.ndarray) -> dict[str, Any]:
    """How ``values`` differ from the float32 ``full``: relative L2 error, the largest relative error
    of one element, and the values lost (finite -> infinite, non-zero -> zero)."""
    nonzero = full != 0
    with np.errstate(invalid="ignore", over="ignore"):
        element = np.abs(values.astype(np.float64) - full) / np.abs(np.where(nonzero, full, 1.0))
        return {
            "rel_l2": rel_l2_diff(values, full) if np.isfinite(values).all() else math.inf,
            "max_rel_element": float(element[nonzero & np.isfinite(values)].max(initial=0.0)),
            "became_inf": int(np.count_nonzero(np.isinf(values) & np.isfinite(full))),
            "became_zero": int(np.count_nonzero((values == 0) & nonzero)),
            "nonzero": int(np.count_nonzero(nonzero)),
        }


def precision_report(address: str, x: np.ndarray, repeat: int) -> dict[str, Any]:
    """Per case and output type, the error against float32 through the SDK (stream, unary) and what
    a client that does not ask for float16 scaling gets; then conversion speeds."""
    from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
    from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc

    cases = []
    with layergrad.Client(address, timeout=600) as client, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        for label, loss, targets, name in PRECISION_CASES:

            def get(call: Callable[..., Any], dtype: str, loss: Any = loss, targets: Any = targets) -> Any:
                result = call(x, loss, dtype=dtype, **targets)
                return result.input if result.input is not None else next(iter(result.parameters.values()))

            full = get(client.gradients, "float32")
            with np.errstate(over="ignore"):
                plain = full.astype(np.float16).astype(np.float32)
            entry: dict[str, Any] = {
                "label": label,
                "tensor": name,
                "float16 unscaled (cast)": precision_error(plain, full),
            }
            for dtype in ("bfloat16", "float16"):
                streamed = get(client.gradients, dtype)
                unary = get(client.compute_gradients_unary, dtype)
                entry[dtype] = {
                    **precision_error(streamed, full),
                    "unary_equal": bool(np.array_equal(streamed, unary)),
                }
            request = pb.ComputeGradientsRequest(
                inputs=[pb.Input(prepared=layergrad._tensors.to_tensor(x[0]))],
                loss=loss._to_proto(),
                pattern=pb.BACKWARD_PATTERN_BACKWARD,
                targets=pb.GradientTargets(input=True)
                if name == "input"
                else pb.GradientTargets(parameters=[name]),
                output_dtype=pb.DATA_TYPE_FLOAT16,
            )
            try:
                stub.ComputeGradients(request)
                entry["unscaled_client"] = {"refused": False}
            except grpc.RpcError as error:
                info = layergrad.errors.from_grpc_error(error).error_info
                entry["unscaled_client"] = {
                    "refused": True,
                    "code": error.code().name,
                    "reason": info.reason if info else None,
                    "metadata": dict(info.metadata) if info else {},
                }
            cases.append(entry)
    return {"cases": cases, "conversion": conversion_speed(repeat)}


def conversion_speed(repeat: int, count: int = 1 << 24) -> dict[str, Any]:
    """MB/s of float32 converted, on one array of ``count`` gradient-like values (64 MB): the
    server's encoding (with its overflow/underflow counts) and the SDK's decoding, per type."""
    from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
    from layergrad._tensors import decode_into
    from layergrad_server import precision

    values = (np.random.default_rng(SEED).standard_normal(count) * 1e-6).astype(np.float32)
    out = np.empty_like(values)
    mb = values.nbytes / 1e6

    def speed(fn: Callable[[], Any]) -> float:
        fn()
        return mb / median([timed(fn)[0] for _ in range(max(repeat, 3))])

    with np.errstate(over="ignore"):
        rows = {
            "float16 cast (numpy astype, no checks)": {"encode": speed(lambda: values.astype(np.float16))},
        }
    for dtype, wire, scaling in (
        ("bfloat16", precision.BFLOAT16, False),
        ("float16", precision.FLOAT16, True),
    ):
        encoded = precision.encode(values, wire, scaling=scaling)
        enum = pb.DATA_TYPE_BFLOAT16 if dtype == "bfloat16" else pb.DATA_TYPE_FLOAT16
        rows[dtype] = {
            "encode": speed(
                lambda wire=wire, scaling=scaling: precision.encode(values, wire, scaling=scaling)
            ),
            "decode": speed(lambda e=encoded, enum=enum: decode_into(e.data, enum, e.exponent, out)),
            "exponent": encoded.exponent,
        }
    return {"float32_mb": mb, "rows": rows}


def precision_lines(p: dict[str, Any]) -> list[str]:
    lines = ["reduced-precision output, error against float32 through the SDK (stream; unary identical):"]
    for case in p["cases"]:
        lines.append(f"  {case['label']} ({case['float16 unscaled (cast)']['nonzero']} non-zero values):")
        for key in ("float16 unscaled (cast)", "bfloat16", "float16"):
            e = case[key]
            same = (
                "" if key.startswith("float16 unscaled") else ("" if e["unary_equal"] else "  UNARY DIFFERS")
            )
            lines.append(
                f"    {key:<24} rel L2 {e['rel_l2']:.3g}, worst element {e['max_rel_element']:.3g}, "
                f"lost {e['became_inf']} to inf and {e['became_zero']} to zero{same}"
            )
        old = case["unscaled_client"]
        if old["refused"]:
            meta = old["metadata"]
            lines.append(
                f"    float16 without float16_scaling: refused {old['code']} {old['reason']} "
                f"(overflow {meta.get('overflow')}, underflow {meta.get('underflow')})"
            )
        else:
            lines.append("    float16 without float16_scaling: served unscaled (no value lost)")
    c = p["conversion"]
    lines.append(f"  conversion speed, MB/s of float32 ({c['float32_mb']:.0f} MB of gradient-like values):")
    for name, row in c["rows"].items():
        parts = [f"server encode {row['encode']:.0f}"]
        if "decode" in row:
            parts.append(f"SDK decode {row['decode']:.0f}")
        lines.append(f"    {name}: " + ", ".join(parts))
    return lines


def precision_targets(p: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for dtype, bound in PRECISION_BOUNDS.items():
        errors = [case[dtype] for case in p["cases"]]
        worst = max(e["rel_l2"] for e in errors)
        lost = sum(e["became_inf"] + e["became_zero"] for e in errors)
        met = worst <= bound and lost == 0 and all(e["unary_equal"] for e in errors)
        out.append(
            {
                "target": f"{dtype} output: no value lost, rel L2 <= 2**{int(math.log2(bound))} on the cases",
                "value": worst,
                "limit": bound,
                "met": met,
                "shown": f"worst rel L2 {worst:.3g}, {lost} values lost",
            }
        )
    refused = all(case["unscaled_client"]["refused"] for case in p["cases"])
    out.append(
        {
            "target": "float16 without float16_scaling: refused with counts, not values lost",
            "value": float(refused),
            "limit": 1.0,
            "met": refused,
            "shown": "refused on both cases" if refused else "served",
        }
    )
    return out


def precision_only(args: argparse.Namespace) -> int:
    """``--precision-only``: the reduced-precision rows alone, on a server of their own."""
    load_chainer()
    from layergrad_server.engine import random_weights_npz

    with tempfile.TemporaryDirectory(prefix="layergrad-bench-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        weights = tmp / f"vgg16-random-{SEED}.npz"
        weights.write_bytes(random_weights_npz(SEED).getvalue())
        server = Server(weights, tmp / "server.log")
        try:
            server.wait_serving()
            p = precision_report(server.address, prepared_input(), args.repeat)
        finally:
            server.stop()
    text = "\n".join([*precision_lines(p), "", "targets:"])
    text += "".join(
        f"\n  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['shown']}" for t in precision_targets(p)
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(_finite({"precision": p, "table": text}), indent=2, default=_json_default) + "\n"
    )
    return 0


# ---- child processes: SDK-only client memory, and PyTorch ----------------------------


def client_memory_child(address: str, dtype: str) -> int:
    """Run as a child: one full parameter-gradient download through the SDK; prints JSON."""
    x = prepared_input()
    before = proc_status()
    with layergrad.Client(address, timeout=600) as client:
        client.model_info()  # channel up before the baseline
        connected = proc_status()
        start = time.perf_counter()
        grads = client.parameter_gradients(x, layergrad.SoftmaxCrossEntropy([CLASS]), "all", dtype=dtype)
        elapsed = time.perf_counter() - start
        payload = sum(g.nbytes for g in grads.values())
        after = proc_status()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "dtype": dtype,
                "payload_bytes": payload,
                "tensors": len(grads),
                "seconds": elapsed,
                "rss_at_start_bytes": before.get("VmRSS"),
                "rss_connected_bytes": connected.get("VmRSS"),
                "rss_after_bytes": after.get("VmRSS"),
                "peak_rss_bytes": after.get("VmHWM"),
                "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            }
        )
    )
    return 0


def build_torch_vgg16(torch: Any, weights: dict[str, np.ndarray]) -> Any:
    """VGG16 in torch.nn with Chainer's layout: conv3x3/pad 1 + ReLU, 2x2 max pools, fc6-fc8."""
    nn = torch.nn

    class VGG16(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleDict({n: nn.Conv2d(i, o, 3, padding=1) for n, i, o in VGG_CONVS})
            self.fcs = nn.ModuleDict({n: nn.Linear(i, o) for n, i, o in VGG_FCS})

        def forward(self, x: Any) -> Any:
            for name, _, _ in VGG_CONVS:
                x = torch.relu(self.convs[name](x))
                if name in POOL_AFTER:
                    x = torch.nn.functional.max_pool2d(x, 2, 2)
            x = torch.flatten(x, 1)  # row-major (C, H, W), as Chainer's Linear reshapes
            x = torch.relu(self.fcs["fc6"](x))
            x = torch.relu(self.fcs["fc7"](x))
            return self.fcs["fc8"](x)

    model = VGG16()
    with torch.no_grad():
        for group in (model.convs, model.fcs):
            for name, layer in group.items():
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights[f"{name}/W"])))
                layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(weights[f"{name}/b"])))
    return model.eval()


def torch_child(weights_path: str, input_path: str, out_path: str, repeat: int, warmup: int) -> int:
    """Run as a child: PyTorch CPU input gradient of the same loss; prints JSON."""
    try:
        import torch
    except ImportError:
        print(json.dumps({"error": TORCH_HINT}))
        return 0
    with np.load(weights_path) as npz:
        model = build_torch_vgg16(torch, {k: npz[k] for k in npz.files})
    x_np = np.load(input_path)

    def input_gradient() -> np.ndarray:
        x = torch.from_numpy(x_np).requires_grad_(True)
        logits = model(x)
        loss = logits[torch.arange(x.shape[0]), CLASS].sum()
        (gx,) = torch.autograd.grad(loss, [x])
        return gx.numpy()

    result = None
    for _ in range(warmup):
        result = input_gradient()
    samples = [timed(input_gradient)[0] for _ in range(repeat)]
    if result is None:
        result = input_gradient()
    np.save(out_path, result)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "samples_s": samples,
                "median_s": median(samples),
            }
        )
    )
    return 0


def run_child(args: list[str], timeout: float = 600, env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")]),
    }
    proc = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"child exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def compute_rate_child(weights: str, input_path: str, calls: int) -> int:
    """Run as a child: ``calls`` in-process input gradients (server kernels) after a warm-up,
    timed one by one; prints JSON. The BLAS thread count comes from the environment."""
    inproc = InProcess(pathlib.Path(weights))
    x = np.load(input_path)
    inproc.input_gradient(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        inproc.input_gradient(x)
        times.append(time.perf_counter() - start)
    print(json.dumps({"times_s": times, "median_s": median(times), "total_s": sum(times)}))
    return 0


def compute_ceiling(
    weights: pathlib.Path, input_path: pathlib.Path, calls: int, alone_s: float
) -> dict[str, Any]:
    """The most calls per second two one-thread workers can get from this machine's CPUs: two
    processes with one BLAS thread each, running ``calls`` input gradients in-process at once
    (no service), against ``alone_s``, the in-process time of one call with the BLAS default.

    Separate processes on this VM differ in speed by up to ~15% (the same code, run after run),
    so the ratio is an estimate, not a bound to the percent.
    """
    one = dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    args = ["--_compute-rate", str(weights), str(input_path), str(calls)]
    with futures.ThreadPoolExecutor(2) as pool:
        pair = list(pool.map(lambda _: run_child(args, env=one), range(2)))
    for child in pair:
        if "error" in child:
            return child
    rate_pair = sum(1 / child["median_s"] for child in pair)
    return {
        "calls": calls,
        "alone_median_s": alone_s,
        "pair_median_s": [child["median_s"] for child in pair],
        "alone_per_s": 1 / alone_s,
        "pair_per_s": rate_pair,
        "ratio": rate_pair * alone_s,
    }


# ---- where the download time goes, without a network ---------------------------------


def serialization_breakdown(grads: dict[str, np.ndarray], chunk_bytes: int) -> dict[str, Any]:
    """Server chunking + SerializeToString, then client FromString + assembly, of the same tensors.

    Uses the server's and SDK's own conversion code in this process, so it shows the
    CPU cost of each side per byte; what is left of the measured transfer time is gRPC.
    """
    try:
        from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
        from layergrad._tensors import _ChunkAssembler, parse_stream_chunk
        from layergrad_server import convert, engine
    except ImportError as error:
        return {"error": f"cannot import conversion code: {error}"}
    nbytes = sum(g.nbytes for g in grads.values())
    try:
        result = engine.GradientResult(
            [engine.ResultTensor(n, engine.Kind.PARAMETER_GRADIENT, g) for n, g in grads.items()], None
        )
        start = time.perf_counter()
        wire = [m.SerializeToString() for m in convert.gradient_chunks(result, chunk_bytes)]
        generated_server_s = time.perf_counter() - start
        start = time.perf_counter()
        assembler = _ChunkAssembler()
        for data in wire:
            assembler.add(pb.StreamGradientsResponse.FromString(data))
        assembler.finish()
        generated_client_s = time.perf_counter() - start
        del wire, assembler
        # What the server and SDK run: hand-built frames and the SDK's own parser.
        start = time.perf_counter()
        wire = list(convert.gradient_frames(result, chunk_bytes))
        server_s = time.perf_counter() - start
        start = time.perf_counter()
        assembler = _ChunkAssembler()
        for data in wire:
            assembler.add(parse_stream_chunk(data))
        assembled = assembler.finish()
        client_s = time.perf_counter() - start
        same = all(np.array_equal(t.array, grads[t.name]) for t in assembled)
    except Exception as error:  # the conversion code is internal and may change
        return {"error": f"{type(error).__name__}: {error}"}
    del wire
    # A plain memory copy of the same bytes, for scale.
    dst = {n: np.empty_like(g) for n, g in grads.items()}
    start = time.perf_counter()
    for n, g in grads.items():
        np.copyto(dst[n], g)
    copy_s = time.perf_counter() - start
    return {
        "bytes": nbytes,
        "chunk_bytes": chunk_bytes,
        "generated_server_s": generated_server_s,
        "generated_client_s": generated_client_s,
        "server_chunk_serialize_s": server_s,
        "client_parse_assemble_s": client_s,
        "memcpy_s": copy_s,
        "server_bytes_per_s": nbytes / server_s,
        "client_bytes_per_s": nbytes / client_s,
        "memcpy_bytes_per_s": nbytes / copy_s,
        "round_trip_identical": same,
    }


# ---- concurrency ---------------------------------------------------------------------


def throughput(address: str, x: np.ndarray, clients: int, total: int) -> dict[str, Any]:
    """``total`` input-gradient calls split evenly over ``clients`` concurrent SDK clients."""
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    loss = layergrad.ClassScore("fc8", [CLASS])
    sdks = [layergrad.Client(address, timeout=600) for _ in range(clients)]
    for sdk in sdks:
        sdk.model_info()  # connect before the clock starts
    barrier = threading.Barrier(clients + 1)
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(sdk: layergrad.Client, count: int) -> None:
        barrier.wait()
        try:
            for _ in range(count):
                elapsed, _ = timed(lambda: sdk.input_gradient(x, loss))
                with lock:
                    latencies.append(elapsed)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(s, n)) for s, n in zip(sdks, per_client, strict=True)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for sdk in sdks:
        sdk.close()
    if errors:
        raise errors[0]
    return {
        "clients": clients,
        "requests": total,
        "wall_s": wall,
        "requests_per_s": total / wall,
        "latency_median_s": median(latencies),
        "latency_max_s": max(latencies),
    }


# ---- the run -------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    repeat, warmup = args.repeat, 1
    started = time.perf_counter()
    machine = machine_info()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "repeat": repeat,
            "input_repeat": args.input_repeat,
            "warmup": warmup,
            "quick": args.quick,
            "throughput_requests": args.requests,
            "model_info_calls": args.model_info_calls,
            "weights": f"random seed {SEED} (engine.random_weights_npz), written to a temporary npz",
            "input": "one prepared float32 image (1, 3, 224, 224), sent as a prepared tensor",
            "loss": f"ClassScore(fc8, [{CLASS}]) unless noted; SoftmaxCrossEntropy([{CLASS}]) for parameters",
        },
        "loadavg_start": _loadavg(),
    }
    x = prepared_input()
    meter = CpuMeter()
    if args.wait_quiet > 0:
        report["waited_for_quiet_s"] = wait_quiet(meter, args.wait_quiet)
    run_begin = meter.snapshot()
    with tempfile.TemporaryDirectory(prefix="layergrad-bench-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        weights = tmp / f"vgg16-random-{SEED}.npz"
        log("writing random weights")
        load_chainer()  # the numpy 2 shims first, whatever the engine module imports
        from layergrad_server.engine import random_weights_npz

        weights.write_bytes(random_weights_npz(SEED).getvalue())
        log("starting server")
        server = Server(weights, tmp / "server.log")
        try:
            load_start = time.perf_counter()
            inproc = InProcess(weights)
            report["in_process_load_s"] = time.perf_counter() - load_start
            server.wait_serving()
            report["server_ready_s"] = time.perf_counter() - load_start
            report["server_rss_serving_bytes"] = proc_status(server.pid).get("VmRSS")
            try:
                import chainer

                machine["chainer"] = chainer.__version__
            except ImportError:
                pass
            report["server_address"] = server.address
            body(args, report, server, inproc, x, tmp, weights, repeat, warmup)
            report["server_memory"] = proc_status(server.pid)
        except BaseException:
            log("server log tail:\n" + server.log()[-3000:])
            raise
        finally:
            server.stop()
    report["total_runtime_s"] = time.perf_counter() - started - report.get("waited_for_quiet_s", 0.0)
    # The server has been waited for, so its CPU time is in RUSAGE_CHILDREN now.
    report["background_cpus_whole_run"] = meter.other_cpus(run_begin, meter.snapshot())
    report["loadavg_end"] = _loadavg()
    return report


def wait_quiet(meter: CpuMeter, timeout: float, threshold: float = 0.15, window: float = 3.0) -> float:
    """Waits (at most ``timeout`` s) until other processes use under ``threshold`` CPUs over ``window`` s."""
    start = last_log = time.perf_counter()
    log(f"waiting up to {timeout:.0f} s for other processes to leave the CPUs idle")
    while True:
        begin = meter.snapshot()
        time.sleep(window)
        busy = meter.other_cpus(begin, meter.snapshot())
        now = time.perf_counter()
        if busy < threshold or now - start >= timeout:
            log(f"other processes use {busy:.2f} CPUs; starting after {now - start:.0f} s")
            return now - start
        if now - last_log >= 30:
            log(f"still waiting: other processes use {busy:.2f} CPUs")
            last_log = now


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in pathlib.Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def body(
    args: argparse.Namespace,
    report: dict[str, Any],
    server: Server,
    inproc: InProcess,
    x: np.ndarray,
    tmp: pathlib.Path,
    weights: pathlib.Path,
    repeat: int,
    warmup: int,
) -> None:
    score = layergrad.ClassScore("fc8", [CLASS])
    xent = layergrad.SoftmaxCrossEntropy([CLASS])
    client = layergrad.Client(server.address, timeout=600)
    probe_client = layergrad.Client(server.address, timeout=600)
    probe = StreamProbe(probe_client)
    # The same calls with every tensor sent after the backward pass (the transfer alone).
    plain_client = layergrad.Client(server.address, timeout=600)
    plain_probe = StreamProbe(plain_client, when_ready=False)
    info = client.model_info()
    sections = Sections(CpuMeter(server.pid))
    report["background_cpus"] = sections.background_cpus
    report["server_model"] = {
        "model_name": info.model_name,
        "device": info.device,
        "versions": info.versions,
        "stream_chunk_bytes": info.stream_chunk_bytes,
        "parameters": info.num_parameters,
        "parameter_bytes": info.parameter_nbytes,
    }
    cases: dict[str, Any] = {}
    report["cases"] = cases

    def case(
        key: str, label: str, a: Callable[[], Any], b: Callable[[], Any], check: Callable, times: int = repeat
    ) -> Any:
        sections.start(key)
        timing = side_by_side(a, b, times, warmup, sections.meter)
        cases[key] = case_entry(label, timing, check(timing["result_a"], timing["result_b"]))
        return timing["result_a"], timing["result_b"]

    ref_input, _ = case(
        "input_gradient",
        "input gradient (GRAD)",
        lambda: inproc.input_gradient(x),
        lambda: client.input_gradient(x, score),
        lambda a, b: max_rel_diff({"g": b}, {"g": a}),
        times=args.input_repeat,
    )

    # The same input gradient through the KServe v2 protocol: ModelInfer runs layergrad.v1's
    # ComputeGradients, so the difference is the protocol's conversion and one unary message.
    sections.start("kserve_v2")
    report["kserve_v2"] = kserve_v2_input_gradient(
        server.address, client, x, score, args.input_repeat, warmup
    )

    # Batches: the same image, slightly varied per input; time per image against batch 1.
    for batch in BATCHES:
        xb = np.concatenate([x * np.float32(1 + 0.01 * i) for i in range(batch)])
        scores = layergrad.ClassScore("fc8", [CLASS] * batch)
        case(
            f"input_gradient_batch_{batch}",
            f"input gradient, batch {batch} (GRAD)",
            lambda xb=xb: inproc.input_gradient(xb),
            lambda xb=xb, scores=scores: client.input_gradient(xb, scores),
            lambda a, b: max_rel_diff({"g": b}, {"g": a}),
        )

    # Stock Chainer (without layergrad's CPU kernels) on the same input, pairs with the fast kernels.
    sections.start("stock_kernels")
    stock_t, fast_t = [], []
    for i in range(max(repeat, 3)):
        for stock in (i % 2 == 0, i % 2 == 1):
            with inproc.kernels.installed(not stock):
                start = time.perf_counter()
                grad = inproc.input_gradient(x)
                (stock_t if stock else fast_t).append(time.perf_counter() - start)
            if stock and i == 0:
                stock_identical = bool(np.array_equal(grad, ref_input))
    report["cpu_kernels"] = {
        "stock_median_s": statistics.median(stock_t),
        "fast_median_s": statistics.median(fast_t),
        "fast_over_stock": statistics.median(fast_t) / statistics.median(stock_t),
        "bit_identical": stock_identical,
        "pairs": len(stock_t),
    }

    # PyTorch, as an outside reference, in its own process.
    sections.start("torch")
    np.save(tmp / "input.npy", x)
    torch_result = run_child(
        ["--_torch", str(weights), str(tmp / "input.npy"), str(tmp / "torch_grad.npy"), str(repeat), "1"]
    )
    if "error" not in torch_result:
        torch_grad = np.load(tmp / "torch_grad.npy")
        torch_result["max_rel_diff_vs_chainer"] = max_rel_diff({"g": torch_grad}, {"g": ref_input})
        torch_result["rel_l2_diff_vs_chainer"] = rel_l2_diff(torch_grad, ref_input)
        torch_result["chainer_in_process_over_torch"] = (
            cases["input_gradient"]["in_process_median_s"] / torch_result["median_s"]
        )
        torch_result["service_over_torch"] = (
            cases["input_gradient"]["service_median_s"] / torch_result["median_s"]
        )
        torch_result["stock_chainer_over_torch"] = (
            report["cpu_kernels"]["stock_median_s"] / torch_result["median_s"]
        )
    report["torch"] = torch_result

    # All parameter gradients; the service side also records time to first stream message.
    sections.start("parameter_gradients")
    downloads: list[dict[str, Any]] = []

    def service_params() -> dict[str, np.ndarray]:
        run = probe.call(lambda: probe_client.parameter_gradients(x, xent, "all"))
        downloads.append(run)
        return run.pop("value")

    timing = side_by_side(
        lambda: inproc.parameter_gradients(x), service_params, repeat, warmup, sections.meter
    )
    ref_params, sdk_params = timing["result_a"], timing["result_b"]
    cases["parameter_gradients"] = case_entry(
        "all parameter gradients (BACKWARD)", timing, max_rel_diff(sdk_params, ref_params)
    )
    payload = cases["parameter_gradients"]["bytes"] = sum(g.nbytes for g in sdk_params.values())
    when_ready = summarize_download([downloads[warmup + i] for i in timing["attempts"]], payload)
    when_ready["in_process_compute_s_median"] = median(timing["a"])
    del timing

    # The same call with the tensors sent only after the backward pass, against the default.
    sections.start("parameter_gradients_after_backward")
    plain_downloads: list[dict[str, Any]] = []

    def plain_params() -> dict[str, np.ndarray]:
        run = plain_probe.call(lambda: plain_client.parameter_gradients(x, xent, "all"))
        plain_downloads.append(run)
        return run.pop("value")

    timing = side_by_side(plain_params, service_params, repeat, warmup, sections.meter)
    identical = all(
        np.array_equal(timing["result_a"][name], array) for name, array in timing["result_b"].items()
    )
    entry = case_entry("all parameters: after / when ready", timing, 0.0 if identical else math.inf)
    entry["note"] = "in-process column: the service sending every tensor after the backward pass"
    cases["parameter_gradients_when_ready"] = entry
    download = summarize_download([plain_downloads[warmup + i] for i in timing["attempts"]], payload)
    download["in_process_compute_s_median"] = when_ready["in_process_compute_s_median"]
    del timing
    del sdk_params

    case(
        "layer_gradient_conv5_3",
        "conv5_3 gradient (GRAD)",
        lambda: inproc.layer_gradient(x, "conv5_3"),
        lambda: client.gradients(x, score, pattern="grad", layers=["conv5_3"]).layers["conv5_3"],
        lambda a, b: max_rel_diff({"g": b}, {"g": a}),
    )
    ref_layers, _ = case(
        "all_layer_gradients",
        "all layers (BACKWARD_RETAIN_GRAD)",
        lambda: inproc.all_layer_gradients(x),
        lambda: client.gradients(x, score, pattern="backward_retain_grad", layers="all").layers,
        lambda a, b: max_rel_diff(b, a),
    )
    cases["all_layer_gradients"]["bytes"] = sum(g.nbytes for g in ref_layers.values())
    case(
        "predict",
        "Predict (prob)",
        lambda: inproc.predict(x),
        lambda: client.predict(x, ["prob"])["prob"],
        lambda a, b: max_rel_diff({"p": b}, {"p": a}),
    )

    # GetModelInfo latency.
    sections.start("model_info")
    for _ in range(20):
        client.model_info()
    latencies = [timed(client.model_info)[0] for _ in range(args.model_info_calls)]
    report["model_info"] = {
        "calls": len(latencies),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "mean_s": float(np.mean(latencies)),
    }

    # Throughput with 1, 2, 4 concurrent clients.
    report["throughput"] = []
    for clients in (1, 2, 4):
        sections.start(f"throughput_{clients}")
        report["throughput"].append(throughput(server.address, x, clients, max(args.requests, clients)))

    # The same rows against --workers 2 (a second server, same weights).
    sections.start("workers_start")
    workers = Server(weights, tmp / "workers.log", WORKERS_ARGS)
    sections.meter.server_pids.append(workers.pid)
    try:
        workers.wait_serving()
        # Two calls at once, twice, reach both workers: each has run a call or two since its
        # warm-up, as the single server has (memory the first calls touch comes back slowly).
        throughput(workers.address, x, 2, 4)
        report["throughput_workers"] = {"args": list(WORKERS_ARGS), "rows": []}
        for clients in (1, 2, 4):
            sections.start(f"throughput_workers_{clients}")
            report["throughput_workers"]["rows"].append(
                throughput(workers.address, x, clients, max(args.requests, clients))
            )
    finally:
        workers.stop()
        sections.meter.server_pids.remove(workers.pid)
    # What two one-thread processes can do at most here, without any service in between.
    sections.start("workers_ceiling")
    np.save(tmp / "ceiling-input.npy", x)
    alone = report["cases"]["input_gradient"]["in_process_median_s"]
    report["workers_ceiling"] = compute_ceiling(weights, tmp / "ceiling-input.npy", args.requests, alone)
    if "pair_per_s" in report["workers_ceiling"]:
        busiest = report["throughput_workers"]["rows"][-1]["requests_per_s"]
        report["workers_ceiling"]["group_share"] = busiest / report["workers_ceiling"]["pair_per_s"]

    # float16 download.
    sections.start("download_float16")
    half = download_runs(
        probe, lambda: probe_client.parameter_gradients(x, xent, "all", dtype="float16"), repeat, warmup, 2
    )
    sections.start("download_bfloat16")
    brain = download_runs(
        probe, lambda: probe_client.parameter_gradients(x, xent, "all", dtype="bfloat16"), repeat, warmup, 2
    )
    for run in download["runs"] + half["runs"] + brain["runs"]:
        run.pop("value", None)
    for run in when_ready["runs"]:
        run.pop("value", None)
    report["download"] = {
        "float32": download,
        "float32_when_ready": when_ready,
        "float16": half,
        "bfloat16": brain,
    }

    # Reduced-precision output: error against float32 on the cases that lost values, conversion speed.
    sections.start("precision")
    report["precision"] = precision_report(server.address, x, repeat)

    # Where the transfer time goes: the same conversion code, no network.
    sections.start("breakdown")
    report["download"]["breakdown"] = serialization_breakdown(ref_params, info.stream_chunk_bytes)
    del ref_params

    # Client memory: a child process that imports only the SDK.
    sections.start("client_memory")
    report["client_memory"] = run_child(["--_client-memory", server.address, "float32"])
    sections.stop()
    probe_client.close()
    plain_client.close()
    client.close()


def kserve_v2_input_gradient(
    address: str, client: layergrad.Client, x: np.ndarray, loss: Any, repeat: int, warmup: int
) -> dict[str, Any]:
    """layergrad.v1's input gradient (the SDK) against KServe v2 ModelInfer (FP32 prepared input,
    INT64 targets, output grad/input) for the same input, timed in pairs."""
    request = v2.ModelInferRequest(
        model_name="vgg16",
        inputs=[
            v2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape)),
            v2.ModelInferRequest.InferInputTensor(name="targets", datatype="INT64", shape=[len(x)]),
        ],
        outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="grad/input")],
        raw_input_contents=[x.astype("<f4").tobytes(), np.full(len(x), CLASS, "<i8").tobytes()],
    )
    request.parameters["loss_layer"].string_param = "fc8"
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        infer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

        def via_v2() -> np.ndarray:
            response = infer(request, timeout=600)
            return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(response.outputs[0].shape)

        timing = side_by_side(lambda: client.input_gradient(x, loss), via_v2, repeat, warmup)
    v1_s, v2_s = median(timing["a"]), median(timing["b"])
    return {
        "layergrad_v1_s": timing["a"],
        "kserve_v2_s": timing["b"],
        "layergrad_v1_median_s": v1_s,
        "kserve_v2_median_s": v2_s,
        "v2_over_v1": v2_s / v1_s,
        "bit_identical": bool(np.array_equal(timing["result_a"], timing["result_b"])),
        "pairs": len(timing["a"]),
    }


def case_entry(label: str, timing: dict[str, Any], max_diff: float) -> dict[str, Any]:
    ta, tb = timing["a"], timing["b"]
    return {
        "label": label,
        "in_process_s": ta,
        "service_s": tb,
        "in_process_median_s": median(ta),
        "service_median_s": median(tb),
        "ratio": median(tb) / median(ta),
        "pair_ratios": [b / a for a, b in zip(ta, tb, strict=True)],
        "pair_ratio_median": median([b / a for a, b in zip(ta, tb, strict=True)]),
        "other_cpus_per_pair": timing["other_cpus"],
        "pairs_set_aside": timing["set_aside"],
        "max_rel_diff": max_diff,
    }


# ---- report --------------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float, limit: float, met: bool, shown: str) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": bool(met), "shown": shown})

    ratio = report["cases"]["input_gradient"]["ratio"]
    add(
        "SDK input gradient within 3% of in-process (ratio <= 1.03)",
        ratio,
        1.03,
        ratio <= 1.03,
        f"{ratio:.3f}",
    )
    params = report["cases"]["parameter_gradients"]
    early = report["cases"].get("parameter_gradients_when_ready")
    before = (
        f"; tensors sent after the backward pass: {early['in_process_median_s']:.3f} s, "
        f"{early['in_process_median_s'] / params['in_process_median_s']:.2f}x"
        if early
        else ""
    )
    add(
        "all parameter gradients through the SDK within 1.10x of the in-process backward",
        params["ratio"],
        1.10,
        params["ratio"] <= 1.10,
        f"{params['ratio']:.3f} ({params['service_median_s']:.3f} s against "
        f"{params['in_process_median_s']:.3f} s{before})",
    )
    p50 = report["model_info"]["p50_s"]
    add("GetModelInfo p50 < 1 ms", p50, 1e-3, p50 < 1e-3, f"{p50 * 1e3:.3f} ms")
    rate = report["download"]["float32"]["transfer_bytes_per_s"]
    e2e = report["download"]["float32"]["end_to_end_bytes_per_s"]
    add(
        "parameter-gradient download >= 1.5 GB/s (after first message)",
        rate,
        1.5e9,
        rate >= 1.5e9,
        f"{rate / 1e9:.2f} GB/s (end to end incl. compute {e2e / 1e9:.3f} GB/s)",
    )
    mem = report.get("client_memory", {})
    if "peak_rss_bytes" in mem and mem.get("peak_rss_bytes"):
        factor = mem["peak_rss_bytes"] / mem["payload_bytes"]
        add(
            "client peak memory within 1.3x payload",
            factor,
            1.3,
            factor <= 1.3,
            f"{factor:.2f}x ({fmt_bytes(mem['peak_rss_bytes'])} peak for {fmt_bytes(mem['payload_bytes'])})",
        )
    else:
        add(
            "client peak memory within 1.3x payload",
            math.nan,
            1.3,
            False,
            f"not measured: {mem.get('error')}",
        )
    rates = {t["clients"]: t["requests_per_s"] for t in report["throughput"]}
    if "throughput_workers" in report:
        workers = {t["clients"]: t["requests_per_s"] for t in report["throughput_workers"]["rows"]}
        scale = workers[4] / rates[1]
        label = " ".join(report["throughput_workers"]["args"])
        ceiling = report.get("workers_ceiling", {})
        bound = (
            f" (two one-thread processes computing in-process at once: {ceiling['ratio']:.2f}x)"
            if "ratio" in ceiling
            else ""
        )
        add(f"4 clients on {label} >= 1.5x one worker's", scale, 1.5, scale >= 1.5, f"{scale:.2f}x{bound}")
        alone = report["throughput_workers"]["rows"][0]["latency_median_s"]
        slower = alone / report["throughput"][0]["latency_median_s"]
        name = f"1 client on {label}: latency <= 1.1x one worker's"
        add(name, slower, 1.1, slower <= 1.1, f"{slower:.2f}x")
    one = report["cases"]["input_gradient"]
    for batch in BATCHES:
        row = report["cases"].get(f"input_gradient_batch_{batch}")
        if row is None:
            continue
        for side in ("in_process", "service"):
            per_image = row[f"{side}_median_s"] / batch / one[f"{side}_median_s"]
            add(
                f"input gradient at batch {batch}, {side.replace('_', '-')}: time per image <= batch 1's",
                per_image,
                1.0,
                per_image <= 1.0,
                f"{per_image:.2f}x ({row[f'{side}_median_s'] / batch:.3f} s per image)",
            )
    if "precision" in report:
        out += precision_targets(report["precision"])
    return out


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"layergrad benchmark  {report['date']}",
        f"machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, "
        f"{(m.get('memory_total_bytes') or 0) / 2**30:.1f} GiB; python {m['python']}, "
        f"numpy {m['numpy']}, chainer {m.get('chainer', '?')}, grpcio {m['grpcio']}",
        f"BLAS: {blas_summary(m['blas'])}",
    ]
    if m["env"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in m["env"].items()))
    busy = report["background_cpus_whole_run"]
    if busy >= 0.2:
        lines.append(
            f"WARNING: other processes (or hypervisor steal) kept {busy:.2f} CPUs busy on average; "
            "timings and ratios are disturbed (see 'other load' notes)"
        )
    lines += [
        f"VGG16 224x224, batch 1; median of n timed pairs after {s['warmup']} warm-up; "
        "ratio = median service / median in-process; 'pairs' = range of per-pair ratios",
        "",
        f"{'case':<38}{'in-process':>12}{'service':>12}{'ratio':>8}  notes",
        "-" * 90,
    ]
    for c in report["cases"].values():
        pr = c["pair_ratios"]
        note = f"n={len(pr)}, pairs {min(pr):.2f}-{max(pr):.2f}, max rel diff {c['max_rel_diff']:.1e}"
        bg = max(c["other_cpus_per_pair"], default=0.0)
        if bg >= 0.05:
            note += f", other load <= {bg:.2f} CPU"
        if c["pairs_set_aside"]:
            note += f", {c['pairs_set_aside']} noisy pair(s) redone"
        if "bytes" in c:
            note += f", {fmt_bytes(c['bytes'])}"
        if "note" in c:
            note += f"; {c['note']}"
        lines.append(
            f"{c['label']:<38}{fmt_s(c['in_process_median_s']):>12}{fmt_s(c['service_median_s']):>12}"
            f"{c['ratio']:>8.3f}  {note}"
        )
    kv = report["kserve_v2"]
    lines.append(
        f"{'KServe v2 ModelInfer input gradient':<38}{'':>12}{fmt_s(kv['kserve_v2_median_s']):>12}{'':>8}  "
        f"v2/layergrad.v1 {kv['v2_over_v1']:.3f} (v1 {fmt_s(kv['layergrad_v1_median_s']).strip()}), "
        f"n={kv['pairs']}, bit-identical {kv['bit_identical']}"
    )
    k = report["cpu_kernels"]
    lines.append(
        f"{'stock Chainer (no layergrad kernels)':<38}{fmt_s(k['stock_median_s']):>12}{'':>20}  "
        f"layergrad kernels/stock {k['fast_over_stock']:.3f} ({fmt_s(k['fast_median_s']).strip()}), "
        f"n={k['pairs']}, bit-identical {k['bit_identical']}"
    )
    t = report["torch"]
    if "error" in t:
        lines.append(f"{'PyTorch CPU input gradient':<38}{t['error']}")
    else:
        lines.append(
            f"{'PyTorch ' + t['torch'] + ' CPU input gradient':<38}{fmt_s(t['median_s']):>12}{'':>20}  "
            f"chainer/torch {t['chainer_in_process_over_torch']:.2f}x (stock "
            f"{t['stock_chainer_over_torch']:.2f}x), "
            f"rel L2 diff vs chainer {t['rel_l2_diff_vs_chainer']:.1e}, {t['threads']} threads"
        )
    mi = report["model_info"]
    lines += [
        "",
        f"GetModelInfo ({mi['calls']} calls via SDK): p50 {mi['p50_s'] * 1e3:.3f} ms, "
        f"p99 {mi['p99_s'] * 1e3:.3f} ms",
        "",
        "input-gradient throughput (same total requests per row):",
    ]
    base = report["throughput"][0]["requests_per_s"]
    for t in report["throughput"]:
        lines.append(
            f"  {t['clients']} client(s): {t['requests']} requests in {t['wall_s']:.2f} s = "
            f"{t['requests_per_s']:.3f} req/s ({t['requests_per_s'] / base:.2f}x), "
            f"median latency {t['latency_median_s']:.2f} s"
            + _other_load(report, f"throughput_{t['clients']}")
        )
    if "throughput_workers" in report:
        lines.append(
            f"  with {' '.join(report['throughput_workers']['args'])} (ratios to one worker, 1 client):"
        )
        for t in report["throughput_workers"]["rows"]:
            lines.append(
                f"  {t['clients']} client(s): {t['requests']} requests in {t['wall_s']:.2f} s = "
                f"{t['requests_per_s']:.3f} req/s ({t['requests_per_s'] / base:.2f}x), "
                f"median latency {t['latency_median_s']:.2f} s"
                + _other_load(report, f"throughput_workers_{t['clients']}")
            )
    ceiling = report.get("workers_ceiling")
    if ceiling is not None:
        if "ratio" in ceiling:
            lines.append(
                "  ceiling, no service: in-process with the BLAS default (table above) "
                f"{1 / ceiling['alone_median_s']:.3f} calls/s; two 1-thread processes at once "
                f"{ceiling['pair_per_s']:.3f} calls/s "
                f"({ceiling['ratio']:.2f}x; medians {ceiling['alone_median_s']:.3f} s and "
                + " / ".join(f"{t:.3f}" for t in ceiling["pair_median_s"])
                + " s per call); the workers at 4 clients reached "
                + f"{ceiling['group_share']:.0%} of the pair's rate"
                + _other_load(report, "workers_ceiling")
            )
        else:
            lines.append(f"  ceiling not measured: {ceiling.get('error')}")
    lines += [
        "",
        "all-parameter-gradient download through the SDK (StreamGradients; float32: every tensor "
        "after the backward pass; 'when ready': the SDK's default, parameters sent as the backward "
        "pass finishes them, so 'after first message' includes most of the backward pass):",
    ]
    for dtype in ("float32", "float32_when_ready", "float16", "bfloat16"):
        d = report["download"].get(dtype)
        if d is None:
            continue
        section = {
            "float32": "parameter_gradients_after_backward",
            "float32_when_ready": "parameter_gradients",
        }
        lines.append(
            f"  {dtype.replace('_', ' ')}: {fmt_bytes(d['bytes'])} in {d['messages']} messages; "
            f"call {d['total_s_median']:.3f} s (first message {d['first_message_s_median']:.3f} s, "
            f"rest {d['after_first_message_s_median']:.3f} s); "
            f"{d['end_to_end_bytes_per_s'] / 1e9:.3f} GB/s end to end, "
            f"{d['transfer_bytes_per_s'] / 1e9:.2f} GB/s after first message"
            + _other_load(report, section.get(dtype, f"download_{dtype}"))
        )
    b = report["download"]["breakdown"]
    if "error" in b:
        lines.append(f"  breakdown: {b['error']}")
    else:
        lines.append(
            "  breakdown, same code without network: "
            f"server chunk+serialize {b['server_chunk_serialize_s']:.3f} s "
            f"({b['server_bytes_per_s'] / 1e9:.2f} GB/s), "
            f"client parse+assemble {b['client_parse_assemble_s']:.3f} s "
            f"({b['client_bytes_per_s'] / 1e9:.2f} GB/s), memcpy {b['memcpy_s']:.3f} s "
            f"({b['memcpy_bytes_per_s'] / 1e9:.2f} GB/s)"
        )
        if "generated_server_s" in b:
            lines.append(
                "  the same through the generated protobuf class (before the hand-built frames): "
                f"server {b['bytes'] / b['generated_server_s'] / 1e9:.2f} GB/s, "
                f"client {b['bytes'] / b['generated_client_s'] / 1e9:.2f} GB/s"
            )
    if "precision" in report:
        lines += ["", *precision_lines(report["precision"])]
    cm = report.get("client_memory", {})
    sm = report.get("server_memory", {})
    lines += ["", "peak memory:"]
    lines.append(
        f"  server: VmHWM {fmt_bytes(sm.get('VmHWM', 0))} (RSS when serving started "
        f"{fmt_bytes(report.get('server_rss_serving_bytes') or 0)}, now {fmt_bytes(sm.get('VmRSS', 0))})"
    )
    if "peak_rss_bytes" in cm:
        lines.append(
            f"  client (SDK-only child, one float32 all-parameter download): VmHWM "
            f"{fmt_bytes(cm['peak_rss_bytes'])}, RSS before call {fmt_bytes(cm['rss_connected_bytes'])}, "
            f"payload {fmt_bytes(cm['payload_bytes'])}"
        )
    else:
        lines.append(f"  client: {cm.get('error')}")
    lines += ["", "targets:"]
    for t in report["targets"]:
        lines.append(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['shown']}")
    lines.append("")
    lines.append(
        f"total runtime {report['total_runtime_s']:.0f} s"
        + (
            f" (after {report['waited_for_quiet_s']:.0f} s waiting for a quiet machine)"
            if "waited_for_quiet_s" in report
            else ""
        )
        + "; other processes kept "
        f"{report['background_cpus_whole_run']:.2f} of {m['usable_cpus']} CPUs busy on average "
        f"(load average at start {report['loadavg_start']}, at end {report['loadavg_end']})"
    )
    return "\n".join(lines)


def _other_load(report: dict[str, Any], section: str) -> str:
    bg = report["background_cpus"].get(section)
    return f", other load {bg:.2f} CPU" if bg is not None and bg >= 0.05 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions per case (default 5)")
    parser.add_argument("--quick", action="store_true", help="fast smoke run: 1 repetition, fewer calls")
    parser.add_argument(
        "--input-repeat",
        type=int,
        default=None,
        help="timed repetitions of the input-gradient case, whose target is 3%% (default 3 x --repeat)",
    )
    parser.add_argument("--requests", type=int, default=None, help="input-gradient calls per throughput row")
    parser.add_argument("--model-info-calls", type=int, default=None)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for other processes to leave the CPUs idle (default: do not wait)",
    )
    parser.add_argument(
        "--precision-only",
        action="store_true",
        help="only the reduced-precision rows (error against float32, conversion speed)",
    )
    parser.add_argument("--_client-memory", nargs=2, metavar=("ADDRESS", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--_torch", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--_compute-rate", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._compute_rate:
        weights_path, input_path, calls = args._compute_rate
        return compute_rate_child(weights_path, input_path, int(calls))
    if args._client_memory:
        return client_memory_child(*args._client_memory)
    if args._torch:
        weights_path, input_path, out_path, repeat, warmup = args._torch
        return torch_child(weights_path, input_path, out_path, int(repeat), int(warmup))
    if args.repeat is None:
        args.repeat = 1 if args.quick else 5
    if args.input_repeat is None:
        args.input_repeat = 3 * args.repeat
    if args.requests is None:
        args.requests = 4 if args.quick else 16
    if args.model_info_calls is None:
        args.model_info_calls = 100 if args.quick else 1000
    if args.repeat < 1 or args.input_repeat < 1 or args.requests < 1 or args.model_info_calls < 1:
        parser.error("--repeat, --requests and --model-info-calls must be positive")
    if args.precision_only:
        return precision_only(args)

    report = run(args)
    report["targets"] = targets(report)
    # The same-host shared-memory path (scripts/bench_shm.py), on a --shared-memory server of its own.
    import bench_shm

    log("shared-memory download (scripts/bench_shm.py)")
    try:
        report["shared_memory"] = bench_shm.measure(args.repeat)
    except Exception as error:  # the rest of the report still stands
        report["shared_memory"] = {"error": f"{type(error).__name__}: {error}"}
    report["targets"].append(bench_shm.target(report["shared_memory"]))
    # Dynamic batching (scripts/bench_batching.py): concurrent callers merged against one at a time.
    import bench_batching

    log("dynamic batching (scripts/bench_batching.py)")
    try:
        report["dynamic_batching"] = bench_batching.measure(1 if args.quick else args.repeat)
    except Exception as error:
        report["dynamic_batching"] = {"error": f"{type(error).__name__}: {error}"}
    report["targets"].append(bench_batching.target(report["dynamic_batching"]))
    # Per-call overhead (scripts/bench_overhead.py): wall time minus compute, beside a gRPC echo.
    import bench_overhead

    log("per-call overhead (scripts/bench_overhead.py)")
    try:
        report["overhead"] = bench_overhead.measure(5 if args.quick else 4 * args.repeat)
    except Exception as error:
        report["overhead"] = {"error": f"{type(error).__name__}: {error}"}
    report["targets"].extend(bench_overhead.targets(report["overhead"]))
    head, sep, tail = render(report).partition("\ntargets:\n")
    sections = [*bench_shm.report_lines(report["shared_memory"])]
    sections += bench_batching.report_lines(report["dynamic_batching"])
    sections += bench_overhead.report_lines(report["overhead"])
    text = head + "\n" + "\n".join(sections) + "\n" + sep + tail
    report["table"] = text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite(report), indent=2, default=_json_default, allow_nan=False) + "\n")
    print(text)
    print(f"\nresults written to {args.out}")
    return 0


def _finite(value: Any) -> Any:
    """The report with NaN and infinities as null, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Iterator):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
