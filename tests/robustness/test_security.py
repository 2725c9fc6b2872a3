"""TLS, mutual TLS and API keys, with certificates the test makes (the `cryptography` package)."""

from __future__ import annotations

import datetime
import http.client
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.cli import app
from gateway.client import PolyglotClient, PolyglotError, Retry, Tls
from gateway.config import ModelConfig, ServerConfig, TlsConfig
from gateway.interceptors import GatewayInterceptor
from gateway.manifest import Manifest, Task
from gateway.metrics import Metrics
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import GatewayServer
from tests.e2e.conftest import free_port
from tests.robustness.conftest import Served, serve, wait_serving

Exported = Callable[[Task], tuple[Path, Manifest]]
KEY = "s3cret-key"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    ca: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("test CA", ca_key, None, ca=True)
    other = _cert("another CA", other_key, None, ca=True)
    _write(directory, "ca", ca, ca_key)
    for name, issuer in (
        ("server", (ca, ca_key)),
        ("client", (ca, ca_key)),
        ("stranger", (other, other_key)),
    ):
        key = _key()
        _write(directory, name, _cert(f"{name} cert", key, (issuer[0].subject, issuer[1])), key)
    d = directory
    return Pki(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
        d / "stranger.pem", d / "stranger.key",
    )  # fmt: skip


def _tls_config(pki: Pki, mutual: bool) -> TlsConfig:
    return TlsConfig(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca if mutual else None)


async def _tls_server(exported: Exported, pki: Pki, mutual: bool) -> GatewayServer:
    config = ServerConfig.load(
        host="localhost",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        http_port=free_port(),
        drain_seconds=0,
        tls=_tls_config(pki, mutual),
        models=(ModelConfig(name="embed", path=exported("embedding")[0]),),
    )
    server = GatewayServer(config)
    await server.start()
    return server


@pytest.fixture
async def tls_server(exported: Exported, pki: Pki) -> AsyncIterator[GatewayServer]:
    server = await _tls_server(exported, pki, mutual=False)
    yield server
    await server.stop(grace=1, drain=0)


@pytest.fixture
async def mtls_server(exported: Exported, pki: Pki) -> AsyncIterator[GatewayServer]:
    server = await _tls_server(exported, pki, mutual=True)
    yield server
    await server.stop(grace=1, drain=0)


async def _embed(target: str, tls: Tls | None, retry: Retry | None = None) -> int:
    def call() -> int:
        with PolyglotClient(target, tls=tls, timeout=10, retry=retry or Retry()) as client:
            return len(client.embed(["over TLS"]).embeddings)

    import asyncio

    return await asyncio.to_thread(call)


async def test_tls_round_trip(tls_server: GatewayServer, pki: Pki) -> None:
    target = f"localhost:{tls_server.port}"
    assert await _embed(target, Tls(ca=pki.ca)) == 1
    with pytest.raises(grpc.RpcError) as plaintext:  # one attempt: retries with backoff could outlast 10 s
        await _embed(target, None, Retry(attempts=1))
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    context = ssl.create_default_context(cafile=str(pki.ca))
    url = f"https://127.0.0.1:{tls_server.config.metrics_port}/metrics"
    context.check_hostname = False  # the test certificate names localhost; the metrics port binds 127.0.0.1
    body = urllib.request.urlopen(url, context=context, timeout=10).read().decode()
    assert "pgw_requests_total" in body
    with pytest.raises((ConnectionError, http.client.HTTPException, urllib.error.URLError)):  # plain HTTP
        urllib.request.urlopen(url.replace("https", "http"), timeout=10).read()


