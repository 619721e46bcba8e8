"""Focused benchmark of the all-parameter-gradient download (StreamGradients, BACKWARD).

Starts one server per variant (the working tree, and optionally another copy of
the code given with ``--baseline DIR``, a folder holding ``client/`` and
``server/``), then alternates rounds between them so that both see the same
machine load. Each round runs a child process that imports only that variant's
SDK and makes ``--calls`` timed float32 and float16 downloads after one warm-up;
it reports the time to the first stream message, the time after it (transport +
assembly) and its peak RSS. Prints medians per variant and their ratio::

    python scripts/bench_download.py --baseline /path/to/old/tree --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLASS = 281


def proc_status() -> dict[str, int]:
    values = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def child(address: str, calls: int) -> int:
    """Run as a child: downloads through the SDK of this process's PYTHONPATH; prints JSON."""
    import layergrad
    import numpy as np

    x = np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32) * 50
    loss = layergrad.SoftmaxCrossEntropy([CLASS])
    with layergrad.Client(address, timeout=600) as client:
        client.model_info()
        stub = client._stub
        original = stub.StreamGradients
        probe: dict[str, Any] = {}

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            call = original(*args, **kwargs)

            def iterate() -> Any:
                for item in call:
                    probe.setdefault("first", time.perf_counter())
                    probe["messages"] = probe.get("messages", 0) + 1
                    yield item

            class Stream:
                def __iter__(self) -> Any:
                    return iterate()

                def cancel(self) -> bool:
                    return call.cancel()

            return Stream()

        stub.StreamGradients = wrapped
        out: dict[str, Any] = {"rss_before": proc_status()["VmRSS"]}
        for dtype in ("float32", "float16"):
            runs = []
            for i in range(calls + 1):
                probe.clear()
                start = time.perf_counter()
                grads = client.parameter_gradients(x, loss, "all", dtype=dtype)
                end = time.perf_counter()
                nbytes = sum(g.nbytes for g in grads.values())
                del grads
                if i:
                    runs.append(
                        {
                            "total_s": end - start,
                            "first_s": probe["first"] - start,
                            "after_s": end - probe["first"],
                            "messages": probe["messages"],
                            "bytes": nbytes,
                        }
                    )
            out[dtype] = runs
            if dtype == "float32":
                out["peak_rss_float32"] = proc_status()["VmHWM"]
    print(json.dumps(out))
    return 0


class Variant:
    def __init__(self, name: str, tree: pathlib.Path, server_args: list[str], logs: pathlib.Path) -> None:
        self.name = name
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tree / "client"), str(tree / "server")]),
        }
        sys.path.insert(0, str(ROOT / "server"))
        from layergrad_server.launch import ServerProcess

        self.server = ServerProcess(server_args, logs / f"{name}.log", env=self.env)
        self.runs: dict[str, list[dict[str, Any]]] = {"float32": [], "float16": []}
        self.peaks: list[int] = []

    def round(self, calls: int) -> None:
        done = subprocess.run(
            [sys.executable, __file__, "--_child", self.server.address, str(calls)],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.name} child failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for dtype in self.runs:
            self.runs[dtype].extend(result[dtype])
        self.peaks.append(result["peak_rss_float32"])

    def summary(self, dtype: str) -> dict[str, float]:
        runs = self.runs[dtype]
        nbytes = runs[0]["bytes"]
        after = statistics.median(r["after_s"] for r in runs)
        total = statistics.median(r["total_s"] for r in runs)
        return {
            "bytes": nbytes,
            "messages": runs[0]["messages"],
            "first_s": statistics.median(r["first_s"] for r in runs),
            "after_s": after,
            "total_s": total,
            "after_gbps": nbytes / after / 1e9,
            "end_to_end_gbps": nbytes / total / 1e9,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=pathlib.Path, help="another tree (with client/ and server/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per dtype per round")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument(
        "--server-args",
        action="append",
        help="extra flags for a server of the working tree; repeat to compare several (default: none)",
    )
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        return child(args._child[0], int(args._child[1]))
    logs = pathlib.Path(tempfile.mkdtemp(prefix="bench-download-"))
    variants = []
    try:
        if args.baseline:
            variants.append(Variant("baseline", args.baseline, ["--weights", args.weights], logs))
        for i, extra in enumerate(args.server_args or [""]):
            name = "current" if not args.server_args or len(args.server_args) == 1 else f"current{i + 1}"
            if extra:
                print(f"{name}: {extra}")
            variants.append(Variant(name, ROOT, ["--weights", args.weights, *extra.split()], logs))
        for variant in variants:
            variant.server.wait_serving()
        for i in range(args.rounds):
            for variant in variants:
                print(f"round {i + 1}/{args.rounds}: {variant.name}", file=sys.stderr, flush=True)
                variant.round(args.calls)
    finally:
        for variant in variants:
            variant.server.terminate()
    print(f"all-parameter gradients (BACKWARD), {args.rounds} rounds x {args.calls} calls, medians")
    rows = {}
    for variant in variants:
        for dtype in ("float32", "float16"):
            s = variant.summary(dtype)
            rows[(variant.name, dtype)] = s
            print(
                f"  {variant.name:8s} {dtype}: {s['bytes'] / 1e6:.1f} MB in {s['messages']} messages; "
                f"first message {s['first_s']:.3f} s, rest {s['after_s']:.3f} s = "
                f"{s['after_gbps']:.2f} GB/s after first message, {s['end_to_end_gbps']:.3f} GB/s end to end"
            )
        payload = rows[(variant.name, "float32")]["bytes"]
        peak = max(variant.peaks)
        print(
            f"  {variant.name:8s} client VmHWM after the float32 calls: {peak / 1e6:.1f} MB = "
            f"{peak / payload:.2f}x payload"
        )
    if args.baseline:
        for variant in variants[1:]:
            for dtype in ("float32", "float16"):
                old, new = rows[("baseline", dtype)], rows[(variant.name, dtype)]
                print(
                    f"  {variant.name} {dtype}: after-first-message "
                    f"{new['after_gbps'] / old['after_gbps']:.2f}x, "
                    f"end to end {old['total_s'] / new['total_s']:.2f}x faster than baseline"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
