"""One Client over three real replicas on loopback: round_robin, health checks, retries, failover.

The replicas share one weights file through three symbolic links, so each reports
its own ``weights.source`` in GetModelInfo: the response itself says which replica
answered. Compute calls are counted per replica by gRPC's channelz view of the
Client's channel (calls started and succeeded on each subchannel, one per address).
"""

from __future__ import annotations

import collections
import json
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import layergrad
import pytest
from conftest import make_rgb
from grpc._cython import cygrpc
from layergrad_server.launch import ServerProcess

REPLICAS = 3
CALL_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def replicas(
    weights_file: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    base = tmp_path_factory.mktemp("replicas")
    servers: list[ServerProcess] = []
    try:
        for index in range(REPLICAS):
            link = base / f"replica-{index}.npz"
            link.symlink_to(weights_file)
            servers.append(
                ServerProcess(["--weights", str(link), "--grace", "30"], base / f"replica-{index}.log")
            )
        for server in servers:
            server.wait_serving()
        yield servers
    finally:
        for server in servers:
            server.terminate()


def subchannels(client: layergrad.Client) -> dict[str, dict[str, Any]]:
    """channelz data of each subchannel of the Client's channel, by address (``127.0.0.1:port``)."""
    top = json.loads(cygrpc.channelz_get_top_channels(0))["channel"]
    mine = max(
        (channel for channel in top if channel["data"]["target"] == client.target),
        key=lambda channel: int(channel["ref"]["channelId"]),
    )
    found = {}
    for ref in mine.get("subchannelRef", []):
        data = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))["subchannel"]["data"]
        address = data["target"].removeprefix("ipv4:")
        found[address] = {
            "state": data.get("state", {}).get("state"),
            "started": int(data.get("callsStarted", 0)),
            "succeeded": int(data.get("callsSucceeded", 0)),
            "failed": int(data.get("callsFailed", 0)),
        }
    return found


def wait_all_ready(client: layergrad.Client, count: int, timeout: float = 120.0) -> None:
    """Waits until ``count`` subchannels are READY (connected and their health SERVING)."""
    client.wait_for_ready(timeout)  # a new channel connects on its first call
    deadline = time.monotonic() + timeout
    while True:
        states = [sub["state"] for sub in subchannels(client).values()]
        if states.count("READY") == count:
            return
        assert time.monotonic() < deadline, f"subchannels not all READY: {states}"
        time.sleep(0.1)


def test_calls_spread_over_every_replica(replicas: list[ServerProcess]) -> None:
    addresses = [server.address for server in replicas]
    image = make_rgb(7)
    with layergrad.Client(addresses, timeout=CALL_TIMEOUT) as client:
        wait_all_ready(client, REPLICAS)
        sources = collections.Counter(client.model_info().weights.source for _ in range(30))
        before = subchannels(client)
        probs = [client.predict(image)["prob"] for _ in range(30)]
        after = subchannels(client)
    predicts = {address: after[address]["succeeded"] - before[address]["succeeded"] for address in addresses}
    print(f"\nGetModelInfo answers per replica (by weights.source): {dict(sources)}")
    print(f"Predict calls per replica (channelz, succeeded): {predicts}")
    assert sorted(sources) == sorted(
        f"npz:{s.log_path.parent}/replica-{i}.npz (random:0)" for i, s in enumerate(replicas)
    )
    assert all(count > 0 for count in sources.values()) and sum(sources.values()) == 30
    assert all(count > 0 for count in predicts.values()) and sum(predicts.values()) == 30
    for prob in probs[1:]:  # every replica serves the same weights
        assert (prob == probs[0]).all()


def test_replica_killed_and_replica_draining_lose_no_call(replicas: list[ServerProcess]) -> None:
    """30 calls from 3 threads; SIGKILL replica 0 after 6 are done and SIGTERM replica 1 after 12."""
    addresses = [server.address for server in replicas]
    total, threads = 30, 3
    image = make_rgb(8)
    loss = layergrad.SumOfSquares("prob")
    outcomes: dict[int, str] = {}
    lock = threading.Lock()
    next_call = iter(range(total))
    done = threading.Condition(lock)

    def work(client: layergrad.Client) -> None:
        while True:
            with lock:
                index = next(next_call, None)
            if index is None:
                return
            try:
                grads = client.parameter_gradients(image, loss, ["fc8/b"])
                outcome = "OK" if grads["fc8/b"].shape == (1000,) else "wrong shape"
            except layergrad.LayergradError as exc:
                outcome = exc.code.name if exc.code is not None else type(exc).__name__
            with done:
                outcomes[index] = outcome
                done.notify_all()

    with layergrad.Client(addresses, timeout=CALL_TIMEOUT) as client:
        wait_all_ready(client, REPLICAS)
        workers = [threading.Thread(target=work, args=(client,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        with done:
            assert done.wait_for(lambda: len(outcomes) >= 6, timeout=10 * CALL_TIMEOUT)
        replicas[0].process.kill()
        with done:
            assert done.wait_for(lambda: len(outcomes) >= 12, timeout=10 * CALL_TIMEOUT)
        replicas[1].process.terminate()  # SIGTERM: drains, then exits
        for worker in workers:
            worker.join(timeout=10 * CALL_TIMEOUT)
        hung = [worker for worker in workers if worker.is_alive()]
        counts = subchannels(client)
    statuses = collections.Counter(outcomes.values())
    print(f"\noutcomes of {total} calls: {dict(statuses)}")
    print(
        "per replica (channelz started/succeeded/failed): "
        + ", ".join(
            f"{i}:{counts[a]['started']}/{counts[a]['succeeded']}/{counts[a]['failed']}"
            for i, a in enumerate(addresses)
        )
    )
    assert not hung, "a call hung past its deadline"
    assert sorted(outcomes) == list(range(total)), "a call was lost"
    # Only calls in flight on the killed replica (one per thread at most) may fail, and only as a
    # replica going away does: UNAVAILABLE, or CANCELLED when gRPC reports the dropped stream so.
    failed = {status: n for status, n in statuses.items() if status != "OK"}
    assert set(failed) <= {"UNAVAILABLE", "CANCELLED"} and sum(failed.values()) <= threads, statuses
    assert replicas[0].process.wait(30) == -9
    assert replicas[1].process.wait(60) == 0
    # The surviving replica ends up serving the calls made after the others left.
    assert counts[addresses[2]]["succeeded"] > counts[addresses[0]]["succeeded"]
