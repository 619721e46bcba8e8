"""`make soak`: good, bad, slow and idle callers against one server at once, for a bounded time.

Starts its own layergrad-server on random weights and, while it runs:

- holds ``--idle`` open calls of each idle kind, each on a connection of its own: unary calls
  whose request message never arrives, ``grpc.health.v1.Health/Watch`` streams, reflection
  streams that ask nothing (without a token when ``--tokens``: those are refused at once);
- opens ``--stalled`` all-parameter StreamGradients calls and never reads them after the first
  message (the server cancels them after ``--stall-timeout``);
- sends late requests (a request message that arrives after a pause), cancellations mid-compute,
  oversize requests, garbage bytes, a 4.9 kB PNG that would take 1.5 GB to resize and a tensor of
  shape [0, 2^63-1], in a loop;
- runs ``--clients`` threads of normal cheap gradient calls;
- checks health every 20 ms and the server's resident memory every ``--rss-every`` seconds.

It prints the calls sent and every final status by kind (sent == accounted), health-check
latency percentiles under the attack, normal calls' results, and RSS over time. Exits 1 if a
call went unaccounted, a normal call failed with anything but RESOURCE_EXHAUSTED, a hostile call
got INTERNAL or UNKNOWN, or health p99 reached ``--health-p99-ms``.

    make soak                                   # 100 idle of each kind, 60 s
    make soak SOAK_ARGS="--idle 200 --seconds 120"
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad_server.launch import ServerProcess
from loadtest import percentile, rss_mib
from PIL import Image

TOKEN = "soak-token"
SERVICE = "/layergrad.v1.GradientService/"
ZEROS = np.zeros((3, 224, 224), np.float32)


def prepared() -> pb.Input:
    return pb.Input(prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=ZEROS.shape, data=ZEROS.tobytes()))


def cheap() -> pb.ComputeGradientsRequest:
    return pb.ComputeGradientsRequest(
        inputs=[prepared()],
        loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[1])),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(parameters=["fc8/b"]),
    )


def thin_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (40_000_000, 1)).save(buffer, "PNG")
    return buffer.getvalue()


class Ledger:
    """Every call sent and the status it ended with, by kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: collections.Counter[str] = collections.Counter()
        self.ended: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def send(self, kind: str) -> None:
        with self._lock:
            self.sent[kind] += 1

    def end(self, kind: str, code: grpc.StatusCode | str) -> None:
        with self._lock:
            self.ended[kind][code.name if isinstance(code, grpc.StatusCode) else code] += 1

    def accounted(self, kind: str) -> int:
        with self._lock:
            return sum(self.ended[kind].values())


def finish(ledger: Ledger, kind: str, future: grpc.Future) -> None:
    """Counts ``future``'s status under ``kind`` once it ends."""

    def done(call: grpc.Future) -> None:
        if call.cancelled():
            ledger.end(kind, "CANCELLED_BY_CLIENT")
            return
        error = call.exception()
        ledger.end(kind, grpc.StatusCode.OK if error is None else error.code())

    future.add_done_callback(done)


def silent(release: threading.Event, pause: float | None = None, message: bytes = b"") -> Iterator[bytes]:
    """A request iterator that sends ``message`` after ``pause`` seconds, or nothing until released."""
    if pause is None:
        release.wait()
        return
    time.sleep(pause)
    yield message


