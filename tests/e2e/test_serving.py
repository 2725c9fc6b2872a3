"""End to end over loopback: every rpc against PyTorch, health, reflection, metrics and error statuses."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModel, AutoTokenizer

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.samples import probe_sentences
from gateway.server import GatewayServer
from tests.e2e.conftest import hold

Stub = polyglot_pb2_grpc.PolyglotStub
TEXTS = [s.text for s in probe_sentences()][:8]


async def test_embed_matches_pytorch_mean_pooling(stub: Stub, demo_dir: Path) -> None:
    reply = await stub.Embed(pb.EmbedRequest(texts=TEXTS, pooling=pb.POOLING_MEAN))
    tok = AutoTokenizer.from_pretrained(demo_dir / "distilbert-demo")
    encoder = AutoModel.from_pretrained(demo_dir / "distilbert-demo", use_safetensors=True).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    got = np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert np.all(cosine > 1 - 1e-4)
    assert reply.dimensions == expected.shape[1]
    assert reply.model == "distilbert-demo"
    assert reply.usage.input_tokens == int(batch["attention_mask"].sum())
    assert reply.timing.total_ms >= reply.timing.inference_ms > 0


async def test_fill_mask_over_grpc(stub: Stub) -> None:
    reply = await stub.FillMask(pb.FillMaskRequest(texts=["Der Zug fährt um [MASK] Uhr."], top_k=4))
    (mask,) = reply.results[0].masks
    assert len(mask.predictions) == 4
    scores = [p.score for p in mask.predictions]
    assert scores == sorted(scores, reverse=True)
    assert reply.mask_token == "[MASK]"


async def test_list_models_describes_each_model(stub: Stub) -> None:
    reply = await stub.ListModels(pb.ListModelsRequest())
    models = {m.name: m for m in reply.models}
    assert set(models) == {"sat-demo", "distilbert-demo", "distilbert-demo-fill-mask", "nllb-demo"}
    nllb = models["nllb-demo"]
    assert nllb.task == "translation"
    assert nllb.variant == "fp32"
    assert nllb.backend == "onnxruntime"
    assert nllb.provider == "CPUExecutionProvider"
    assert nllb.random_weights
    assert nllb.is_default
    assert "fra_Latn" in nllb.languages
    assert {m.name for m in nllb.accuracy.metrics} >= {"token_agreement", "max_logprob_error"}
    assert models["distilbert-demo"].dimensions > 0
    assert models["sat-demo"].labels


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "polyglot.v1.Polyglot", "polyglot.v1.Polyglot/nllb-demo"):
        status = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert "polyglot.v1.Polyglot" in names
    # Reflection v1, what grpcurl asks first: the same messages under grpc.reflection.v1.
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="polyglot.v1.Polyglot"),
    ]
    listing, described = [r async for r in v1(iter(asks))]
    assert "polyglot.v1.Polyglot" in {s.name for s in listing.list_services_response.service}
    assert described.file_descriptor_response.file_descriptor_proto
    # Health/List: every service's status
    listed = await health.List(health_pb2.HealthListRequest())
    assert listed.statuses["polyglot.v1.Polyglot/nllb-demo"].status == health_pb2.HealthCheckResponse.SERVING
    assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING


INVALID = grpc.StatusCode.INVALID_ARGUMENT
ERRORS = [
    ("Embed", pb.EmbedRequest(), INVALID, "at least one text"),
    ("Embed", pb.EmbedRequest(texts=["x"], model="nope"), INVALID, "unknown model 'nope'"),
    ("Embed", pb.EmbedRequest(texts=["x"], model="nllb-demo"), INVALID, "is a translation model"),
    ("Embed", pb.EmbedRequest(texts=["x"] * 257), INVALID, "limit of 256"),
    ("Embed", pb.EmbedRequest(texts=["x" * 20001]), INVALID, "limit of 20000"),
    ("Embed", pb.EmbedRequest(texts=["x"], pooling=7), INVALID, "pooling"),
    ("FillMask", pb.FillMaskRequest(texts=["no mask"]), INVALID, "mask"),
    (
        "Translate",
        pb.TranslateRequest(texts=["x"], source_lang="en", target_lang="fr_Latn"),
        INVALID,
        "fra_Latn",
    ),
    (
        "Translate",
        pb.TranslateRequest(
            texts=["x"], source_lang="en", target_lang="fr", options=pb.TranslateOptions(beam_size=99)
        ),
        INVALID,
        "beam_size: 99",
    ),
    ("Classify", pb.ClassifyRequest(texts=["x"], threshold=2), INVALID, "threshold: 2"),
    ("Segment", pb.SegmentRequest(texts=["x"] * 300), INVALID, "limit of 256"),
    (
        "Translate",
        pb.TranslateRequest(texts=["x"], source_lang="fr"),
        INVALID,
        "target_lang: a language code is required",
    ),
]


@pytest.mark.parametrize(("rpc", "request_message", "code", "message"), ERRORS)
async def test_errors_have_a_status_and_the_server_goes_on(
    stub: Stub, rpc: str, request_message: object, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, rpc)(request_message)
    assert caught.value.code() == code
    assert message in (caught.value.details() or "")
    reply = await stub.Embed(pb.EmbedRequest(texts=["still serving"]))
    assert len(reply.embeddings) == 1


async def test_the_server_answers_deadline_exceeded_itself(stub: Stub, gateway: GatewayServer) -> None:
    """A request whose deadline passes while it waits behind a held batch: the server answers
    DEADLINE_EXCEEDED with its own message (not gRPC's cancellation), and its texts never run."""
    with hold(gateway, "distilbert-demo") as held:
        first = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(texts=["held"])))
        await held.started.wait()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not finish within its deadline" in (caught.value.details() or "")
        assert held.queue_depth == 0, "the expired request's texts are still queued"
    assert (await first).embeddings
    assert held.batches == 1


async def test_metrics_endpoint(stub: Stub, gateway: GatewayServer) -> None:
    await stub.Embed(pb.EmbedRequest(texts=TEXTS))
    url = f"http://127.0.0.1:{gateway.config.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    ok = ("pgw_requests_total", (("code", "OK"), ("model", "distilbert-demo"), ("rpc", "Embed")))
    assert samples[ok] >= 1
    names = {name for name, _ in samples}
    for expected in (
        "pgw_batch_size_bucket",
        "pgw_batch_tokens_bucket",
        "pgw_queue_duration_seconds_bucket",
        "pgw_inference_duration_seconds_bucket",
        "pgw_request_duration_seconds_bucket",
        "pgw_queue_depth",
        "pgw_input_tokens_total",
        "pgw_model_info",
    ):
        assert expected in names, expected
    info = [labels for name, labels in samples if name == "pgw_model_info"]
    assert info[0][:2] == (("backend", "onnxruntime"), ("device", "cpu"))
