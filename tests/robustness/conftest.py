"""`pgw serve` in its own process on the demo exports, with small limits (so that every request hypothesis
can make is cheap), for requests that try to hurt it. Its log is checked when it stops: no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.export.demo import DEMO_MODELS
from gateway.manifest import Manifest, Task
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from tests.e2e.conftest import free_port

Exported = Callable[[Task], tuple[Path, Manifest]]
MODELS: tuple[tuple[str, Task], ...] = tuple((demo.name, demo.task) for demo in DEMO_MODELS)
LIMITS = {"max_texts": 8, "max_text_chars": 2000, "max_new_tokens": 12, "max_request_chars": 8000}


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path
    host: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> str:
        """SIGTERM; the server must exit cleanly. Returns its log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        text = self.log.read_text(encoding="utf-8", errors="replace")
        assert code == 0, text[-3000:]
        return text


def serve(
    exported: Exported,
    work: Path,
    extra: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    tls: bool = False,
) -> Served:
    """Start `pgw serve` with the demo exports (int8) and wait until it is SERVING."""
    port, metrics_port = free_port(), free_port()
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "metrics_host": "127.0.0.1",
        "metrics_port": metrics_port,
        "drain_seconds": 0,
        "grace_seconds": 10,
        "http_port": 0,  # HTTP only for the tests that give it a port
        "limits": dict(LIMITS),
        "models": [{"name": name, "path": str(exported(task)[0])} for name, task in MODELS],
    }
    config |= extra or {}
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = work / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_file)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        # the file says whether it serves HTTP: the suite's PGW_HTTP_PORT (tests/conftest.py) must not win
        env={k: v for k, v in os.environ.items() if k != "PGW_HTTP_PORT"} | (env or {}),
    )
    host = "127.0.0.1" if config["host"] in ("0.0.0.0", "::") else config["host"]
    served = Served(process, port, metrics_port, log, host)
    if not tls:
        wait_serving(served)
    return served


def wait_serving(served: Served, credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.monotonic() + 120
    channel = (
        grpc.insecure_channel(served.target)
        if credentials is None
        else grpc.secure_channel(served.target, credentials)
    )
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if served.process.poll() is not None:
                raise AssertionError(served.log.read_text(errors="replace")[-3000:])
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError("the server did not become SERVING")


@contextmanager
def running(exported: Exported, work: Path, extra: dict[str, Any] | None = None) -> Iterator[Served]:
    """A server for a module's tests; when they end it must stop cleanly, having logged no traceback."""
    served = serve(exported, work, extra)
    try:
        yield served
    finally:
        log = served.stop()
        assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="module")
def hostile_server(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with running(exported, tmp_path_factory.mktemp("hostile")) as served:
        yield served


@pytest.fixture(scope="module")
def channel(hostile_server: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(hostile_server.target) as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> polyglot_pb2_grpc.PolyglotStub:
    return polyglot_pb2_grpc.PolyglotStub(channel)


def still_serving(stub: polyglot_pb2_grpc.PolyglotStub) -> None:
    """A normal request still succeeds."""
    reply = stub.Embed(pb.EmbedRequest(texts=["still serving"]), timeout=30)
    assert len(reply.embeddings) == 1
