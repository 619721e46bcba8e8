"""`make loadtest`: N clients call one server for T seconds, on loopback; prints what came back.

Starts its own layergrad-server (small queue by default, so the server is overloaded on purpose),
runs N client threads sending cheap gradient calls (ClassScore on fc8, gradient of fc8/b, one
prepared input) with SDK retries off, so that every refusal is counted, while one more thread
checks health every 50 ms. Prints requests sent, each final status counted, p50/p99 latency,
health-check p99, server RSS before and after, and whether every request sent was accounted for.
Exits 1 if any status other than OK or RESOURCE_EXHAUSTED came back, or a request went missing.

    make loadtest                                  # 8 clients, 20 s, queue 2
    make loadtest LOADTEST_ARGS="--clients 16 --seconds 60 --max-queue 4"
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import threading
import time
from pathlib import Path

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
    args = parser.parse_args()
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
