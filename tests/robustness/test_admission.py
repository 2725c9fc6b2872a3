"""Admission control and the accounting of requests that end early, on in-process servers whose batches are
held by construction (`tests.e2e.conftest.hold`), never by a sleep."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import BatchingConfig, LimitsConfig, ModelConfig, ServerConfig
from gateway.errors import InvalidInput
from gateway.manifest import Manifest, Task
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import GatewayServer
from tests.e2e.conftest import free_port, hold

Exported = Callable[[Task], tuple[Path, Manifest]]


async def _server(exported: Exported, **settings: Any) -> GatewayServer:
    config = ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        drain_seconds=0,
        models=(ModelConfig(name="embed", path=exported("embedding")[0], variant="fp32"),),
        **settings,
    )
    server = GatewayServer(config)
    await server.start()
    return server


@pytest.fixture
async def limited(exported: Exported) -> AsyncIterator[GatewayServer]:
    server = await _server(
        exported,
        limits=LimitsConfig(max_in_flight=3, max_in_flight_per_model=2),
        batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0),
    )
    yield server
    await server.stop(grace=1, drain=0)


def _metrics(server: GatewayServer) -> str:
    url = f"http://127.0.0.1:{server.config.metrics_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def _embed(text: str) -> pb.EmbedRequest:
    return pb.EmbedRequest(texts=[text])


async def test_in_flight_limits_refuse_with_resource_exhausted(limited: GatewayServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        stub = polyglot_pb2_grpc.PolyglotStub(channel)
        with hold(limited, "embed") as held:
            first = asyncio.ensure_future(stub.Embed(_embed("one")))
            await held.started.wait()
            second = asyncio.ensure_future(stub.Embed(_embed("two")))
            await held.queued(1)
            with pytest.raises(grpc.aio.AioRpcError) as model_full:
                await stub.Embed(_embed("three"))
            assert model_full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "model embed is serving 2 requests (max_in_flight 2)" in (model_full.value.details() or "")
        assert len((await first).embeddings) == 1
        assert len((await second).embeddings) == 1
        assert (await stub.Embed(_embed("after"))).embeddings


async def test_the_server_wide_limit_counts_every_rpc(exported: Exported) -> None:
    server = await _server(
        exported,
        limits=LimitsConfig(max_in_flight=2, max_in_flight_per_model=10),
        batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = polyglot_pb2_grpc.PolyglotStub(channel)
            with hold(server, "embed") as held:
                calls = [asyncio.ensure_future(stub.Embed(_embed(t))) for t in ("a", "b")]
                await held.started.wait()
                await held.queued(1)
                with pytest.raises(grpc.aio.AioRpcError) as full:
                    await stub.ListModels(pb.ListModelsRequest())
                assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "the server is serving 2 requests (max_in_flight 2)" in (full.value.details() or "")
            for call in calls:
                assert (await call).embeddings
            assert (await stub.ListModels(pb.ListModelsRequest())).models
    finally:
        await server.stop(grace=1, drain=0)


async def test_requests_that_end_early_are_counted_as_such_and_dropped(
    limited: GatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves is CANCELLED, one whose deadline passes DEADLINE_EXCEEDED (answered by the
    server itself, before gRPC would cancel the call); neither logs a traceback, and their texts never
    reach the model."""
    caplog.set_level(logging.INFO)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        stub = polyglot_pb2_grpc.PolyglotStub(channel)
        with hold(limited, "embed") as held:
            running = asyncio.ensure_future(stub.Embed(_embed("running")))
            await held.started.wait()
            leaving = stub.Embed(_embed("leaving"))
            await held.queued(1)
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            late = asyncio.ensure_future(stub.Embed(_embed("late"), timeout=1.0))
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await late
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "did not finish within its deadline" in (expired.value.details() or "")
            for _ in range(200):  # the server sees the cancellation a moment after the client
                if held.queue_depth == 0:
                    break
                await asyncio.sleep(0.01)
            assert held.queue_depth == 0, "the departed requests' texts are still queued"
        assert (await running).embeddings
        assert held.batches == 1, "a departed request's text reached the model"
    body = _metrics(limited)
    assert 'pgw_requests_total{code="CANCELLED",model="embed",rpc="Embed"} 1.0' in body
    assert 'pgw_requests_total{code="DEADLINE_EXCEEDED",model="embed",rpc="Embed"} 1.0' in body
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_second_server_on_a_taken_port_refuses_to_start(exported: Exported) -> None:
    first = await _server(exported)
    try:
        config = first.config.model_copy(update={"port": first.port, "metrics_port": 0})
        second = GatewayServer(config)
        with pytest.raises(InvalidInput, match=f"cannot listen on 127.0.0.1:{first.port}"):
            await second.start()
        await second.registry.close()
    finally:
        await first.stop(grace=1, drain=0)


async def test_a_taken_metrics_port_is_a_clear_error(exported: Exported) -> None:
    first = await _server(exported)
    try:
        config = first.config.model_copy(update={"port": 0})
        second = GatewayServer(config)
        with pytest.raises(InvalidInput, match=r"metrics port .* cannot listen"):
            await second.start()
        await second.registry.close()
    finally:
        await first.stop(grace=1, drain=0)
