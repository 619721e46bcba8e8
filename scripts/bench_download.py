"""Focused benchmark of the all-parameter-gradient download (StreamGradients, BACKWARD).

Starts one server per variant (the working tree, another copy of the code given
with ``--baseline DIR`` or ``--tree NAME=DIR``, folders holding ``client/`` and
``server/``, and the working tree again per ``--server-args``), then alternates
rounds between them so that all see the same machine load. Each round runs a
child process that imports only that variant's SDK and makes ``--calls`` timed
float32 and float16 downloads after one warm-up call with the same request (so a
Client that remembers result layouts has seen one); with ``--reuse``, also
float32 downloads into the previous call's arrays (``out=``, where the variant's
SDK has it). Per download it reports the time to the first stream message, the
time after it (transport + assembly: the target's measure), the CPU seconds the
client process and the server process used after the first message (``/proc``:
less sensitive to other load than wall time), how many CPUs other processes kept
busy meanwhile, and the client's peak RSS.

``--raw`` adds the ceiling of plain gRPC Python in the same run: a bare server
(no interceptors, no protobuf, no admission) streams the same 32 tensors from
memory in 1 MiB messages of a 16-byte header and the data, and a bare client
copies each message into a fresh ``np.empty`` array per tensor. ``raw`` uses
gRPC's default channel options, ``raw-sdk-options`` the SDK's
``DEFAULT_CHANNEL_OPTIONS`` (of the working tree). Prints medians per variant and
their ratio to the baseline, also paired by round (the median over rounds of the
ratio of the two variants' medians in that round), which cancels out most of the
load that changes from round to round::

    python scripts/bench_download.py --baseline /path/to/old/tree --rounds 3 --raw --reuse
    python scripts/bench_download.py --server-args "" --server-args "OPENBLAS_THREAD_TIMEOUT=4"
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLASS = 281
TICKS = os.sysconf("SC_CLK_TCK")
RAW_METHOD = "/bench.Raw/Stream"
RAW_CHUNK = 1 << 20
RAW_HEADER = struct.Struct("<IQI")  # tensor index, byte offset, data length
# The 32 VGG16 parameters in model order: (name, shape).
VGG16_PARAMETERS: list[tuple[str, tuple[int, ...]]] = [
    (f"{layer}/{kind}", shape if kind == "W" else shape[:1])
    for layer, shape in [
        ("conv1_1", (64, 3, 3, 3)),
        ("conv1_2", (64, 64, 3, 3)),
        ("conv2_1", (128, 64, 3, 3)),
        ("conv2_2", (128, 128, 3, 3)),
        ("conv3_1", (256, 128, 3, 3)),
        ("conv3_2", (256, 256, 3, 3)),
        ("conv3_3", (256, 256, 3, 3)),
        ("conv4_1", (512, 256, 3, 3)),
        ("conv4_2", (512, 512, 3, 3)),
        ("conv4_3", (512, 512, 3, 3)),
        ("conv5_1", (512, 512, 3, 3)),
        ("conv5_2", (512, 512, 3, 3)),
        ("conv5_3", (512, 512, 3, 3)),
        ("fc6", (4096, 25088)),
        ("fc7", (4096, 4096)),
        ("fc8", (1000, 4096)),
    ]
    for kind in ("W", "b")
]


def proc_status() -> dict[str, int]:
    """This process's /proc status sizes in bytes."""
    values = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def own_cpu() -> float:
    """User + system CPU seconds of this process so far (finer than /proc ticks)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (not idle or iowait), from /proc/stat."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICKS


class Meter:
    """Samples wall time and the CPU time of this process, the server and the machine."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def sample(self) -> tuple[float, float, float, float]:
        return time.perf_counter(), own_cpu(), process_cpu(self.server_pid), machine_busy()

    @staticmethod
    def window(start: tuple[float, float, float, float], end: tuple[float, float, float, float]) -> dict:
        """Seconds, client and server CPU seconds, and other processes' mean busy CPUs between two samples."""
        wall, client, server, busy = (b - a for a, b in zip(start, end, strict=True))
        other = max(busy - client - server, 0.0) / wall if wall > 0 else 0.0
        return {"after_s": wall, "client_cpu_s": client, "server_cpu_s": server, "other_cpus": other}


