"""The translation engine in a running server: a request cancelled mid-flight leaves the batch at the next
step (the rows-in-flight metric says so) and its neighbour's output does not change; tokens stream."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import GatewayServer
from tests.e2e.conftest import stepper

Stub = polyglot_pb2_grpc.PolyglotStub


def _rows_in_flight(gateway: GatewayServer) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{gateway.config.metrics_port}/metrics", timeout=5).read()
    for line in body.decode().splitlines():
        if line.startswith('pgw_engine_rows_in_flight{model="nllb-demo"'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no pgw_engine_rows_in_flight for nllb-demo")


def _request(text: str, **options: object) -> pb.TranslateRequest:
    return pb.TranslateRequest(
        texts=[text], source_lang="en", target_lang="fr", options=pb.TranslateOptions(**options)
    )


async def test_a_cancelled_translation_leaves_at_the_next_step(stub: Stub, gateway: GatewayServer) -> None:
    kept_request = _request("A sentence that keeps going.", max_new_tokens=30)
    alone = await stub.Translate(kept_request)
    with stepper(gateway, "nllb-demo") as engine:
        leaving = stub.Translate(_request("This one leaves.", beam_size=4, max_new_tokens=30))
        kept = asyncio.ensure_future(stub.Translate(kept_request))
        await engine.waiting()
        while engine.engine.rows_in_flight < 5:  # both joined (they may take two steps to)
            await engine.step()
        assert _rows_in_flight(gateway) == 5
        leaving.cancel()
        texts = engine.engine._texts
        while not any(t.request.future.cancelled() for t in texts):  # the server saw the client leave
            await asyncio.sleep(0.005)
        await engine.step()  # the step already under way (all five rows), then: the beams are gone
        assert _rows_in_flight(gateway) == 1
    with pytest.raises(asyncio.CancelledError):
        await leaving
    reply = await kept
    assert [list(h.token_ids) for h in reply.translations[0].hypotheses] == [
        list(h.token_ids) for h in alone.translations[0].hypotheses
    ]


async def test_translate_tokens_streams_what_translate_answers(stub: Stub) -> None:
    request = _request("Stream me, token by token.", max_new_tokens=12)
    unary = await stub.Translate(request)
    tokens: list[int] = []
    final = None
    async for message in stub.TranslateTokens(request):
        if message.HasField("result"):
            final = message.result
        else:
            assert message.text_index == 0
            tokens.extend(message.token_ids)
    assert final is not None
    assert tokens == list(unary.translations[0].hypotheses[0].token_ids)
    assert [list(h.token_ids) for h in final.translations[0].hypotheses] == [tokens]


async def test_translate_tokens_refuses_beam_search(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stub.TranslateTokens(_request("No beams here.", beam_size=4)):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "greedy or sampled" in (refused.value.details() or "")
