"""Transport security and bearer tokens: TLS, mutual TLS, scopes; health and reflection stay open."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import subprocess
import sys

import grpc
import layergrad
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad_server.auth import TokenFileError, TokenStore
from layergrad_server.errors import PermissionDenied, Unauthenticated
from layergrad_server.launch import ServerProcess

ZEROS = np.zeros((3, 224, 224), np.float32)
CHEAP = {"pattern": "grad", "parameters": ["fc8/b"]}
TOKENS = {
    "all": "tok-all-7c1f0e",
    "predict": "tok-predict-2b9d",
    "inputs": "tok-inputs-a4e1",
}


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS_FILE = f"""\
# layergrad tokens
sha256:{sha256(TOKENS["all"])}  *                    # ops
sha256:{sha256(TOKENS["predict"])}  predict          # dashboard
{TOKENS["inputs"]}  input-gradients,predict           # saliency service
"""


class Pki:
    """A throwaway CA with a server certificate (localhost, 127.0.0.1) and a client certificate."""

    def __init__(self, name: str = "layergrad test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._issue(name, self.key.public_key(), ca=True)

    def _issue(self, name: str, public_key, *, ca: bool = False, server: bool = False, issuer=None):
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256())

    def leaf(self, name: str, *, server: bool = False) -> tuple[bytes, bytes]:
        """(PEM private key, PEM certificate) signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(name, key.public_key(), server=server, issuer=self.cert.subject)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = Pki()
    folder = tmp_path_factory.mktemp("pki")
    server_key, server_cert = ca.leaf("layergrad server", server=True)
    client_key, client_cert = ca.leaf("layergrad client")
    files = {"ca": ca.pem, "server.key": server_key, "server.crt": server_cert}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {
        "folder": folder,
        "ca": ca.pem,
        "client_key": client_key,
        "client_cert": client_cert,
        "other": Pki(),
    }


@pytest.fixture(scope="module")
def mtls_server(pki, weights_file, tmp_path_factory):
    folder = pki["folder"]
    (folder / "tokens").write_text(TOKENS_FILE)
    args = ["--weights", str(weights_file), "--tokens-file", str(folder / "tokens")]
    args += ["--tls-cert", str(folder / "server.crt"), "--tls-key", str(folder / "server.key")]
    args += ["--tls-client-ca", str(folder / "ca")]
    process = ServerProcess(
        args,
        tmp_path_factory.mktemp("mtls") / "server.log",
        credentials=grpc.ssl_channel_credentials(pki["ca"], pki["client_key"], pki["client_cert"]),
    )
    try:
        process.wait_serving()
        yield process
    finally:
        assert process.terminate() == 0


def mtls_client(server: ServerProcess, pki: dict, token: str | None) -> layergrad.Client:
    return layergrad.Client(
        server.address,
        timeout=120,
        root_certificates=pki["ca"],
        private_key=pki["client_key"],
        certificate_chain=pki["client_cert"],
        token=token,
    )


def assert_answers_normally(server: ServerProcess, pki: dict) -> None:
    with mtls_client(server, pki, TOKENS["all"]) as client:
        grads = client.gradients([ZEROS], layergrad.ClassScore("fc8", [3]), **CHEAP)
    assert grads.parameters["fc8/b"][3] == 1.0


def test_a_client_with_the_right_certificate_and_token_gets_gradients(mtls_server, pki):
    assert_answers_normally(mtls_server, pki)
    assert "mutual TLS, 3 bearer token(s)" in mtls_server.log()


@pytest.mark.parametrize("kind", ["no certificate", "certificate of another CA", "plaintext"])
def test_a_client_without_a_trusted_certificate_cannot_connect(mtls_server, pki, kind):
    if kind == "plaintext":
        client = layergrad.Client(mtls_server.address, timeout=10, retry=False)
    elif kind == "no certificate":
        client = layergrad.Client(mtls_server.address, timeout=10, root_certificates=pki["ca"], retry=False)
    else:
        key, cert = pki["other"].leaf("intruder")
        client = layergrad.Client(
            mtls_server.address,
            timeout=10,
            root_certificates=pki["ca"],
            private_key=key,
            certificate_chain=cert,
            retry=False,
        )
    with client, pytest.raises(layergrad.Unavailable):
        client.model_info()
    assert_answers_normally(mtls_server, pki)


@pytest.mark.parametrize("token", [None, "not-a-token", TOKENS["all"] + "x"])
def test_a_missing_or_wrong_token_is_unauthenticated(mtls_server, pki, token):
    with mtls_client(mtls_server, pki, token) as client:
        for call in (
            client.model_info,
            lambda: client.predict([ZEROS]),
            lambda: client.gradients([ZEROS], layergrad.ClassScore("fc8", [3]), **CHEAP),
        ):
            with pytest.raises(layergrad.Unauthenticated) as caught:
                call()
            assert caught.value.reason == ("MISSING_TOKEN" if token is None else "INVALID_TOKEN")
    assert_answers_normally(mtls_server, pki)