def _https(pki: Pki, client: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


async def _post_embed(server: GatewayServer, scheme: str, verify: ssl.SSLContext | bool) -> int:
    url = f"{scheme}://localhost:{server.http_port}/v1/embed"
    async with httpx.AsyncClient(verify=verify, timeout=30) as client:
        return (await client.post(url, json={"texts": ["over HTTPS"]})).status_code


async def test_http_serves_tls_with_the_same_files(tls_server: GatewayServer, pki: Pki) -> None:
    assert await _post_embed(tls_server, "https", _https(pki, client=False)) == 200
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        await _post_embed(tls_server, "http", False)
    with pytest.raises(httpx.ConnectError):  # a certificate the client does not trust
        await _post_embed(tls_server, "https", True)


async def test_http_with_mutual_tls_needs_a_client_certificate(mtls_server: GatewayServer, pki: Pki) -> None:
    assert await _post_embed(mtls_server, "https", _https(pki, client=True)) == 200
    with pytest.raises(httpx.HTTPError):
        await _post_embed(mtls_server, "https", _https(pki, client=False))


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    mtls_server: GatewayServer, pki: Pki
) -> None:
    target = f"localhost:{mtls_server.port}"
    assert await _embed(target, Tls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)) == 1
    for refused in (Tls(ca=pki.ca), Tls(ca=pki.ca, cert=pki.stranger_cert, key=pki.stranger_key)):
        with pytest.raises(grpc.RpcError) as error:
            await _embed(target, refused, Retry(attempts=1))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_client_checks_the_certificate_against_server_name(
    tls_server: GatewayServer, pki: Pki
) -> None:
    """Connecting by address to a server whose certificate names `localhost`: `Tls(server_name=...)`."""
    target = f"127.0.0.1:{tls_server.port}"
    assert await _embed(target, Tls(ca=pki.ca, server_name="localhost")) == 1
    with pytest.raises(PolyglotError) as mismatch:
        await _embed(target, Tls(ca=pki.ca), Retry(attempts=1))
    assert mismatch.value.status == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(PolyglotError):
        await _embed(target, Tls(ca=pki.ca, server_name="elsewhere.example"), Retry(attempts=1))


def test_the_client_wants_both_halves_of_a_client_certificate(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        Tls(ca=pki.ca, cert=pki.client_cert).credentials()


# ---------------------------------------------------------------------------------------------- API keys


@pytest.fixture
async def keyed(exported: Exported) -> AsyncIterator[GatewayServer]:
    config = ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        drain_seconds=0,
        api_key=KEY,
        models=(
            ModelConfig(name="embed", path=exported("embedding")[0]),
            ModelConfig(name="nllb", path=exported("translation")[0]),
        ),
    )
    server = GatewayServer(config)
    await server.start()
    yield server
    await server.stop(grace=1, drain=0)


async def test_every_method_but_health_needs_the_key(keyed: GatewayServer) -> None:
    key = (("authorization", f"Bearer {KEY}"),)
    wrong = (("authorization", "Bearer nope"),)
    async with aio.insecure_channel(f"127.0.0.1:{keyed.port}") as channel:
        stub = polyglot_pb2_grpc.PolyglotStub(channel)
        stream = pb.TranslateRequest(texts=["Hi."], source_lang="en", target_lang="fr")
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")

        async def calls(metadata: tuple[tuple[str, str], ...]) -> list[object]:
            return [
                stub.Embed(pb.EmbedRequest(texts=["x"]), metadata=metadata),
                stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
                _drain(stub.TranslateStream(iter([stream]), metadata=metadata)),
                _drain(reflect.ServerReflectionInfo(iter([listing]), metadata=metadata)),
            ]

        for metadata in ((), wrong, (("authorization", KEY),)):
            for call in await calls(metadata):
                with pytest.raises(aio.AioRpcError) as refused:
                    await call  # type: ignore[misc]
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "Bearer <key>" in (refused.value.details() or "")
        for call in await calls(key):
            assert await call  # type: ignore[misc]
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            await health.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING


async def _drain(call: AsyncIterator[object]) -> list[object]:
    return [reply async for reply in call]


