"""`pgw serve` as a process: it starts, answers, and on SIGTERM finishes in-flight requests, then exits."""

from __future__ import annotations

import asyncio
import os
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


@pytest.fixture
def served(exported: Exported) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    nllb, _ = exported("translation")
    embed, _ = exported("embedding")
    command = [
        sys.executable, "-m", "gateway", "serve",
        "--model", f"nllb={nllb}", "--model", f"embed={embed}",
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ | {"PGW_GRACE_SECONDS": "20"},
    )
    try:
        _wait_serving(port, process)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _wait_serving(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError("the server did not become SERVING")


async def test_sigterm_lets_in_flight_requests_finish(served: tuple[subprocess.Popen[bytes], int]) -> None:
    process, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = polyglot_pb2_grpc.PolyglotStub(channel)
        options = pb.TranslateOptions(beam_size=4, max_new_tokens=40)
        texts = [f"Sentence number {i} is about the weather in the mountains." for i in range(24)]
        in_flight = asyncio.ensure_future(
            stub.Translate(
                pb.TranslateRequest(texts=texts, source_lang="en", target_lang="fr", options=options)
            )
        )
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        reply = await asyncio.wait_for(in_flight, timeout=60)
        assert len(reply.translations) == len(texts)
    assert process.wait(timeout=30) == 0
    log = process.stdout.read().decode() if process.stdout else ""
    assert "model nllb: task translation, variant int8" in log