def test_a_token_without_a_scope_is_permission_denied_naming_the_missing_scopes(mtls_server, pki):
    with mtls_client(mtls_server, pki, TOKENS["predict"]) as client:
        assert client.model_info().model_name == "VGG16"  # any valid token
        assert client.predict([ZEROS])["prob"].shape == (1, 1000)
        with pytest.raises(layergrad.PermissionDenied) as caught:
            client.gradients([ZEROS], layergrad.ClassScore("fc8", [3]), input=True, parameters=["fc8/b"])
        assert caught.value.reason == "MISSING_SCOPE"
        assert "input-gradients, param-gradients" in caught.value.message
        assert "dashboard" in caught.value.message
    with mtls_client(mtls_server, pki, TOKENS["inputs"]) as client:
        saliency = client.input_gradient([ZEROS], layergrad.ClassScore("fc8", [3]))
        assert saliency.shape == (1, 3, 224, 224)
        for targets in ({"layers": ["fc7"]}, {"parameters": ["fc8/b"]}, {"input": True, "layers": ["fc7"]}):
            with pytest.raises(layergrad.PermissionDenied):
                client.gradients([ZEROS], layergrad.SumOfSquares("fc8"), **targets)
        # Activations are forward outputs: the predict scope.
        result = client.gradients([ZEROS], layergrad.SumOfSquares("fc8"), input=True, activations=["fc8"])
        assert result.activations["fc8"].shape == (1, 1000)
    assert_answers_normally(mtls_server, pki)


def test_garbage_from_a_caller_without_a_token_is_unauthenticated(mtls_server, pki):
    credentials = grpc.ssl_channel_credentials(pki["ca"], pki["client_key"], pki["client_cert"])
    with grpc.secure_channel(mtls_server.address, credentials) as channel:
        raw = channel.unary_unary("/layergrad.v1.GradientService/ComputeGradients")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff garbage", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        raw = channel.unary_unary(
            "/layergrad.v1.GradientService/ComputeGradients",
            request_serializer=pb.ComputeGradientsRequest.SerializeToString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            raw(pb.ComputeGradientsRequest(), timeout=10, metadata=[("authorization", "Basic abc")])
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(mtls_server, pki):
    credentials = grpc.ssl_channel_credentials(pki["ca"], pki["client_key"], pki["client_cert"])
    with grpc.secure_channel(mtls_server.address, credentials) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_from_the_environment_work_over_plaintext_loopback(weights_file, tmp_path):
    env = {"LAYERGRAD_TOKENS": f"sha256:{sha256('env-token-1')} predict # a; env-token-2 * # b"}
    with ServerProcess(["--weights", str(weights_file)], tmp_path / "server.log", env=env) as server:
        server.wait_serving()
        with layergrad.Client(server.address, timeout=120, token="env-token-1") as client:
            assert client.predict([ZEROS])["prob"].shape == (1, 1000)
            with pytest.raises(layergrad.PermissionDenied):
                client.gradients([ZEROS], layergrad.ClassScore("fc8", [3]), **CHEAP)
        with layergrad.Client(server.address, timeout=120, token="env-token-2") as client:
            assert client.gradients([ZEROS], layergrad.ClassScore("fc8", [3]), **CHEAP).parameters
        with (
            layergrad.Client(server.address, timeout=120) as client,
            pytest.raises(layergrad.Unauthenticated),
        ):
            client.predict([ZEROS])
        assert "env-token" not in server.log()
        assert "plaintext, 2 bearer token(s)" in server.log()


def test_the_sdk_refuses_to_send_a_token_in_clear_to_another_host():
    with pytest.raises(ValueError, match="in clear"):
        layergrad.Client("10.1.2.3:50051", token="secret")
    with pytest.raises(ValueError, match="go together"):
        layergrad.Client("127.0.0.1:1", root_certificates=b"x", private_key=b"k")


def test_a_bad_tokens_file_stops_the_server_with_a_clear_message(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("abc predict,delete-everything\n")
    done = subprocess.run(
        [sys.executable, "-m", "layergrad_server", "--address", "127.0.0.1:0", "--tokens-file", str(tokens)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "delete-everything" in done.stderr and "valid scopes" in done.stderr


def test_token_store_hashes_tokens_and_checks_scopes():
    store = TokenStore.parse(TOKENS_FILE, "tokens")
    assert len(store) == 3
    principal = store.authenticate(f"Bearer {TOKENS['inputs']}")
    assert principal.name == "saliency service"
    principal.require({"predict", "input-gradients"})
    with pytest.raises(PermissionDenied, match="layer-gradients"):
        principal.require({"layer-gradients"})
    assert store.authenticate(f"bearer {TOKENS['all']}").scopes >= {"param-gradients", "layer-gradients"}
    for header in (None, "", "Bearer", "Token abc", f"Bearer {TOKENS['all']}-"):
        with pytest.raises(Unauthenticated):
            store.authenticate(header)
    for bad in ("sha256:abcd predict", "x", "x predict extra", "x nope", "x ,"):
        with pytest.raises(TokenFileError):
            TokenStore.parse(bad, "tokens")
