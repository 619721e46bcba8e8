"""`make loadtest`: N clients call one server for T seconds, on loopback; prints what came back.

Starts its own layergrad-server (small queue by default, so the server is overloaded on purpose),
runs N client threads sending cheap gradient calls (ClassScore on fc8, gradient of fc8/b, one
prepared input) with SDK retries off, so that every refusal is counted, while one more thread
checks health every 50 ms. Prints requests sent, each final status counted, p50/p99 latency,
health-check p99, server RSS before and after, and whether every request sent was accounted for.
Exits 1 if any status other than OK or RESOURCE_EXHAUSTED came back, or a request went missing.

    make loadtest                                  # 8 clients, 20 s, queue 2
    make loadtest LOADTEST_ARGS="--clients 16 --seconds 60 --max-queue 4"

``--compare-workers`` measures throughput instead: 1, 2 and 4 clients (each its own
``layergrad.Client``, so its own connection, sending input-gradient calls back to back) against
a default server and against ``--workers 2`` (and, with ``--connection-dispatch``, against
``--workers 2 --worker-dispatch connection``, where each call stays on the worker its connection
landed on), each layout started afresh ``--starts`` times, in alternating order. It prints
requests/s and median latency per row, how the compute calls arrived at and were spread over the
workers, the CPUs other processes kept busy meanwhile (a row is measured again, up to
``--attempts`` times, while that exceeds ``--max-other-cpus``; ``--wait-quiet S`` first waits up to
S seconds for a quiet machine), then medians over the starts::

    .venv/bin/python scripts/loadtest.py --compare-workers --starts 5 --requests 4
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import bench  # its CPU accounting and throughput rows
import grpc
import layergrad
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from layergrad_server.launch import ServerProcess


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.1f} ms" if values else "-"


# ---- --compare-workers ------------------------------------------------------------------------

DISPATCH_LINE = re.compile(
    r"worker (\d+) dispatch: (\d+) compute call\(s\) arrived on the port, (\d+) kept, (\d+) handed to a "
    r"sibling, (\d+) computed here after a sibling could not be reached; (\d+) computed for siblings"
)


def throughput_row(server: ServerProcess, clients: int, requests: int, image: np.ndarray) -> dict[str, Any]:
    """``clients`` SDK clients, each sending one warm-up call and then ``requests`` timed
    input-gradient calls back to back (``bench.throughput``), and how many CPUs other
    processes kept busy meanwhile (``bench.CpuMeter``, the server's workers counted as its own)."""
    bench.throughput(server.address, image, clients, clients)
    meter = bench.CpuMeter(server.process.pid)
    begin = meter.snapshot()
    row = bench.throughput(server.address, image, clients, clients * requests)
    row["other_cpus"] = meter.other_cpus(begin, meter.snapshot())
    return row


def quiet_row(server: ServerProcess, clients: int, args: argparse.Namespace, image: np.ndarray) -> dict:
    """A throughput row, measured again (up to ``--attempts`` times in all) while other processes
    kept more than ``--max-other-cpus`` CPUs busy; the quietest attempt."""
    rows = []
    for _ in range(args.attempts):
        if args.wait_quiet > 0:
            bench.wait_quiet(bench.CpuMeter(server.process.pid), args.wait_quiet, args.max_other_cpus)
        rows.append(throughput_row(server, clients, args.requests, image))
        if rows[-1]["other_cpus"] <= args.max_other_cpus:
            break
    return min(rows, key=lambda row: row["other_cpus"])


def dispatch_summary(log: str) -> str:
    """How the compute calls arrived at the workers and where they went, from their stop lines."""
    rows = sorted((int(m[0]), *map(int, m[1:])) for m in DISPATCH_LINE.findall(log))
    if not rows:
        return ""
    arrived = "/".join(str(r[1]) for r in rows)
    computed = "/".join(str(r[2] + r[5] + r[4]) for r in rows)
    handed_on = sum(r[3] - r[4] for r in rows)
    return f"calls arrived per worker {arrived}, computed {computed}, {handed_on} handed on"


def compare_workers(args: argparse.Namespace) -> int:
    layouts: list[tuple[str, list[str]]] = [("1 worker (default)", []), ("--workers 2", ["--workers", "2"])]
    if args.connection_dispatch:
        flags = ["--workers", "2", "--worker-dispatch", "connection"]
        layouts.append((" ".join(flags), flags))
    for extra in args.layout:
        layouts.append((extra, extra.split()))
    tmp = Path(tempfile.mkdtemp(prefix="layergrad-compare-"))
    image = np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32)
    results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    print(f"{args.starts} start(s) of each layout, {args.requests} calls per client per row (logs: {tmp})")
    for start in range(args.starts):
        order = layouts if start % 2 == 0 else layouts[::-1]
        for name, flags in order:
            log = tmp / f"{len(list(tmp.iterdir()))}.log"
            with ServerProcess(["--weights", args.weights, *flags], log) as server:
                server.wait_serving(300)
                while "--workers" in flags and "workers serving" not in server.log():
                    time.sleep(0.2)
                rows = [quiet_row(server, c, args, image) for c in (1, 2, 4)]
                server.terminate()
                spread = dispatch_summary(server.log())
            for row in rows:
                results[name].append(row)
            print(
                f"start {start + 1} {name:<42} "
                + "  ".join(
                    f"{r['clients']}c {r['requests_per_s']:.2f} req/s p50 {r['latency_median_s']:.2f}s"
                    f" (others {r['other_cpus']:.2f} CPU)"
                    for r in rows
                )
                + (f"; {spread}" if spread else ""),
                flush=True,
            )

    def medians(name: str, clients: int) -> tuple[float, float, float, float]:
        rows = [r for r in results[name] if r["clients"] == clients]
        rates = [r["requests_per_s"] for r in rows]
        latency = statistics.median(r["latency_median_s"] for r in rows)
        return statistics.median(rates), min(rates), max(rates), latency

    base_name = layouts[0][0]
    print(f"\nmedians over {args.starts} start(s); ratios to {base_name} with the same clients:")
    for name, _ in layouts:
        for clients in (1, 2, 4):
            rate, low, high, latency = medians(name, clients)
            ratio = rate / medians(base_name, clients)[0]
            print(
                f"  {name:<42} {clients} client(s): {rate:.2f} req/s (range {low:.2f}-{high:.2f}), "
                f"{ratio:.2f}x, median latency {latency:.2f} s"
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, choices=range(1, 65), metavar="1..64")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-queue", type=int, default=2)
    parser.add_argument("--compute-slots", type=int, default=1)
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each call")
    parser.add_argument(
        "--honour-retry-after",
        action="store_true",
        help="refused clients wait the server's retry hint (default: they retry at once, the worst case)",
    )
    parser.add_argument(
        "--compare-workers",
        action="store_true",
        help="measure throughput of a default server against --workers 2 instead (see above)",
    )
    parser.add_argument("--starts", type=int, default=5, help="--compare-workers: fresh starts per layout")
    parser.add_argument("--requests", type=int, default=4, help="--compare-workers: calls per client per row")
    parser.add_argument(
        "--max-other-cpus",
        type=float,
        default=0.3,
        help="--compare-workers: measure a row again while other processes used more CPUs than this",
    )
    parser.add_argument("--attempts", type=int, default=3, help="--compare-workers: tries per row at most")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="--compare-workers: before each row, wait up to this many seconds for the machine to be "
        "quiet (busy CPUs below --max-other-cpus)",
    )
    parser.add_argument(
        "--connection-dispatch",
        action="store_true",
        help="--compare-workers: also --workers 2 --worker-dispatch connection",
    )
    parser.add_argument(
        "--layout",
        action="append",
        default=[],
        help="--compare-workers: one more layout, its server flags in one string (repeatable)",
    )
    args = parser.parse_args()
    if args.compare_workers:
        return compare_workers(args)
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds must be within 1..600")

    log = Path(tempfile.mkdtemp(prefix="layergrad-loadtest-")) / "server.log"
    server_args = ["--weights", args.weights, "--max-queue", str(args.max_queue)]
    server_args += ["--compute-slots", str(args.compute_slots)]
    print(f"starting layergrad-server {' '.join(server_args)} (log: {log})")
    with ServerProcess(server_args, log) as server:
        server.wait_serving()
        pid = server.process.pid
        image = np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32)
        loss = layergrad.ClassScore("fc8", [7])
        with layergrad.Client(server.address, timeout=args.timeout) as warm:
            warm.gradients([image], loss, parameters=["fc8/b"])
        rss_before = rss_mib(pid)

        lock = threading.Lock()
        sent = 0
        statuses: collections.Counter[str] = collections.Counter()
        latencies: dict[str, list[float]] = collections.defaultdict(list)
        health_latencies: list[float] = []
        health_failures = 0
        end = time.monotonic() + args.seconds

        def client_loop() -> None:
            nonlocal sent
            with layergrad.Client(server.address, timeout=args.timeout, retry=False) as client:
                while time.monotonic() < end:
                    with lock:
                        sent += 1
                    started = time.monotonic()
                    try:
                        client.gradients([image], loss, parameters=["fc8/b"])
                        status = "OK"
                    except layergrad.LayergradError as error:
                        status = error.code.name if error.code is not None else type(error).__name__
                        hint = error.retry_after
                    else:
                        hint = None
                    elapsed = time.monotonic() - started
                    with lock:
                        statuses[status] += 1
                        latencies[status].append(elapsed)
                    if args.honour_retry_after and hint:
                        time.sleep(min(hint, max(end - time.monotonic(), 0)))

        def health_loop() -> None:
            nonlocal health_failures
            with grpc.insecure_channel(server.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while time.monotonic() < end:
                    started = time.monotonic()
                    try:
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                        health_latencies.append(time.monotonic() - started)
                    except grpc.RpcError:
                        health_failures += 1
                    time.sleep(0.05)

        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        threads.append(threading.Thread(target=health_loop))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
        rss_after = rss_mib(pid)
        exit_code = server.terminate()

    accounted = sum(statuses.values())
    everything = [t for values in latencies.values() for t in values]
    print(
        f"\n{args.clients} clients for {args.seconds:.0f} s (wall {wall:.1f} s), server: "
        f"{args.compute_slots} compute slot(s), queue {args.max_queue}"
    )
    print(f"requests sent:        {sent}")
    for status, count in statuses.most_common():
        values = latencies[status]
        print(
            f"  {status:<20}{count:>6}   p50 {percentile(values, 50):>10}   p99 {percentile(values, 99):>10}"
        )
    print(f"latency, all calls:   p50 {percentile(everything, 50)}   p99 {percentile(everything, 99)}")
    print(
        f"OK throughput:        {statuses['OK'] / wall:.2f} calls/s"
        f"   (OK latency p50 {percentile(latencies['OK'], 50)}, p99 {percentile(latencies['OK'], 99)})"
    )
    print(
        f"health checks:        {len(health_latencies)} answered, {health_failures} failed, "
        f"p50 {percentile(health_latencies, 50)}, p99 {percentile(health_latencies, 99)}"
    )
    print(f"server RSS:           {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")
    print(f"server exit code:     {exit_code}")
    ok = sent == accounted
    print(f"sent == accounted for: {ok} ({sent} == {accounted})")
    unexpected = set(statuses) - {"OK", "RESOURCE_EXHAUSTED"}
    if unexpected:
        print(f"UNEXPECTED statuses under overload: {', '.join(sorted(unexpected))}")
    return 0 if ok and not unexpected and not health_failures and exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