def child(address: str, server_pid: int, calls: int, reuse: bool) -> int:
    """Run as a child: downloads through the SDK of this process's PYTHONPATH; prints JSON."""
    import layergrad
    import numpy as np

    meter = Meter(server_pid)
    x = np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32) * 50
    loss = layergrad.SoftmaxCrossEntropy([CLASS])
    with layergrad.Client(address, timeout=600) as client:
        client.model_info()
        stub = client._stub
        original = stub.StreamGradients
        probe: dict[str, Any] = {}

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            call = original(*args, **kwargs)

            def iterate() -> Iterator[Any]:
                for item in call:
                    if "first" not in probe:
                        probe["first"] = meter.sample()
                    probe["messages"] = probe.get("messages", 0) + 1
                    yield item

            class Stream:
                def __iter__(self) -> Iterator[Any]:
                    return iterate()

                def cancel(self) -> bool:
                    return call.cancel()

            return Stream()

        stub.StreamGradients = wrapped

        def timed(download: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
            probe.clear()
            start = time.perf_counter()
            grads = download()
            end = meter.sample()
            run = {
                "total_s": end[0] - start,
                "first_s": probe["first"][0] - start,
                "messages": probe["messages"],
                "bytes": sum(g.nbytes for g in grads.values()),
                **Meter.window(probe["first"], end),
            }
            return grads, run

        out: dict[str, Any] = {"rss_before": proc_status()["VmRSS"]}
        for dtype in ("float32", "float16"):
            runs = []
            for i in range(calls + 1):
                grads, run = timed(lambda: client.parameter_gradients(x, loss, "all", dtype=dtype))  # noqa: B023
                del grads
                if i:
                    runs.append(run)
            out[dtype] = runs
            if dtype == "float32":
                out["peak_rss_float32"] = proc_status()["VmHWM"]
        if reuse and "out" in inspect.signature(client.parameter_gradients).parameters:
            grads = client.parameter_gradients(x, loss, "all")
            runs = []
            for _ in range(calls):
                grads, run = timed(lambda: client.parameter_gradients(x, loss, "all", out=grads))  # noqa: B023
                runs.append(run)
            out["float32-reuse"] = runs
    print(json.dumps(out))
    return 0


def raw_server() -> int:
    """Run as a child: a bare gRPC server streaming the VGG16 parameter shapes; prints its port."""
    from concurrent import futures

    import grpc
    import numpy as np

    rng = np.random.default_rng(0)
    tensors = [
        memoryview(rng.standard_normal(shape, dtype=np.float32).reshape(-1).view(np.uint8))
        for _, shape in VGG16_PARAMETERS
    ]

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for index, data in enumerate(tensors):
            for offset in range(0, len(data), RAW_CHUNK):
                piece = data[offset : offset + RAW_CHUNK]
                yield b"".join((RAW_HEADER.pack(index, offset, len(piece)), piece))

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_send_message_length", 64 << 20)],
    )
    handler = grpc.method_handlers_generic_handler(
        "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    return 0


def raw_child(address: str, server_pid: int, calls: int, sdk_options: bool) -> int:
    """Run as a child: downloads from ``raw_server`` with a bare gRPC client; prints JSON."""
    import grpc
    import numpy as np

    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20)]
    if sdk_options:
        from layergrad.client import DEFAULT_CHANNEL_OPTIONS

        options = [*DEFAULT_CHANNEL_OPTIONS]
    meter = Meter(server_pid)
    shapes = [shape for _, shape in VGG16_PARAMETERS]
    runs = []
    with grpc.insecure_channel(address, options=options) as channel:
        method = channel.unary_stream(RAW_METHOD)
        for i in range(calls + 1):
            start = time.perf_counter()
            first = None
            messages = 0
            arrays: list[np.ndarray] = []
            flat = np.empty(0, np.uint8)
            for message in method(b"", timeout=600):
                if first is None:
                    first = meter.sample()
                messages += 1
                index, offset, length = RAW_HEADER.unpack_from(message)
                if index == len(arrays):
                    arrays.append(np.empty(shapes[index], np.float32))
                    flat = arrays[-1].reshape(-1).view(np.uint8)
                flat[offset : offset + length] = np.frombuffer(message, np.uint8, length, RAW_HEADER.size)
            end = meter.sample()
            if i:
                runs.append(
                    {
                        "total_s": end[0] - start,
                        "first_s": first[0] - start,
                        "messages": messages,
                        "bytes": sum(a.nbytes for a in arrays),
                        **Meter.window(first, end),
                    }
                )
            del arrays, flat
    print(json.dumps({"float32": runs, "peak_rss_float32": proc_status()["VmHWM"]}))
    return 0


