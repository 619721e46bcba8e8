"""Targets, service config and readiness of the Client's gRPC channel.

A target is one server (``host:port``, ``[v6]:port``, ``unix:path``), several
replicas (a list of IP addresses, gRPC's ``ipv4:a:p,b:p`` form) or a DNS name
(``dns:///name:port``, for example a Kubernetes headless Service). A host without a
port gets :data:`DEFAULT_PORT`, the server's default, never gRPC's implicit 443.

Several replicas and DNS names are balanced by gRPC itself: the ``round_robin``
policy over every address, with client-side health checking (each connection
watches ``grpc.health.v1`` for the GradientService and leaves the rotation while
its server is not SERVING: loading the model, draining or gone).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad.errors import DeadlineExceeded, LayergradError, Unavailable, from_grpc_error

DEFAULT_PORT = 50051
"""The port of a target that names none: the server's default."""

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name

# Schemes whose addresses have no port to complete, passed to gRPC as they are.
_OPAQUE_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")

RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.25s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}
# Retrying stops while more than half of the recent calls failed (token bucket).
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.5}


def normalize_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target for ``target`` and whether it names replicas to balance over.

    ValueError for a malformed address, a port out of range, or a list mixing IPv4
    and IPv6 addresses or holding host names (use a ``dns:///`` name for those).
    """
    if not isinstance(target, str):
        addresses = list(target)
        if not addresses or not all(isinstance(a, str) and a for a in addresses):
            raise ValueError(f"target must be an address or a non-empty list of addresses, not {target!r}")
        if len(addresses) == 1:
            return normalize_target(addresses[0])
        return _address_list(addresses)
    if not target or target != target.strip():
        raise ValueError(f"target must be an address such as 127.0.0.1:{DEFAULT_PORT}, not {target!r}")
    lowered = target.lower()
    if lowered.startswith(_OPAQUE_SCHEMES):
        return target, False
    if lowered.startswith(("ipv4:", "ipv6:")):
        addresses = target[5:].split(",")
        scheme = lowered[:4]
        normalized, _ = _address_list(addresses, scheme)
        return normalized, len(addresses) > 1
    if lowered.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):  # dns://[authority]/host[:port]
            authority, slash, name = rest[2:].partition("/")
            if not slash:
                raise ValueError(f"malformed DNS target {target!r}; write dns:///name:port")
            return f"dns://{authority}/{with_port(name)}", True
        return f"dns:{with_port(rest)}", True
    return with_port(target), False


def with_port(address: str) -> str:
    """``address`` (``host``, ``host:port``, ``[v6]``, ``[v6]:port``, bare IPv6) with a port."""
    if not address:
        raise ValueError("empty address")
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ValueError(f"malformed address {address!r}: missing ']'")
        host, rest = address[: close + 1], address[close + 1 :]
        if not rest:
            return f"{host}:{DEFAULT_PORT}"
        if not rest.startswith(":"):
            raise ValueError(f"malformed address {address!r}")
        return f"{host}:{_port(rest[1:], address)}"
    if address.count(":") > 1:  # an IPv6 address without brackets, hence without a port
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"malformed address {address!r}: write IPv6 addresses as [addr]:port") from None
        return f"[{address}]:{DEFAULT_PORT}"
    host, colon, port = address.partition(":")
    if not host:
        raise ValueError(f"address {address!r} has no host")
    return f"{host}:{_port(port, address)}" if colon else f"{host}:{DEFAULT_PORT}"


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"address {address!r} has no valid port (1-65535)")
    return int(text)


def _address_list(addresses: Sequence[str], scheme: str | None = None) -> tuple[str, bool]:
    """``ipv4:a:p,b:p`` (or ``ipv6:``) for IP addresses, each with a port."""
    normalized = []
    families = set()
    for address in addresses:
        full = with_port(address.strip())
        host = full.rsplit(":", 1)[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"{address!r} is not an IP address: list replicas by address, or give one "
                "dns:///name:port whose records list them"
            ) from None
        normalized.append(full)
    if len(families) > 1 or (scheme is not None and families != {int(scheme[-1])}):
        raise ValueError(f"replica addresses must all be IPv4 or all IPv6, not {list(addresses)!r}")
    family = scheme or f"ipv{families.pop()}"
    return f"{family}:{','.join(normalized)}", True


def service_config(*, retry: bool, balanced: bool) -> dict[str, Any] | None:
    """The channel's service config: retries and, for replicas, round_robin with health checks."""
    config: dict[str, Any] = {}
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": SERVICE_NAME}
    if retry:
        config["methodConfig"] = [{"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY}]
        config["retryThrottling"] = RETRY_THROTTLING
    return config or None


def addresses(target: str) -> list[str]:
    """The ``host:port`` addresses of a normalized target (one for a name or a socket)."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return target[len(scheme) :].split(",")
    if target.startswith("dns:"):
        return [target.rsplit("/", 1)[-1].removeprefix("dns:")]
    return [target]


def wait_serving(channel: grpc.Channel, deadline: float | None) -> None:
    """Blocks until the channel's server (a replica) reports the GradientService SERVING.

    Polls ``grpc.health.v1.Health/Check``, with gRPC's ``wait_for_ready`` so a server
    not listening yet is waited for too. DeadlineExceeded when ``deadline``
    (``time.monotonic()``) passes first; another error if the health service refuses.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    delay = 0.05
    status = "no answer"
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(
                f"the server was not ready within the deadline (last health status: {status})"
            )
        try:
            response = stub.Check(
                request, timeout=None if remaining is None else remaining, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            error: LayergradError = from_grpc_error(exc)
            if not isinstance(error, Unavailable | DeadlineExceeded):
                raise error from exc
            status = f"{type(error).__name__}: {error.message}"
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        pause = delay if remaining is None else min(delay, max(deadline - time.monotonic(), 0.0))
        time.sleep(pause)
        delay = min(delay * 2, 0.5)


async def wait_serving_async(channel: grpc.aio.Channel, deadline: float | None) -> None:
    """:func:`wait_serving` on an asyncio channel."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    delay = 0.05
    status = "no answer"
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(
                f"the server was not ready within the deadline (last health status: {status})"
            )
        try:
            response = await stub.Check(request, timeout=remaining, wait_for_ready=True)
        except grpc.RpcError as exc:
            error: LayergradError = from_grpc_error(exc)
            if not isinstance(error, Unavailable | DeadlineExceeded):
                raise error from exc
            status = f"{type(error).__name__}: {error.message}"
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        await asyncio.sleep(delay if deadline is None else min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, 0.5)