def own_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (no subchannel shared with other channels)."""
    return grpc.insecure_channel(
        address, options=[("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--idle", type=int, default=100, help="idle calls of each kind")
    parser.add_argument("--stalled", type=int, default=3, help="all-parameter streams never read")
    parser.add_argument("--clients", type=int, default=2, help="threads of normal calls")
    parser.add_argument("--stall-timeout", type=float, default=10.0)
    parser.add_argument("--rss-every", type=float, default=5.0)
    parser.add_argument("--health-p99-ms", type=float, default=50.0)
    parser.add_argument("--tokens", action="store_true", help="serve with a bearer token")
    args = parser.parse_args()

    metadata = (("authorization", f"Bearer {TOKEN}"),) if args.tokens else ()
    workdir = Path(tempfile.mkdtemp(prefix="layergrad-soak-"))
    server_args = ["--weights", "random:0", "--stall-timeout", str(args.stall_timeout)]
    env = {"LAYERGRAD_TOKENS": f"{TOKEN} *"} if args.tokens else None
    server = ServerProcess(server_args, workdir / "server.log", env=env)
    server.wait_serving()
    address = server.address
    print(f"server {address} (pid {server.process.pid}), log {workdir / 'server.log'}")
    ledger = Ledger()
    stop = threading.Event()
    release = threading.Event()
    rss: list[tuple[float, float]] = [(0.0, rss_mib(server.process.pid))]
    started = time.monotonic()
    health_latency: list[float] = []
    channels: list[grpc.Channel] = []
    held: list[grpc.Future] = []

    # ---- idle callers, a connection each ----
    for _ in range(args.idle):
        channel = own_channel(address)
        channels.append(channel)
        # No token on the idle unary calls: with --tokens they are refused before the message.
        call = channel.stream_unary(SERVICE + "ComputeGradients").future(silent(release), timeout=3600)
        ledger.send("idle unary (no message)")
        finish(ledger, "idle unary (no message)", call)
        held.append(call)
    for kind, opener in (
        ("health Watch", lambda ch: health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())),
        (
            "reflection (silent)",
            lambda ch: reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(silent(release)),
        ),
    ):
        for _ in range(args.idle):
            channel = own_channel(address)
            channels.append(channel)
            stream = opener(channel)
            ledger.send(kind)
            finish(ledger, kind, stream)
            held.append(stream)

    # ---- stalled readers ----
    everything = pb.StreamGradientsRequest(
        inputs=[prepared()],
        loss=pb.Loss(sum_of_squares=pb.SumOfSquares(layer="fc8")),
        pattern=pb.BACKWARD_PATTERN_BACKWARD,
        targets=pb.GradientTargets(all_parameters=True),
    )
    stalled_streams = []
    for _ in range(args.stalled):
        channel = own_channel(address)
        channels.append(channel)
        stub = pb_grpc.GradientServiceStub(channel)
        stream = stub.StreamGradients(everything, metadata=metadata, timeout=3600)
        ledger.send("stalled reader")
        stalled_streams.append(stream)

    def stall(stream: grpc.Call) -> None:
        try:
            next(stream)  # the first message, then nothing is read until the server gives up
            while not stop.is_set() and stream.is_active():
                time.sleep(0.2)
            for _ in stream:
                pass
            ledger.end("stalled reader", grpc.StatusCode.OK)
        except grpc.RpcError as error:
            ledger.end("stalled reader", error.code())

    # ---- normal and hostile callers ----
    normal: collections.Counter[str] = collections.Counter()
    normal_lock = threading.Lock()

    def normal_client() -> None:
        with own_channel(address) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            while not stop.is_set():
                ledger.send("normal")
                try:
                    response = stub.ComputeGradients(cheap(), metadata=metadata, timeout=120)
                    right = np.frombuffer(response.gradients[0].tensor.data, "<f4")[1] == 1.0
                    ledger.end("normal", grpc.StatusCode.OK)
                    with normal_lock:
                        normal["OK" if right else "WRONG RESULT"] += 1
                except grpc.RpcError as error:
                    ledger.end("normal", error.code())
                    with normal_lock:
                        normal[error.code().name] += 1
                    time.sleep(0.2)

    png = thin_png()
    hostile_requests = {
        "garbage bytes": b"\xff\xfe garbage \x00" * 8,
        "oversize request": pb.PredictRequest(inputs=[pb.Input(encoded_image=b"\0" * (65 << 20))]),
        "costly PNG": pb.PredictRequest(inputs=[pb.Input(encoded_image=png)]),
        "impossible shape": pb.PredictRequest(
            inputs=[pb.Input(prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 2**63 - 1]))]
        ),
        "long layer name": pb.PredictRequest(inputs=[prepared()], layers=["x" * 20_000]),
    }

    def hostile_client() -> None:
        with grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", -1), ("grpc.enable_retries", 0)]
        ) as channel:
            predict = channel.unary_unary(SERVICE + "Predict")
            late = channel.stream_unary(SERVICE + "Predict")
            compute = pb_grpc.GradientServiceStub(channel).ComputeGradients
            while not stop.is_set():
                for kind, request in hostile_requests.items():
                    data = request if isinstance(request, bytes) else request.SerializeToString()
                    ledger.send(kind)
                    try:
                        predict(data, metadata=metadata, timeout=60)
                        ledger.end(kind, grpc.StatusCode.OK)
                    except grpc.RpcError as error:
                        ledger.end(kind, error.code())
                ledger.send("late request (1 s)")
                message = pb.PredictRequest(inputs=[prepared()]).SerializeToString()
                call = late.future(silent(release, 1.0, message), metadata=metadata, timeout=120)
                finish(ledger, "late request (1 s)", call)
                ledger.send("cancelled mid-compute")
                future = compute.future(cheap(), metadata=metadata, timeout=120)
                finish(ledger, "cancelled mid-compute", future)
                time.sleep(0.3)
                future.cancel()
                call.exception()
                future.exception() if not future.cancelled() else None

    def health_prober() -> None:
        with own_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                begin = time.perf_counter()
                ledger.send("health Check")
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    ledger.end("health Check", grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    ledger.end("health Check", error.code())
                health_latency.append(time.perf_counter() - begin)
                time.sleep(0.02)

    threads = [threading.Thread(target=stall, args=(s,), daemon=True) for s in stalled_streams]
    threads += [threading.Thread(target=normal_client, daemon=True) for _ in range(args.clients)]
    threads += [threading.Thread(target=hostile_client, daemon=True), threading.Thread(target=health_prober)]
    for thread in threads:
        thread.start()
    while time.monotonic() - started < args.seconds:
        time.sleep(args.rss_every)
        rss.append((time.monotonic() - started, rss_mib(server.process.pid)))
    stop.set()
    release.set()
    for call in held:
        call.cancel()
    for thread in threads:
        thread.join(180)
    time.sleep(1.0)  # the last done callbacks
    for channel in channels:
        channel.close()
    exit_code = server.terminate()

    failed = False
    print(f"\n{args.seconds:.0f} s; {args.idle} idle calls of each kind, {args.stalled} stalled readers")
    print(f"{'kind':32} {'sent':>6} {'ended':>6}  statuses")
    for kind in ledger.sent:
        accounted = ledger.accounted(kind)
        statuses = ", ".join(f"{code} {count}" for code, count in sorted(ledger.ended[kind].items()))
        print(f"{kind:32} {ledger.sent[kind]:6} {accounted:6}  {statuses}")
        if accounted != ledger.sent[kind]:
            failed = True
            print(f"  {ledger.sent[kind] - accounted} call(s) of this kind unaccounted for")
        if kind not in ("normal", "health Check") and {"INTERNAL", "UNKNOWN"} & set(ledger.ended[kind]):
            failed = True
    print(f"sent {sum(ledger.sent.values())}, accounted {sum(ledger.accounted(k) for k in ledger.sent)}")
    bad_normal = {code: n for code, n in normal.items() if code not in ("OK", "RESOURCE_EXHAUSTED")}
    print(f"normal calls: {dict(normal)}")
    failed |= bool(bad_normal) or not normal.get("OK")
    p99 = float(np.percentile(health_latency, 99)) * 1000 if health_latency else float("inf")
    print(
        f"health Check under attack: {len(health_latency)} checks, p50 {percentile(health_latency, 50)}, "
        f"p99 {percentile(health_latency, 99)}, max {max(health_latency) * 1000:.1f} ms"
    )
    failed |= p99 >= args.health_p99_ms
    print("server RSS: " + ", ".join(f"{t:.0f}s {mib:.0f} MiB" for t, mib in rss))
    print(f"server exit code on SIGTERM: {exit_code}")
    failed |= exit_code != 0
    print("RESULT: " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
