"""200 concurrent mixed requests: each reply equals the reply to the same request sent alone, and batches
of more than one item formed."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import grpc
import pytest

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.samples import sample_sentences
from gateway.server import GatewayServer

Stub = polyglot_pb2_grpc.PolyglotStub


def _requests(count: int) -> list[tuple[str, object]]:
    rng = random.Random(7)
    sentences = [s.text for s in sample_sentences()]
    made: list[tuple[str, object]] = []
    for index in range(count):
        texts = rng.sample(sentences, rng.randint(1, 3))
        kind = index % 5
        if kind == 0:
            options = pb.TranslateOptions(max_new_tokens=rng.randint(3, 8), beam_size=rng.choice([1, 1, 2]))
            target = rng.choice(["fra_Latn", "deu_Latn", "zho_Hans"])
            made.append(
                (
                    "Translate",
                    pb.TranslateRequest(
                        texts=texts, source_lang="eng_Latn", target_lang=target, options=options
                    ),
                )
            )
        elif kind == 1:
            made.append(("Embed", pb.EmbedRequest(texts=texts, normalize=bool(index % 2))))
        elif kind == 2:
            made.append(("Classify", pb.ClassifyRequest(texts=texts, format=pb.LABEL_FORMAT_BIO)))
        elif kind == 3:
            made.append(("Segment", pb.SegmentRequest(texts=[" ".join(texts * 3)], threshold=0.5)))
        else:
            masked = [t.replace(" ", " [MASK] ", 1) if " " in t else t + " [MASK]" for t in texts]
            made.append(("FillMask", pb.FillMaskRequest(texts=masked, top_k=3)))
    return made


def _batch_size_sum(body: str) -> tuple[float, float]:
    """Sum and count of pgw_batch_size over every model."""
    total = count = 0.0
    for line in body.splitlines():
        if line.startswith("pgw_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("pgw_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


async def test_concurrent_mixed_requests_equal_their_solo_replies(stub: Stub, gateway: GatewayServer) -> None:
    url = f"http://127.0.0.1:{gateway.config.metrics_port}/metrics"
    requests = _requests(200)
    solo = []
    for rpc, message in requests:
        solo.append(await getattr(stub, rpc)(message))
    before = _batch_size_sum(urllib.request.urlopen(url, timeout=5).read().decode())
    together = await asyncio.gather(*(getattr(stub, rpc)(message) for rpc, message in requests))
    after = _batch_size_sum(urllib.request.urlopen(url, timeout=5).read().decode())
    for (rpc, _), alone, mixed in zip(requests, solo, together, strict=True):
        _clear_timing(alone)
        _clear_timing(mixed)
        if rpc == "Embed":
            for a, b in zip(alone.embeddings, mixed.embeddings, strict=True):
                assert max(abs(x - y) for x, y in zip(a.values, b.values, strict=True)) < 1e-4
        elif rpc == "FillMask":
            assert _top_ids(alone) == _top_ids(mixed)
        elif rpc == "Translate":  # the same tokens; scores up to rounding (other batches pad otherwise)
            assert _token_ids(alone) == _token_ids(mixed)
            for a, b in zip(alone.translations, mixed.translations, strict=True):
                assert [h.score for h in a.hypotheses] == pytest.approx(
                    [h.score for h in b.hypotheses], rel=1e-5
                )
        elif rpc == "Classify":
            assert [[t.label for t in r.tokens] for r in alone.results] == [
                [t.label for t in r.tokens] for r in mixed.results
            ]
        else:
            assert alone == mixed, rpc
    items, batches = after[0] - before[0], after[1] - before[1]
    assert batches > 0
    assert items / batches > 1.0, "concurrent requests should have shared batches"


def _clear_timing(reply: object) -> None:
    timing = getattr(reply, "timing", None)
    if timing is not None:
        reply.ClearField("timing")  # type: ignore[attr-defined]


def _token_ids(reply: pb.TranslateResponse) -> list[list[list[int]]]:
    return [[list(h.token_ids) for h in t.hypotheses] for t in reply.translations]


def _top_ids(reply: pb.FillMaskResponse) -> list[list[list[int]]]:
    return [[[p.token_id for p in m.predictions] for m in r.masks] for r in reply.results]


async def test_status_codes_do_not_disturb_other_requests(stub: Stub) -> None:
    good = [stub.Embed(pb.EmbedRequest(texts=[f"text number {i}"])) for i in range(20)]
    bad = [stub.Embed(pb.EmbedRequest(texts=["x" * 20001])) for _ in range(5)]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(isinstance(r, pb.EmbedResponse) for r in results[:20])
    assert all(
        isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INVALID_ARGUMENT
        for r in results[20:]
    )
