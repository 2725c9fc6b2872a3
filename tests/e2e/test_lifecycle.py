"""`pgw serve` as a process: it starts, answers, and on SIGTERM turns NOT_SERVING, keeps taking requests for
the drain, then takes no new ones and finishes the accepted ones before it exits. Requests are held in
flight by construction (an open TranslateStream), never by a sleep."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.manifest import Manifest, Task
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from tests.e2e.conftest import free_port

Exported = Callable[[Task], tuple[Path, Manifest]]


def _command(exported: Exported, port: int) -> list[str]:
    nllb, _ = exported("translation")
    embed, _ = exported("embedding")
    return [
        sys.executable, "-m", "gateway", "serve",
        "--model", f"nllb={nllb}", "--model", f"embed={embed}",
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
    ]  # fmt: skip


@pytest.fixture
def served(exported: Exported) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    # A drain far longer than the test: it ends when the second signal comes, never by the clock.
    env = os.environ | {"PGW_GRACE_SECONDS": "60", "PGW_DRAIN_SECONDS": "600"}
    process = subprocess.Popen(
        _command(exported, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    try:
        _wait_for(port, process, health_pb2.HealthCheckResponse.SERVING)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _health(port: int) -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return int(
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            )
        except grpc.RpcError:
            return None


def _wait_for(port: int, process: subprocess.Popen[bytes], status: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _health(port) != status:
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        assert time.monotonic() < deadline, f"health never became {status}"
        time.sleep(0.05)


def _translate(text: str, request_id: str = "") -> pb.TranslateRequest:
    return pb.TranslateRequest(texts=[text], source_lang="en", target_lang="fr", request_id=request_id)


def test_sigterm_drains_then_finishes_what_it_accepted(served: tuple[subprocess.Popen[bytes], int]) -> None:
    process, port = served
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = polyglot_pb2_grpc.PolyglotStub(channel)
    outgoing: queue.Queue[pb.TranslateRequest | None] = queue.Queue()

    def messages() -> Iterator[pb.TranslateRequest]:
        while (message := outgoing.get()) is not None:
            yield message

    stream = stub.TranslateStream(messages(), timeout=120)
    outgoing.put(_translate("Before the signal.", "1"))
    assert next(stream).request_id == "1"  # the stream is open and accepted: in flight by construction

    process.send_signal(signal.SIGTERM)
    _wait_for(port, process, health_pb2.HealthCheckResponse.NOT_SERVING)
    # the drain: health says NOT_SERVING, and requests are still taken, new ones included
    reply = stub.Translate(_translate("During the drain."), timeout=30)
    assert reply.translations
    outgoing.put(_translate("On the open stream, during the drain.", "2"))
    assert next(stream).request_id == "2"

    process.send_signal(signal.SIGINT)  # a second signal ends the drain
    deadline = time.monotonic() + 30
    while True:  # no new requests now...
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(texts=["x"]), timeout=5)
        if "shutting down" in (refused.value.details() or ""):
            break
        assert time.monotonic() < deadline, refused.value.details()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # ...but the accepted stream goes on to its end
    outgoing.put(_translate("After the drain, on the accepted stream.", "3"))
    assert next(stream).request_id == "3"
    outgoing.put(None)
    assert list(stream) == []
    channel.close()
    assert process.wait(timeout=60) == 0
    log = process.stdout.read().decode() if process.stdout else ""
    assert "still taking requests for 600.0 s" in log
    assert "no new requests; 1 in flight" in log
    assert "model nllb: task translation, variant int8" in log


def test_a_second_server_on_the_same_port_refuses_to_start(
    served: tuple[subprocess.Popen[bytes], int], exported: Exported
) -> None:
    _, port = served
    second = subprocess.run(
        _command(exported, port), capture_output=True, text=True, timeout=120, check=False
    )
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr + second.stdout
    assert _health(port) == health_pb2.HealthCheckResponse.SERVING  # the first one is untouched
