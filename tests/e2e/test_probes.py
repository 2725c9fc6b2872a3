"""The metrics port: /metrics, /healthz (the event loop runs) and /readyz (started, not shutting down,
every model ready), each answering from the metrics thread whatever the event loop is doing; and
Health/List as the server shuts down."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import server as server_module
from gateway.config import ModelConfig, ServerConfig
from gateway.manifest import Manifest, Task
from gateway.server import GatewayServer
from tests.e2e.conftest import free_port

Exported = Callable[[Task], tuple[Path, Manifest]]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


async def _until(port: int, path: str, status: int, seconds: float = 30) -> str:
    """Poll `path` until it answers `status`; its body."""
    deadline = time.monotonic() + seconds
    while True:
        code, body = await asyncio.to_thread(_get, port, path)
        if code == status:
            return body
        assert time.monotonic() < deadline, f"{path} stayed {code}: {body}"
        await asyncio.sleep(0.05)


async def test_probes_follow_the_server(exported: Exported, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "LIVENESS_SECONDS", 0.5)
    port = free_port()
    config = ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=port,
        models=(ModelConfig(name="embed", path=exported("embedding")[0]),),
    )
    gateway = GatewayServer(config)
    await gateway.start()
    stopping: asyncio.Task[None] | None = None
    try:
        code, metrics = await asyncio.to_thread(_get, port, "/metrics")
        assert code == 200
        assert "process_resident_memory_bytes" in metrics
        assert "pgw_requests_in_flight" in metrics
        assert "_created" not in metrics
        assert json.loads(await _until(port, "/readyz", 200)) == {
            "ready": True,
            "shutting_down": False,
            "models": {"embed": True},
        }
        assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
        assert (await asyncio.to_thread(_get, port, "/other"))[0] == 404

        # The event loop stuck: this test asks /healthz from the loop's own thread, without yielding, so
        # the loop stays blocked until the probe reports it (past the 0.5 s limit); then it passes again.
        blocked_until = time.monotonic() + 30
        while (answer := _get(port, "/healthz"))[0] != 503:
            assert time.monotonic() < blocked_until, f"/healthz never failed: {answer}"
        assert json.loads(answer[1])["alive"] is False
        await _until(port, "/healthz", 200)

        # Shutting down: not ready from the start of the drain, still alive.
        stopping = asyncio.create_task(gateway.stop(grace=5, drain=600))
        assert json.loads(await _until(port, "/readyz", 503))["shutting_down"] is True
        assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            listed = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert {name: s.status for name, s in listed.statuses.items()} == {
            "": not_serving,
            "polyglot.v1.Polyglot": not_serving,
            "polyglot.v1.Polyglot/embed": not_serving,
        }
    finally:
        await gateway.stop()  # ends the drain (or stops the server, if the test failed before it)
        if stopping is not None:
            await stopping