async def test_the_interceptor_covers_every_handler_kind() -> None:
    """Unary-stream and stream-unary handlers (none in our API yet) are checked like the others."""

    async def unary_stream(request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        yield request

    async def stream_unary(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
        return b"".join([r async for r in requests])

    def identity(b: bytes) -> bytes:
        return b

    handlers = {
        "US": grpc.unary_stream_rpc_method_handler(unary_stream, identity, identity),
        "SU": grpc.stream_unary_rpc_method_handler(stream_unary, identity, identity),
    }
    interceptor = GatewayInterceptor(Metrics(), ApiKeys(KEY), Admission(10))
    server = aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Kinds", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            us = channel.unary_stream("/test.Kinds/US", identity, identity)
            su = channel.stream_unary("/test.Kinds/SU", identity, identity)
            for metadata in ((), (("authorization", f"Bearer {KEY}"),)):
                outcomes = []
                for call in (_drain(us(b"x", metadata=metadata)), su(iter([b"a", b"b"]), metadata=metadata)):
                    try:
                        outcomes.append(await call)  # type: ignore[misc]
                    except aio.AioRpcError as error:
                        outcomes.append(error.code())
                expected = [grpc.StatusCode.UNAUTHENTICATED] * 2 if not metadata else [[b"x"], b"ab"]
                assert outcomes == expected
    finally:
        await server.stop(0)


def test_api_keys_from_a_file_are_reloaded_on_sighup(exported: Exported, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# operators\nfirst-key\n\n", encoding="utf-8")
    served = serve(exported, tmp_path / "server", {"api_key_file": str(keys)})
    try:

        def status(key: str) -> grpc.StatusCode:
            with grpc.insecure_channel(served.target) as channel:
                stub = polyglot_pb2_grpc.PolyglotStub(channel)
                try:
                    stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),))
                except grpc.RpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

        assert status("first-key") == grpc.StatusCode.OK
        assert status("second-key") == grpc.StatusCode.UNAUTHENTICATED
        keys.write_text("second-key\n", encoding="utf-8")
        served.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while status("second-key") != grpc.StatusCode.OK:  # the server reads the file when it gets the signal
            assert time.monotonic() < deadline, "the key file was not reloaded"
            time.sleep(0.05)
        assert status("first-key") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        log = served.stop()
    assert "auth: API keys required (1 keys" in log
    assert "API keys reloaded" in log
    assert "first-key" not in log  # keys are never logged
    assert "second-key" not in log


def test_an_open_server_on_every_interface_warns(exported: Exported, tmp_path: Path) -> None:
    served = serve(exported, tmp_path / "open", {"host": "0.0.0.0"})
    log = served.stop()
    assert "neither TLS nor an API key" in log
    assert "--host 127.0.0.1" in log


def test_pgw_serve_and_the_client_commands_speak_mutual_tls(
    exported: Exported, pki: Pki, tmp_path: Path
) -> None:
    """`pgw serve --tls-cert --tls-key --tls-client-ca`, and `pgw embed --tls-ca --tls-cert --tls-key`."""
    port = free_port()
    log_file = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "gateway", "serve", "--model", f"embed={exported('embedding')[0]}",
        "--host", "localhost", "--port", str(port), "--metrics-port", "0",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log_file.open("wb"), stderr=subprocess.STDOUT)
    served = Served(process, port, 0, log_file, host="localhost")
    try:
        wait_serving(served, Tls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key).credentials())
        client = ["embed", "mutual", "--server", f"localhost:{port}", "--tls-ca", str(pki.ca)]
        with_cert = [*client, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
        ok = CliRunner().invoke(app, with_cert)
        assert ok.exit_code == 0, ok.output
        assert "dims" in ok.output
        refused = CliRunner().invoke(app, client)  # no client certificate
        assert refused.exit_code == 1
        assert "UNAVAILABLE" in refused.output
        half = CliRunner().invoke(app, [*client, "--tls-cert", str(pki.client_cert)])
        assert half.exit_code == 2
        assert "both tls_cert and tls_key" in half.output
    finally:
        log = served.stop()
    assert "TLS: on, client certificates required (mutual TLS)" in log


def test_pgw_serve_wants_both_halves_of_its_certificate(pki: Pki) -> None:
    result = CliRunner().invoke(app, ["serve", "--demo", "--tls-cert", str(pki.server_cert)])
    assert result.exit_code == 2
    assert "--tls-cert and --tls-key together" in result.output
