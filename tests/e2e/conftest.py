"""A real gateway on loopback, serving the exported demo models, and a gRPC channel to it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import BatchingConfig, ModelConfig, ServerConfig
from gateway.export.demo import DEMO_MODELS
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
    models = tuple(
        ModelConfig(name=demo.name, path=exported(demo.task)[0], variant="fp32") for demo in DEMO_MODELS
    )
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


class Held:
    """Work of one task model held at the runtime until `release()`: tests keep work in flight by
    construction instead of guessing with sleeps. `started` is set when work reaches the hold: a batch of
    the batcher, or a decoder step of a translation engine (which then blocks its thread)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.engine = getattr(model, "engine", None)
        self.batcher = model.batcher
        self.started = asyncio.Event()
        self._open = asyncio.Event()
        self._thread_open = threading.Event()
        self._loop = asyncio.get_running_loop()
        self.batches = 0

    async def _held(self, items: list[Any]) -> Any:
        self.batches += 1
        self.started.set()
        await self._open.wait()
        return await self._run(items)

    def _held_step(self, tokens: Any, positions: Any) -> Any:
        self.batches += 1
        self._loop.call_soon_threadsafe(self.started.set)
        self._thread_open.wait()
        return self._step(tokens, positions)

    def __enter__(self) -> Held:
        if self.engine is not None:
            self._step = self.engine.batch.step
            self.engine.batch.step = self._held_step
        else:
            self._run = self.batcher._run_batch
            self.batcher._run_batch = self._held
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        if self.engine is not None:
            self.engine.batch.step = self._step
        else:
            self.batcher._run_batch = self._run

    def release(self) -> None:
        self._open.set()
        self._thread_open.set()

    @property
    def queue_depth(self) -> int:
        return int(self.model.queue_depth)

    async def queued(self, count: int, seconds: float = 30) -> None:
        """Wait until `count` items are queued behind the held work (polling a condition)."""
        deadline = time.monotonic() + seconds
        while self.queue_depth < count:
            assert time.monotonic() < deadline, f"{count} items never queued ({self.queue_depth})"
            await asyncio.sleep(0.005)


def hold(server: GatewayServer, model: str) -> Held:
    """Hold the batches of `model` (a served name) of an in-process server."""
    for entry in server.registry.all():
        if entry.name == model:
            return Held(entry.model)
    raise KeyError(model)


class Stepper:
    """A translation engine that runs one decoder step per `step()`: each step blocks the engine's thread
    until the test lets it go, so a test can look at the engine between steps."""

    def __init__(self, model: Any) -> None:
        self.engine = model.engine
        self._go = threading.Semaphore(0)
        self._waiting = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._free = False

    def _step(self, tokens: Any, positions: Any) -> Any:
        self._loop.call_soon_threadsafe(self._waiting.set)
        self._go.acquire()
        return self._original(tokens, positions)

    async def waiting(self) -> None:
        """Until the engine is blocked before a step."""
        await self._waiting.wait()

    async def step(self) -> None:
        """Let one step run, then wait until the engine is blocked before the next one."""
        self._waiting.clear()
        self._go.release()
        await self._waiting.wait()

    def __enter__(self) -> Stepper:
        self._original = self.engine.batch.step
        self.engine.batch.step = self._step
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.batch.step = self._original
        self._go.release()  # the step it may be blocked in


def stepper(server: GatewayServer, model: str) -> Stepper:
    for entry in server.registry.all():
        if entry.name == model:
            return Stepper(entry.model)
    raise KeyError(model)
