"""One text, one answer: a reply for a text is the same bits alone and inside batches of other sizes,
lengths and orders (every encoder task in fp32 and int8; int8 translation, greedy and beam)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import BatchingConfig, ModelConfig, ServerConfig
from gateway.manifest import Manifest, Task
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import GatewayServer

Exported = Callable[[Task], tuple[Path, Manifest]]
Stub = polyglot_pb2_grpc.PolyglotStub
VARIANTS = ("fp32", "int8")
TEXT = "Der Zug nach Wien fährt um [MASK] Uhr ab, sagt sie."
# Neighbours shorter and longer than the text (so it is padded in some batches and not in others), in
# scripts whose activations differ in range from the text's.
SHORT, LONG = "Ja [MASK].", " ".join(["这是一个很长的句子，[MASK]用来测试。"] * 6)
MIDDLE = "Пожалуйста, [MASK] закройте дверь."
BATCHES = ((SHORT, TEXT), (TEXT, LONG, LONG, LONG), (LONG, MIDDLE, TEXT, SHORT, SHORT, MIDDLE, SHORT))


@pytest.fixture(scope="module")
async def served(exported: Exported) -> AsyncIterator[tuple[GatewayServer, Stub]]:
    tasks: tuple[Task, ...] = ("embedding", "token-classification", "fill-mask")
    models = tuple(
        ModelConfig(name=f"{task}-{variant}", path=exported(task)[0], variant=variant)
        for task in tasks
        for variant in VARIANTS
    )
    config = ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models=models,
        batching=BatchingConfig(max_batch_size=16, max_queue_delay_ms=0, max_padding_ratio=0),
    )
    server = GatewayServer(config)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, polyglot_pb2_grpc.PolyglotStub(channel)
    await server.stop(grace=1)


class BatchSizes:
    """The sizes of the batches a served model runs."""

    def __init__(self, server: GatewayServer, name: str) -> None:
        self.batcher = next(e.model for e in server.registry.all() if e.name == name).batcher
        self.sizes: list[int] = []

    def __enter__(self) -> BatchSizes:
        self._run = self.batcher._run_batch

        async def recorded(items: list[Any]) -> Any:
            self.sizes.append(len(items))
            return await self._run(items)

        self.batcher._run_batch = recorded
        return self

    def __exit__(self, *exc: object) -> None:
        self.batcher._run_batch = self._run


Call = Callable[[Stub, str, Sequence[str]], Awaitable[Sequence[Any]]]


async def _embed(stub: Stub, model: str, texts: Sequence[str]) -> Sequence[Any]:
    return (await stub.Embed(pb.EmbedRequest(texts=list(texts), model=model))).embeddings


async def _classify(stub: Stub, model: str, texts: Sequence[str]) -> Sequence[Any]:
    request = pb.ClassifyRequest(texts=list(texts), model=model, return_scores=pb.SCORE_KIND_PROBABILITIES)
    return (await stub.Classify(request)).results


async def _segment(stub: Stub, model: str, texts: Sequence[str]) -> Sequence[Any]:
    request = pb.SegmentRequest(texts=list(texts), model=model, return_probabilities=True)
    return (await stub.Segment(request)).results


async def _fill_mask(stub: Stub, model: str, texts: Sequence[str]) -> Sequence[Any]:
    return (await stub.FillMask(pb.FillMaskRequest(texts=list(texts), model=model, top_k=8))).results


CALLS: dict[str, tuple[str, Call]] = {
    "embed": ("embedding", _embed),
    "classify": ("token-classification", _classify),
    "segment": ("token-classification", _segment),
    "fill-mask": ("fill-mask", _fill_mask),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rpc", CALLS)
async def test_a_text_gives_the_same_bits_in_any_batch(
    served: tuple[GatewayServer, Stub], rpc: str, variant: str
) -> None:
    server, stub = served
    task, call = CALLS[rpc]
    model = f"{task}-{variant}"
    with BatchSizes(server, model) as batches:
        (alone,) = await call(stub, model, [TEXT])
        assert batches.sizes == [1]
        for batch in BATCHES:
            batches.sizes.clear()
            results = await call(stub, model, batch)
            assert batches.sizes == [len(batch)], "the request's texts ran as one batch"
            for index, text in enumerate(batch):
                if text == TEXT:
                    # protobuf floats are float32: equal serializations are equal bits
                    assert results[index].SerializeToString(deterministic=True) == alone.SerializeToString(
                        deterministic=True
                    ), f"{rpc} {variant}: the text's reply changed in the batch {batch!r}"


@pytest.fixture(scope="module")
async def translator(exported: Exported) -> AsyncIterator[Stub]:
    config = ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        models=(ModelConfig(name="nllb", path=exported("translation")[0], variant="int8"),),
    )
    server = GatewayServer(config)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield polyglot_pb2_grpc.PolyglotStub(channel)
    await server.stop(grace=1)


@pytest.mark.parametrize("beam", [1, 3])
async def test_an_int8_translation_is_the_same_in_any_batch(translator: Stub, beam: int) -> None:
    text = "Der Zug nach Wien fährt um acht Uhr ab."
    others = ["Ja.", " ".join(["这是一个很长的句子，用来测试。"] * 4), "Пожалуйста, закройте дверь."]
    options = pb.TranslateOptions(beam_size=beam, max_new_tokens=12, return_scores=True)

    async def translate(texts: list[str]) -> Sequence[Any]:
        request = pb.TranslateRequest(
            texts=texts, source_lang="deu_Latn", target_lang="fra_Latn", model="nllb", options=options
        )
        return (await translator.Translate(request)).translations

    (alone,) = await translate([text])
    for batch in ([others[0], text], [text, *others], [others[1], text, others[2]]):
        translations = await translate(batch)
        mine = translations[batch.index(text)]
        assert mine.SerializeToString(deterministic=True) == alone.SerializeToString(deterministic=True)
