"""Addresses without a port, replica lists and DNS names, in the Client and in the server's --address.

No server is needed: a gRPC channel connects lazily, and ``--address`` is checked when parsed.
"""

from __future__ import annotations

import json
from typing import Any

import layergrad
import pytest
from layergrad import _channel
from layergrad_server import config as server_config


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1", "127.0.0.1:50051"),
        ("gradhost", "gradhost:50051"),
        ("gradhost:9000", "gradhost:9000"),
        ("[::1]", "[::1]:50051"),
        ("::1", "[::1]:50051"),
        ("[::1]:7000", "[::1]:7000"),
        ("dns:///layergrad-headless.ml.svc", "dns:///layergrad-headless.ml.svc:50051"),
        ("dns:///layergrad-headless.ml.svc:7000", "dns:///layergrad-headless.ml.svc:7000"),
        ("unix:/run/layergrad.sock", "unix:/run/layergrad.sock"),
    ],
)
def test_target_without_a_port_gets_the_default_port_never_443(target: str, expected: str) -> None:
    with layergrad.Client(target) as client:
        assert client.target == expected


@pytest.mark.parametrize("target", ["gradhost:", "gradhost:http", "gradhost:0", "gradhost:70000", "[::1", ""])
def test_malformed_target_is_a_value_error(target: str) -> None:
    with pytest.raises(ValueError):
        layergrad.Client(target)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (["127.0.0.1:7001", "127.0.0.1:7002"], "ipv4:127.0.0.1:7001,127.0.0.1:7002"),
        (["10.0.0.5", "10.0.0.6"], "ipv4:10.0.0.5:50051,10.0.0.6:50051"),
        (["::1", "[::1]:7002"], "ipv6:[::1]:50051,[::1]:7002"),
        ("ipv4:127.0.0.1:7001,127.0.0.1", "ipv4:127.0.0.1:7001,127.0.0.1:50051"),
    ],
)
def test_several_addresses_become_one_balanced_ip_list(target: Any, expected: str) -> None:
    with layergrad.Client(target) as client:
        assert client.target == expected
        assert client.load_balancing


def test_one_address_in_a_list_is_a_plain_target() -> None:
    with layergrad.Client(["127.0.0.1:7001"]) as client:
        assert client.target == "127.0.0.1:7001"
        assert not client.load_balancing


@pytest.mark.parametrize(
    "target",
    [["gradhost:7001", "127.0.0.1:7002"], ["127.0.0.1:7001", "[::1]:7002"], [], "ipv6:127.0.0.1:7001"],
)
def test_replica_list_of_host_names_or_mixed_families_is_refused(target: Any) -> None:
    with pytest.raises(ValueError):
        layergrad.Client(target)


def test_replicas_use_round_robin_with_health_checks_and_retries() -> None:
    config = _channel.service_config(retry=True, balanced=True)
    assert config is not None
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "layergrad.v1.GradientService"}
    assert "UNAVAILABLE" in config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"]
    with layergrad.Client("dns:///layergrad-headless:50051") as client:
        options = dict(client._channel_options)
        assert json.loads(options["grpc.service_config"]) == config


def test_one_server_keeps_grpcs_default_policy_without_health_checks() -> None:
    with layergrad.Client("127.0.0.1:7001") as client:
        config = json.loads(dict(client._channel_options)["grpc.service_config"])
    assert "loadBalancingConfig" not in config and "healthCheckConfig" not in config
    with layergrad.Client("127.0.0.1:7001", retry=False) as client:
        assert "grpc.service_config" not in dict(client._channel_options)


def test_balancing_can_be_forced_for_one_address() -> None:
    with layergrad.Client("127.0.0.1:7001", load_balancing=True) as client:
        config = json.loads(dict(client._channel_options)["grpc.service_config"])
    assert "healthCheckConfig" in config


def test_token_to_loopback_replicas_is_allowed_and_to_a_remote_one_refused() -> None:
    layergrad.Client(["127.0.0.1:7001", "127.0.0.2:7002"], token="secret").close()
    with pytest.raises(ValueError, match="in clear"):
        layergrad.Client(["127.0.0.1:7001", "10.1.2.3:7002"], token="secret")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "127.0.0.1:50051"),
        ("0.0.0.0", "0.0.0.0:50051"),
        ("[::]", "[::]:50051"),
        ("::", "[::]:50051"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("[::1]:7000", "[::1]:7000"),
        ("unix:/run/layergrad.sock", "unix:/run/layergrad.sock"),
    ],
)
def test_server_address_without_a_port_listens_on_the_default_port(address: str, expected: str) -> None:
    args = server_config.build_parser().parse_args(["--address", address])
    assert server_config.from_args(args).address == expected


@pytest.mark.parametrize("address", ["gradhost:http", "gradhost:70000", "[::1]x", ""])
def test_malformed_server_address_is_a_startup_error(address: str) -> None:
    args = server_config.build_parser().parse_args(["--address", address])
    with pytest.raises(SystemExit, match="--address"):
        server_config.from_args(args)