class RawServer:
    """``raw_server`` in a child process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--_raw_server"], env=env, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.address = f"127.0.0.1:{int(self.process.stdout.readline())}"

    def wait_serving(self) -> None:
        pass

    def terminate(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class Variant:
    """One server (a tree with its flags, or the raw server) and the samples of its children."""

    def __init__(
        self,
        name: str,
        tree: pathlib.Path,
        server_args: list[str] | None,
        logs: pathlib.Path,
        *,
        raw: str | None = None,
        reuse: bool = False,
        server_env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.raw = raw
        self.reuse = reuse
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tree / "client"), str(tree / "server")]),
        }
        server_env = {**self.env, **(server_env or {})}
        self.server: Any
        if raw is not None:
            self.server = RawServer(server_env)
        else:
            sys.path.insert(0, str(ROOT / "server"))
            from layergrad_server.launch import ServerProcess

            self.server = ServerProcess(server_args or [], logs / f"{name}.log", env=server_env)
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.rounds: dict[str, list[list[dict[str, Any]]]] = {}
        self.peaks: list[int] = []

    def round(self, calls: int) -> None:
        pid = str(self.server.process.pid)
        if self.raw is not None:
            args = ["--_raw_child", self.server.address, pid, str(calls), self.raw]
        else:
            args = ["--_child", self.server.address, pid, str(calls), "1" if self.reuse else "0"]
        done = subprocess.run(
            [sys.executable, __file__, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.name} child failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for mode in ("float32", "float16", "float32-reuse"):
            if mode in result:
                self.runs.setdefault(mode, []).extend(result[mode])
                self.rounds.setdefault(mode, []).append(result[mode])
        self.peaks.append(result["peak_rss_float32"])

    def paired(self, other: Variant, mode: str, key: str) -> float:
        """Median over rounds of other's round median of ``key`` over this variant's (same round)."""
        return statistics.median(
            statistics.median(r[key] for r in theirs) / statistics.median(r[key] for r in ours)
            for ours, theirs in zip(self.rounds[mode], other.rounds[mode], strict=True)
        )

    def summary(self, mode: str) -> dict[str, float]:
        runs = self.runs[mode]
        nbytes = runs[0]["bytes"]

        def median(key: str) -> float:
            return statistics.median(r[key] for r in runs)

        after, total = median("after_s"), median("total_s")
        return {
            "bytes": nbytes,
            "messages": runs[0]["messages"],
            "first_s": median("first_s"),
            "after_s": after,
            "total_s": total,
            "after_gbps": nbytes / after / 1e9,
            "end_to_end_gbps": nbytes / total / 1e9,
            "client_cpu_s": median("client_cpu_s"),
            "server_cpu_s": median("server_cpu_s"),
            "other_cpus": median("other_cpus"),
            "min_gbps": nbytes / max(r["after_s"] for r in runs) / 1e9,
            "max_gbps": nbytes / min(r["after_s"] for r in runs) / 1e9,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=pathlib.Path, help="another tree (with client/ and server/)")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="one more tree to compare (with client/ and server/); repeatable",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per dtype per round")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument(
        "--server-args",
        action="append",
        help="extra flags for a server of the working tree, after any KEY=VALUE words that set its "
        "environment; repeat to compare several (default: none)",
    )
    parser.add_argument("--raw", action="store_true", help="add the bare gRPC ceiling (two variants)")
    parser.add_argument("--reuse", action="store_true", help="also time float32 downloads with out=")
    parser.add_argument("--json", type=pathlib.Path, help="write every sample here")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_raw_child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_raw_server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        address, pid, calls, reuse = args._child
        return child(address, int(pid), int(calls), reuse == "1")
    if args._raw_child:
        address, pid, calls, options = args._raw_child
        return raw_child(address, int(pid), int(calls), options == "sdk")
    if args._raw_server:
        return raw_server()
    logs = pathlib.Path(tempfile.mkdtemp(prefix="bench-download-"))
    variants: list[Variant] = []
    try:
        if args.baseline:
            variants.append(
                Variant("baseline", args.baseline, ["--weights", args.weights], logs, reuse=args.reuse)
            )
        for spec in args.tree:
            name, _, tree = spec.partition("=")
            server_args = ["--weights", args.weights]
            variants.append(Variant(name, pathlib.Path(tree), server_args, logs, reuse=args.reuse))
        for i, extra in enumerate(args.server_args or [""]):
            name = "current" if not args.server_args or len(args.server_args) == 1 else f"current{i + 1}"
            if extra:
                print(f"{name}: {extra}")
            words = extra.split()
            env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
            flags = [w for w in words if not ("=" in w and not w.startswith("-"))]
            server_args = ["--weights", args.weights, *flags]
            variants.append(Variant(name, ROOT, server_args, logs, reuse=args.reuse, server_env=env))
        if args.raw:
            variants.append(Variant("raw", ROOT, None, logs, raw="default"))
            variants.append(Variant("raw-sdk-options", ROOT, None, logs, raw="sdk"))
        for variant in variants:
            variant.server.wait_serving()
        for i in range(args.rounds):
            for variant in variants:
                print(f"round {i + 1}/{args.rounds}: {variant.name}", file=sys.stderr, flush=True)
                variant.round(args.calls)
    finally:
        for variant in variants:
            variant.server.terminate()
    print(
        f"all-parameter gradients (BACKWARD), {args.rounds} rounds x {args.calls} calls after a warm-up "
        "call, medians; "
        "CPU seconds after the first message; other = CPUs kept busy by other processes"
    )
    rows = {}
    for variant in variants:
        for mode in variant.runs:
            s = variant.summary(mode)
            rows[(variant.name, mode)] = s
            print(
                f"  {variant.name:15s} {mode:13s}: {s['bytes'] / 1e6:.1f} MB in {s['messages']} messages; "
                f"first message {s['first_s']:.3f} s, rest {s['after_s']:.3f} s = "
                f"{s['after_gbps']:.2f} GB/s after first message ({s['min_gbps']:.2f}-{s['max_gbps']:.2f}), "
                f"{s['end_to_end_gbps']:.3f} GB/s end to end; CPU client {s['client_cpu_s']:.3f} s, "
                f"server {s['server_cpu_s']:.3f} s; other {s['other_cpus']:.2f}"
            )
        payload = rows[(variant.name, "float32")]["bytes"]
        peak = max(variant.peaks)
        print(
            f"  {variant.name:15s} client VmHWM after the float32 calls: {peak / 1e6:.1f} MB = "
            f"{peak / payload:.2f}x payload"
        )
    if args.baseline:
        print("  vs baseline (paired: median over rounds of the ratio of round medians)")
        base = variants[0]
        for variant in variants[1:]:
            for mode in variant.runs:
                old, new = rows.get(("baseline", mode)), rows[(variant.name, mode)]
                if old is None:
                    continue
                print(
                    f"  {variant.name} {mode}: after-first-message "
                    f"{new['after_gbps'] / old['after_gbps']:.2f}x "
                    f"(paired {variant.paired(base, mode, 'after_s'):.2f}x), "
                    f"end to end {old['total_s'] / new['total_s']:.2f}x "
                    f"(paired {variant.paired(base, mode, 'total_s'):.2f}x) faster than baseline; client CPU "
                    f"{new['client_cpu_s'] / old['client_cpu_s']:.2f}x, server CPU "
                    f"{new['server_cpu_s'] / old['server_cpu_s']:.2f}x of baseline"
                )
    if args.json:
        samples = {variant.name: {"runs": variant.runs, "peaks": variant.peaks} for variant in variants}
        args.json.write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
