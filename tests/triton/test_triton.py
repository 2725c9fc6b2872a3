"""The gateway on a real tritonserver (nvidia-pytriton's 2.51, Python flavor, demo models): every rpc gives
the in-process answer, Triton batches concurrent requests, and a crashed Triton turns into UNAVAILABLE and
NOT_SERVING, then recovers. CI installs tritonserver and sets PGW_REQUIRE_TRITON=1, so there it cannot skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import BatchingConfig, ModelConfig, ServerConfig, TritonConfig
from gateway.export.demo import DEMO_MODELS
from gateway.manifest import Manifest, Task
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import SERVICE, GatewayServer
from gateway.triton.repository import TritonOptions, write_repository
from tests.e2e.conftest import free_port

Exported = Callable[[Task], tuple[Path, Manifest]]
Stub = polyglot_pb2_grpc.PolyglotStub
MODELS: tuple[tuple[str, Task], ...] = tuple((demo.name, demo.task) for demo in DEMO_MODELS)
TIGHT = "nllb-tight"  # a translation model whose Triton queue holds one request
# A translation model whose Triton batcher waits 10 minutes for a full batch of 8: fewer requests stay queued
# in Triton by construction, for as long as a test needs them in flight.
HELD = "nllb-held"


def _installed() -> bool:
    from gateway.triton.process import TritonServerError, locate

    try:
        locate()
    except TritonServerError:
        return False
    return True


if not _installed():
    if os.environ.get("PGW_REQUIRE_TRITON"):
        raise RuntimeError("PGW_REQUIRE_TRITON is set but no tritonserver is installed")
    pytest.skip("no tritonserver: pip install --no-deps nvidia-pytriton", allow_module_level=True)

from gateway.triton.process import Ports, TritonServer  # noqa: E402


@pytest.fixture(scope="module")
def repository(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model_repo")
    python = TritonOptions(flavor="python", max_queue_delay_us=20000)
    for name, task in MODELS:
        write_repository(exported(task)[0], root, python, name=name, variants=("fp32",))
    tight = TritonOptions(flavor="python", max_batch_size=1, max_queue_size=1, max_queue_delay_us=0)
    write_repository(exported("translation")[0], root, tight, name=TIGHT, variants=("fp32",))
    held = TritonOptions(flavor="python", max_batch_size=8, max_queue_delay_us=600_000_000)
    write_repository(exported("translation")[0], root, held, name=HELD, variants=("fp32",))
    return root


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    ports = Ports(grpc=free_port(), http=free_port(), metrics=free_port())
    server = TritonServer(repository, tmp_path_factory.mktemp("triton-state"), ports)
    server.start()
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


def _config(
    exported: Exported,
    triton: TritonServer,
    batch: int,
    names: tuple[str, ...] = (),
    in_flight: int | None = None,
) -> ServerConfig:
    models = [
        ModelConfig(
            name=name, path=exported(task)[0], variant="fp32", backend="triton", triton_model=f"{name}-fp32"
        )
        for name, task in MODELS
    ]
    models.append(
        ModelConfig(
            name=TIGHT,
            path=exported("translation")[0],
            variant="fp32",
            backend="triton",
            triton_model=f"{TIGHT}-fp32",
        )
    )
    models.append(  # each text its own Triton request, four at a time
        ModelConfig(
            name=HELD,
            path=exported("translation")[0],
            variant="fp32",
            backend="triton",
            triton_model=f"{HELD}-fp32",
            batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_concurrent_batches=4),
        )
    )
    return ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models=tuple(m for m in models if not names or m.name in names),
        batching=BatchingConfig(
            max_batch_size=batch, max_queue_delay_ms=5, max_queue_size=512, max_concurrent_batches=in_flight
        ),
        triton=TritonConfig(
            endpoints=(f"127.0.0.1:{triton.ports.grpc}",), health_interval_s=0.2, timeout_s=20
        ),
    )


@pytest.fixture(scope="module")
async def triton_gateway(exported: Exported, triton: TritonServer) -> AsyncIterator[GatewayServer]:
    server = GatewayServer(_config(exported, triton, batch=16))
    await server.start()
    yield server
    await server.stop(grace=1)


@pytest.fixture(scope="module")
async def triton_channel(triton_gateway: GatewayServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{triton_gateway.port}") as chan:
        yield chan


def _answer(message: Any) -> dict[str, Any]:
    """A reply without what may differ between backends: timing, and the model's backend description."""
    data = MessageToDict(message, preserving_proto_field_name=True)
    data.pop("timing", None)
    return data


