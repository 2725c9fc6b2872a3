"""A real gateway on loopback, serving the exported demo models, and a gRPC channel to it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from gateway.config import BatchingConfig, ModelConfig, ServerConfig
from gateway.manifest import Manifest, Task
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import GatewayServer

Exported = Callable[[Task], tuple[Path, Manifest]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
async def gateway(exported: Exported) -> AsyncIterator[GatewayServer]:
    """fp32 variants, so replies can be compared with PyTorch at 1e-4."""
    served: tuple[tuple[str, Task], ...] = (
        ("sat-demo", "token-classification"),
        ("distilbert-demo", "embedding"),
        ("distilbert-demo-fill-mask", "fill-mask"),
        ("nllb-demo", "translation"),
    )
    models = tuple(ModelConfig(name=name, path=exported(task)[0], variant="fp32") for name, task in served)
    config = ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        models=models,
        batching=BatchingConfig(max_batch_size=16, max_queue_delay_ms=5, max_queue_size=512),
    )
    server = GatewayServer(config)
    await server.start()
    yield server
    await server.stop(grace=1)


@pytest.fixture(scope="session")
async def channel(gateway: GatewayServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> polyglot_pb2_grpc.PolyglotStub:
    return polyglot_pb2_grpc.PolyglotStub(channel)