def _close(got: Any, want: Any, path: str = "") -> None:
    """Equal structure, ids and text; floats within 1e-4 (batches pad differently)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4), path
    else:
        assert got == want, path


TEXTS = [
    "The weather is nice today. We will walk to the lake and have lunch there.",
    "Der Zug hat Verspätung. Wir warten am Bahnsteig.",
    "短い文です。もう一つの文です。",
]


async def test_every_rpc_answers_as_in_process(stub: Stub, triton_channel: grpc.aio.Channel) -> None:
    remote = polyglot_pb2_grpc.PolyglotStub(triton_channel)
    sampling = pb.SamplingOptions(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    calls: list[tuple[str, Any]] = [
        (
            "Translate",
            pb.TranslateRequest(
                texts=TEXTS, source_lang="eng_Latn", target_lang="fra_Latn", model="nllb-demo"
            ),
        ),
        (
            "Translate",
            pb.TranslateRequest(
                texts=TEXTS[:2],
                source_lang="deu_Latn",
                target_lang="zho_Hans",
                model="nllb-demo",
                options=pb.TranslateOptions(beam_size=3, num_return=2, max_new_tokens=9, return_scores=True),
            ),
        ),
        (
            "Translate",
            pb.TranslateRequest(
                texts=TEXTS[:2],
                source_lang="eng_Latn",
                target_lang="spa_Latn",
                model="nllb-demo",
                options=pb.TranslateOptions(num_return=2, max_new_tokens=8, sampling=sampling),
            ),
        ),
        (
            "Classify",
            pb.ClassifyRequest(texts=TEXTS, model="sat-demo", return_scores=pb.SCORE_KIND_PROBABILITIES),
        ),
        (
            "Segment",
            pb.SegmentRequest(texts=TEXTS, model="sat-demo", threshold=0.5, return_probabilities=True),
        ),
        ("Embed", pb.EmbedRequest(texts=TEXTS, model="distilbert-demo", normalize=True)),
        (
            "FillMask",
            pb.FillMaskRequest(texts=["Paris is the [MASK] of [MASK]."], model="distilbert-demo-fill-mask"),
        ),
    ]
    for rpc, request in calls:
        want = _answer(await getattr(stub, rpc)(request))
        got = _answer(await getattr(remote, rpc)(request))
        _close(got, want, rpc)
    requests = [
        pb.TranslateRequest(
            texts=[text], source_lang="eng_Latn", target_lang="fra_Latn", model="nllb-demo", request_id=str(i)
        )
        for i, text in enumerate(TEXTS)
    ]

    async def stream(on: Stub) -> list[Any]:
        """Replies come as they finish: matched to their requests by request_id."""
        replies = [r async for r in on.TranslateStream(iter(requests))]
        assert sorted(r.request_id for r in replies) == sorted(r.request_id for r in requests)
        return [_answer(r) for r in sorted(replies, key=lambda r: int(r.request_id))]

    _close(await stream(remote), await stream(stub), "TranslateStream")
    listed = await remote.ListModels(pb.ListModelsRequest())
    backends = {m.name: (m.backend, m.provider) for m in listed.models}
    assert backends["nllb-demo"] == ("triton", "triton:nllb-demo-fp32")


def _triton_metric(triton: TritonServer, model: str, *metrics: str) -> tuple[float, ...]:
    with urllib.request.urlopen(f"http://127.0.0.1:{triton.ports.metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()

    def value(metric: str) -> float:
        found = re.search(rf'^{metric}{{model="{re.escape(model)}",version="1"}} (\S+)$', text, re.MULTILINE)
        assert found, f"{metric} for {model} missing from Triton's metrics"
        return float(found.group(1))

    return tuple(value(metric) for metric in metrics)


def _triton_counts(triton: TritonServer, model: str) -> tuple[float, float]:
    count, executions = _triton_metric(triton, model, "nv_inference_count", "nv_inference_exec_count")
    return count, executions


async def _settled_counts(
    triton: TritonServer, model: str, at_least: float = 0.0, timeout: float = 15.0
) -> tuple[float, float]:
    # Triton records a request's statistics after its response has gone out, so a client can hold every
    # reply while the counters still lag: read until the count has reached `at_least` and two reads a
    # moment apart agree (or the time is up, and the caller's assertion says what was seen).
    deadline = time.monotonic() + timeout
    last = _triton_counts(triton, model)
    while True:
        await asyncio.sleep(0.25)
        now = _triton_counts(triton, model)
        if (now == last and now[0] >= at_least) or time.monotonic() > deadline:
            return now
        last = now


async def test_triton_batches_concurrent_requests(exported: Exported, triton: TritonServer) -> None:
    # The gateway sends every text alone (max_batch_size 1): any batching seen is Triton's.
    server = GatewayServer(_config(exported, triton, batch=1, names=("distilbert-demo",)))
    await server.start()
    try:
        count_before, exec_before = await _settled_counts(triton, "distilbert-demo-fp32")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            remote = polyglot_pb2_grpc.PolyglotStub(chan)
            texts = [f"{TEXTS[i % 3]} {i}" for i in range(48)]
            replies = await asyncio.gather(*(remote.Embed(pb.EmbedRequest(texts=[t])) for t in texts))
        assert all(len(r.embeddings) == 1 for r in replies)
        count, executions = await _settled_counts(triton, "distilbert-demo-fp32", at_least=count_before + 48)
        assert count - count_before == 48
        assert executions - exec_before < 48, (
            "Triton ran every request alone: its dynamic batcher did nothing"
        )
    finally:
        await server.stop(grace=1)


async def test_a_full_triton_queue_is_resource_exhausted(exported: Exported, triton: TritonServer) -> None:
    # One text per Triton request, eight in flight, against a Triton queue that holds one.
    server = GatewayServer(_config(exported, triton, batch=1, names=(TIGHT,), in_flight=8))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            remote = polyglot_pb2_grpc.PolyglotStub(chan)
            options = pb.TranslateOptions(beam_size=4, max_new_tokens=48)
            calls = [
                remote.Translate(
                    pb.TranslateRequest(
                        texts=[f"{TEXTS[0]} {i}"],
                        source_lang="eng_Latn",
                        target_lang="fra_Latn",
                        options=options,
                    )
                )
                for i in range(12)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await server.stop(grace=1)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert any(isinstance(r, pb.TranslateResponse) for r in results)
    assert refused, "12 concurrent requests fit a Triton queue of one: the test could not fail"
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "queue" in (error.details() or "")


async def _health(channel: grpc.aio.Channel, model: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    service = f"{SERVICE}/{model}" if model else ""  # "": the gateway as a whole
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def _until(check: Callable[[], Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        await asyncio.sleep(0.1)


async def test_killed_triton_is_unavailable_then_recovers(
    triton: TritonServer, triton_channel: grpc.aio.Channel
) -> None:
    remote = polyglot_pb2_grpc.PolyglotStub(triton_channel)
    request = pb.EmbedRequest(texts=TEXTS, model="distilbert-demo")
    before = _answer(await remote.Embed(request))
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(triton_channel, "distilbert-demo") == serving
    in_flight = [
        asyncio.ensure_future(
            remote.Translate(
                pb.TranslateRequest(
                    texts=[f"{TEXTS[0]} {i}"], source_lang="eng_Latn", target_lang="fra_Latn", model=HELD
                ),
                timeout=60,
            )
        )
        for i in range(4)
    ]

    async def queued_in_triton() -> bool:  # held there: Triton waits for a batch of 8
        (pending,) = _triton_metric(triton, f"{HELD}-fp32", "nv_inference_pending_request_count")
        return pending == 4

    await _until(queued_in_triton, 30)
    assert not any(call.done() for call in in_flight)
    triton.kill()
    interrupted = await asyncio.gather(*in_flight, return_exceptions=True)
    codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in interrupted]
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 4, interrupted
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await remote.Embed(request, timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert time.monotonic() - started < 5
    assert "triton" in (failed.value.details() or "").lower()
    await _until(partial(_all, triton_channel, not_serving), 5)
    assert await _health(triton_channel, "") == serving  # the gateway itself still serves
    listed = await remote.ListModels(pb.ListModelsRequest())
    assert not any(m.ready for m in listed.models)

    triton.start()
    triton.wait_ready(120)
    await _until(partial(_all, triton_channel, serving), 10)
    _close(_answer(await remote.Embed(request)), before)
    listed = await remote.ListModels(pb.ListModelsRequest())
    assert all(m.ready for m in listed.models)
    reply = await remote.Translate(
        pb.TranslateRequest(
            texts=TEXTS[:1], source_lang="eng_Latn", target_lang="fra_Latn", model="nllb-demo"
        )
    )
    assert reply.translations[0].hypotheses[0].token_ids


async def _all(channel: grpc.aio.Channel, status: int) -> bool:
    """Whether every model's health is `status`."""
    return all([await _health(channel, name) == status for name, _ in MODELS])


def test_pgw_triton_up_and_down(repository: Path, tmp_path: Path) -> None:
    ports = [str(free_port()) for _ in range(3)]
    state = tmp_path / "state"
    args = [
        "--grpc-port",
        ports[0],
        "--http-port",
        ports[1],
        "--metrics-port",
        ports[2],
        "--state-dir",
        str(state),
    ]
    up = CliRunner().invoke(app, ["triton", "up", "--repository", str(repository), *args])
    try:
        assert up.exit_code == 0, up.output
        assert f"gRPC localhost:{ports[0]}" in up.output
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=5) as reply:
            assert reply.status == 200
        again = CliRunner().invoke(app, ["triton", "up", "--repository", str(repository), *args])
        assert again.exit_code == 1
        assert "`pgw triton down` first" in " ".join(again.output.split())
    finally:
        down = CliRunner().invoke(app, ["triton", "down", "--state-dir", str(state)])
    assert down.exit_code == 0, down.output
    assert "stopped" in down.output
    with pytest.raises(OSError, match="Connection refused"):
        urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=2)
