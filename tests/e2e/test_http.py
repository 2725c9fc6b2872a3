"""HTTP/JSON on a real server: the `openai` and `libretranslatepy` clients against the same models as gRPC,
our JSON routes against the rpcs they are made from, and the errors every bad request gets."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
from libretranslatepy import LibreTranslateAPI

from gateway.config import BatchingConfig, LimitsConfig, ModelConfig, ServerConfig
from gateway.export.demo import DEMO_MODELS
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import GatewayServer
from gateway.web.native import path_of, unary_methods
from tests.e2e.conftest import Exported, free_port, hold

KEY = "http-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
TEXTS = ["The train leaves at eight.", "Der Zug fährt um acht Uhr ab.", "Il treno parte alle otto."]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
async def server(exported: Exported) -> AsyncIterator[GatewayServer]:
    models = tuple(
        ModelConfig(name=demo.name, path=exported(demo.task)[0], variant="fp32") for demo in DEMO_MODELS
    )
    config = ServerConfig.load(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        http_port=free_port(),
        models=models,
        api_key=KEY,
        batching=BatchingConfig(max_batch_size=16, max_queue_delay_ms=2),
        limits=LimitsConfig(max_request_chars=20_000, max_document_bytes=50_000),
    )
    gateway = GatewayServer(config)
    await gateway.start()
    yield gateway
    await gateway.stop(grace=1, drain=0)


@pytest.fixture(scope="module")
async def stub(server: GatewayServer) -> AsyncIterator[polyglot_pb2_grpc.PolyglotStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield polyglot_pb2_grpc.PolyglotStub(channel)


def base(server: GatewayServer) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture
async def http(server: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base(server), headers=headers, timeout=120) as client:
        yield client


@pytest.fixture
def oai(server: GatewayServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base(server)}/v1", api_key=KEY, max_retries=0)


async def grpc_vectors(stub: polyglot_pb2_grpc.PolyglotStub, texts: list[str]) -> np.ndarray:
    reply = await stub.Embed(pb.EmbedRequest(texts=texts, normalize=True), metadata=AUTH)
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float64)


# ------------------------------------------------------------------------------------------------ OpenAI


async def test_openai_embeddings_are_the_grpc_vectors(
    oai: openai.AsyncOpenAI, stub: polyglot_pb2_grpc.PolyglotStub
) -> None:
    want = await grpc_vectors(stub, TEXTS)
    reply = await oai.embeddings.create(model="distilbert-demo", input=TEXTS)
    got = np.array([d.embedding for d in reply.data])
    assert [d.index for d in reply.data] == [0, 1, 2]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # unit vectors, as OpenAI's
    assert reply.model == "distilbert-demo"
    grpc_reply = await stub.Embed(pb.EmbedRequest(texts=TEXTS), metadata=AUTH)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == grpc_reply.usage.input_tokens

    one = await oai.embeddings.create(model="distilbert-demo", input=TEXTS[1])
    np.testing.assert_allclose(one.data[0].embedding, want[1], atol=1e-6, rtol=0)


async def test_openai_base64_and_token_arrays(
    oai: openai.AsyncOpenAI,
    http: httpx.AsyncClient,
    stub: polyglot_pb2_grpc.PolyglotStub,
    server: GatewayServer,
) -> None:
    want = await grpc_vectors(stub, TEXTS[:2])
    # the openai client asks for base64 by default and decodes it; ask for it explicitly and decode here
    raw = (
        await http.post(
            "/v1/embeddings",
            json={"model": "distilbert-demo", "input": TEXTS[:2], "encoding_format": "base64"},
        )
    ).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    np.testing.assert_allclose(np.stack(decoded), want, atol=1e-6, rtol=0)

    tokenizer = next(e for e in server.registry.all() if e.name == "distilbert-demo").model.model.tokenizer
    ids = [e.ids for e in tokenizer.encode_batch(TEXTS[:2], add_special_tokens=False)]
    by_ids = await oai.embeddings.create(model="distilbert-demo", input=ids)
    np.testing.assert_allclose([d.embedding for d in by_ids.data], want, atol=1e-6, rtol=0)
    single = await oai.embeddings.create(model="distilbert-demo", input=ids[0])
    np.testing.assert_allclose(single.data[0].embedding, want[0], atol=1e-6, rtol=0)


async def test_openai_lists_the_models(oai: openai.AsyncOpenAI, server: GatewayServer) -> None:
    listed = [m.id async for m in oai.models.list()]
    assert listed == [entry.name for entry in server.registry.all()]
    assert (await oai.models.retrieve("nllb-demo")).id == "nllb-demo"
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("gpt-4")


async def test_openai_errors_reach_the_client_as_its_exceptions(server: GatewayServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base(server)}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert missing.value.code == "model_not_found"
    assert "distilbert-demo" in missing.value.message  # it names the models served here
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        await client.embeddings.create(model="distilbert-demo", input="x", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="fill-mask model"):
        await client.embeddings.create(model="distilbert-demo-fill-mask", input="x")
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        await client.embeddings.create(model="distilbert-demo", input=[[10**9]])
    with pytest.raises(openai.BadRequestError, match="longer than the model's limit"):
        await client.embeddings.create(model="distilbert-demo", input="word " * 1000)
    wrong = openai.AsyncOpenAI(base_url=f"{base(server)}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.embeddings.create(model="distilbert-demo", input="x")
    with pytest.raises(openai.APIStatusError) as large:
        await client.embeddings.create(model="distilbert-demo", input=["x" * 1000] * 200)
    assert large.value.status_code == 413
    # and it still serves
    assert (await client.embeddings.create(model="distilbert-demo", input="x")).data


# ---------------------------------------------------------------------------------------- LibreTranslate


async def test_libretranslatepy_translates_detects_and_lists(
    server: GatewayServer, stub: polyglot_pb2_grpc.PolyglotStub
) -> None:
    lt = LibreTranslateAPI(base(server), api_key=KEY)
    text = "The train leaves at eight. It is late!"
    got = await asyncio.to_thread(lt.translate, text, "en", "de")
    want = await stub.TranslateDocument(
        pb.TranslateDocumentRequest(document=text, source_lang="eng_Latn", target_lang="deu_Latn"),
        metadata=AUTH,
    )
    assert got == want.document

    languages = await asyncio.to_thread(lt.languages)
    by_code = {language["code"]: language for language in languages}
    assert by_code["en"]["name"] == "English"
    assert by_code["zh-Hans"]["name"] == "Chinese (Simplified)"
    assert by_code["ace_Arab"]["name"] == "Acehnese (Arabic)"  # no ISO 639-1 code: its FLORES-200 one
    assert len(languages) == 202
    assert "de" in by_code["en"]["targets"]

    detected = await asyncio.to_thread(lt.detect, "Der Zug fährt um acht Uhr ab und kommt um neun an.")
    assert detected[0]["language"] == "de"
    assert 50 < detected[0]["confidence"] <= 100
    assert detected == sorted(detected, key=lambda d: -d["confidence"])


async def test_libretranslatepy_errors_are_http_errors(server: GatewayServer) -> None:
    lt = LibreTranslateAPI(base(server), api_key=KEY)
    with pytest.raises(urllib.error.HTTPError) as unknown:
        await asyncio.to_thread(lt.translate, "Hello", "en", "xx")
    assert unknown.value.code == 400
    assert json.loads(unknown.value.read()) == {"error": "'xx' is not supported"}
    with pytest.raises(urllib.error.HTTPError) as empty:
        await asyncio.to_thread(lt.translate, "", "en", "de")
    assert empty.value.code == 400
    assert "missing q" in json.loads(empty.value.read())["error"]
    keyless = LibreTranslateAPI(base(server), api_key="wrong")
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(keyless.translate, "Hello", "en", "de")
    assert refused.value.code == 403
    assert "API key" in json.loads(refused.value.read())["error"]
    # /languages needs no key, as LibreTranslate's
    assert await asyncio.to_thread(LibreTranslateAPI(base(server)).languages)


async def test_libretranslate_json_batches_auto_and_alternatives(
    http: httpx.AsyncClient, stub: polyglot_pb2_grpc.PolyglotStub
) -> None:
    texts = ["Der Zug fährt um acht Uhr ab.", "The train leaves at eight o'clock in the morning."]
    reply = await http.post("/translate", json={"q": texts, "source": "auto", "target": "fr", "api_key": KEY})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(body["translatedText"]) == 2
    assert [d["language"] for d in body["detectedLanguage"]] == ["de", "en"]
    for text, translated in zip(texts, body["translatedText"], strict=True):
        want = await stub.TranslateDocument(
            pb.TranslateDocumentRequest(document=text, source_lang="auto", target_lang="fra_Latn"),
            metadata=AUTH,
        )
        assert translated == want.document

    nbest = (
        await http.post("/translate", json={"q": texts[1], "source": "en", "target": "de", "alternatives": 2})
    ).json()
    want_nbest = await stub.Translate(
        pb.TranslateRequest(
            texts=[texts[1]],
            source_lang="en",
            target_lang="de",
            options=pb.TranslateOptions(beam_size=3, num_return=3),
        ),
        metadata=AUTH,
    )
    hypotheses = [h.text for h in want_nbest.translations[0].hypotheses]
    assert nbest == {"translatedText": hypotheses[0], "alternatives": hypotheses[1:]}

    html = "<p>The train <b>leaves</b> at eight.</p>"
    translated_html = (
        await http.post("/translate", json={"q": html, "source": "en", "target": "de", "format": "html"})
    ).json()
    want_html = await stub.TranslateDocument(
        pb.TranslateDocumentRequest(
            document=html, format=pb.DOCUMENT_FORMAT_HTML, source_lang="en", target_lang="de"
        ),
        metadata=AUTH,
    )
    assert translated_html == {"translatedText": want_html.document}
    assert translated_html["translatedText"].startswith("<p>")
    bad = await http.post("/translate", json={"q": "x", "source": "en", "target": "de", "format": "pdf"})
    assert bad.status_code == 400
    assert bad.json() == {"error": "'pdf' format is not supported"}


async def test_libretranslate_translates_a_file(
    http: httpx.AsyncClient, stub: polyglot_pb2_grpc.PolyglotStub
) -> None:
    document = "# Title\n\nThe train leaves at eight. It is *late*.\n"
    reply = await http.post(
        "/translate_file",
        data={"source": "en", "target": "de"},
        files={"file": ("notes.md", document.encode(), "text/markdown")},
    )
    assert reply.status_code == 200, reply.text
    url = reply.json()["translatedFileUrl"]
    downloaded = await http.get(url)
    assert downloaded.status_code == 200
    assert "notes.md" in downloaded.headers["content-disposition"]
    want = await stub.TranslateDocument(
        pb.TranslateDocumentRequest(
            document=document, format=pb.DOCUMENT_FORMAT_MARKDOWN, source_lang="en", target_lang="de"
        ),
        metadata=AUTH,
    )
    assert downloaded.content.decode() == want.document
    refused = await http.post(
        "/translate_file",
        data={"source": "en", "target": "de"},
        files={"file": ("a.pdf", b"%PDF", "application/pdf")},
    )
    assert refused.status_code == 400
    assert "not supported" in refused.json()["error"]
    assert (await http.get("/download_file/nothing-here.md")).status_code == 404


# ------------------------------------------------------------------------------------------ native JSON


async def test_every_unary_rpc_has_a_json_route_that_answers_as_grpc(
    http: httpx.AsyncClient, stub: polyglot_pb2_grpc.PolyglotStub
) -> None:
    requests: dict[str, dict[str, Any]] = {
        "Embed": {"texts": TEXTS, "normalize": True},
        "Classify": {"texts": TEXTS, "format": "LABEL_FORMAT_BIO"},
        "Segment": {"texts": ["One. Two! Three?"], "return_probabilities": True},
        "FillMask": {"texts": ["The train leaves at [MASK]."], "top_k": 3},
        "Translate": {
            "texts": TEXTS[:1],
            "source_lang": "en",
            "target_lang": "de",
            "options": {"beam_size": 2},
        },
        "DetectLanguage": {"texts": TEXTS},
        "TranslateDocument": {"document": "One. Two.", "source_lang": "en", "target_lang": "fr"},
        "ListModels": {},
    }
    assert set(requests) == {m.name for m in unary_methods()}, "a new rpc needs a case here"
    for method in unary_methods():
        reply = await http.post(path_of(method), json=requests[method.name])
        assert reply.status_code == 200, (method.name, reply.text)
        got = reply.json()
        message = getattr(pb, method.input_type.name)()
        from google.protobuf import json_format

        json_format.ParseDict(requests[method.name], message)
        want = await getattr(stub, method.name)(message, metadata=AUTH)
        want_dict = json_format.MessageToDict(
            want, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        assert _without_timing(got) == _without_timing(want_dict), method.name


def _without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in ("timing", "phases")}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    if isinstance(value, float):
        return round(value, 5)
    return value


async def test_translate_tokens_streams_server_sent_events(http: httpx.AsyncClient) -> None:
    request = {"texts": ["The train leaves."], "source_lang": "en", "target_lang": "de", "max_new_tokens": 5}
    request = {**request, "options": {"max_new_tokens": 5}}
    request.pop("max_new_tokens")
    events = []
    async with http.stream("POST", "/v1/translate-tokens", json=request) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["result"]["translations"][0]["hypotheses"]
    pieces = "".join(e["text"] for e in events[:-1])
    assert pieces == events[-1]["result"]["translations"][0]["hypotheses"][0]["text"]


async def test_openapi_describes_every_route(http: httpx.AsyncClient) -> None:
    document = (await http.get("/openapi.json")).json()
    paths = document["paths"]
    for path in ("/v1/embeddings", "/v1/models", "/translate", "/languages", "/detect", "/translate_file"):
        assert path in paths, path
    schemas = document["components"]["schemas"]
    for method in unary_methods():
        ref = paths[path_of(method)]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in schemas
    assert schemas["polyglot.v1.TranslateRequest"]["properties"]["texts"] == {
        "type": "array",
        "items": {"type": "string"},
    }


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "shape"),
    [
        ("POST", "/v1/embed", b"{not json", 400, "native"),
        ("POST", "/v1/embed", b'{"texts": "one"}', 400, "native"),
        ("POST", "/v1/embed", b'{"texts": ["a"], "nope": 1}', 400, "native"),
        ("POST", "/v1/embed", b"[1, 2]", 400, "native"),
        ("POST", "/v1/classify", b'{"texts": ["a"], "format": "LABEL_FORMAT_NOPE"}', 400, "native"),
        ("POST", "/v1/embeddings", b'{"input": "a"}', 400, "openai"),
        ("POST", "/v1/embeddings", b'{"input": [1, "a"], "model": "distilbert-demo"}', 400, "openai"),
        ("POST", "/v1/embeddings", b'{"input": [], "model": "distilbert-demo"}', 400, "openai"),
        ("POST", "/v1/embeddings", b'{"input": true, "model": "distilbert-demo"}', 400, "openai"),
        ("POST", "/translate", b'{"q": 5, "source": "en", "target": "de"}', 400, "libre"),
        ("POST", "/translate", b'{"q": "a", "source": "en"}', 400, "libre"),
        (
            "POST",
            "/translate",
            b'{"q": "a", "source": "en", "target": "de", "alternatives": "x"}',
            400,
            "libre",
        ),
        ("POST", "/detect", b'{"q": ["a"]}', 400, "libre"),
        ("GET", "/v1/nothing", b"", 404, "native"),
        ("GET", "/v1/embed", b"", 405, "native"),
        ("PUT", "/v1/embeddings", b"", 405, "openai"),
        ("DELETE", "/translate", b"", 405, "libre"),
    ],
)
async def test_bad_requests_get_their_status_and_a_json_body(
    http: httpx.AsyncClient, method: str, path: str, body: bytes, status: int, shape: str
) -> None:
    reply = await http.request(method, path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    if shape == "native":
        assert error["code"] in ("INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED")
        assert error["message"]
        assert error["request_id"] == reply.headers["x-request-id"]
    elif shape == "openai":
        assert error["type"] == "invalid_request_error"
        assert error["message"]
    else:
        assert isinstance(error, str)
        assert error
    assert (await http.post("/v1/embed", json={"texts": ["still serving"]})).status_code == 200


async def test_oversized_bodies_are_refused_whether_declared_or_streamed(
    server: GatewayServer, http: httpx.AsyncClient
) -> None:
    limit = server.config.limits.max_http_body_bytes
    declared = await http.post(
        "/v1/embed", content=b"x" * (limit + 1), headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "RESOURCE_EXHAUSTED"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked, counted as it comes
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    streamed = await http.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert (await http.post("/v1/embed", json={"texts": ["after"]})).status_code == 200


async def test_without_a_key_nothing_but_probes_and_languages_answer(server: GatewayServer) -> None:
    async with httpx.AsyncClient(base_url=base(server), timeout=60) as anonymous:
        assert (await anonymous.post("/v1/embed", json={"texts": ["a"]})).status_code == 401
        assert (
            await anonymous.post("/v1/embeddings", json={"input": "a", "model": "distilbert-demo"})
        ).status_code == 401
        assert (
            await anonymous.post("/translate", json={"q": "a", "source": "en", "target": "de"})
        ).status_code == 403
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/readyz")).json()["ready"] is True
        assert (await anonymous.get("/languages")).status_code == 200


async def test_http_requests_count_in_the_metrics(server: GatewayServer, http: httpx.AsyncClient) -> None:
    counter = server.metrics.requests.labels("POST /v1/embed", "distilbert-demo", "OK")
    before = counter._value.get()
    await http.post("/v1/embed", json={"texts": ["counted"]})
    assert counter._value.get() == before + 1
    refused = server.metrics.requests.labels("POST /v1/embed", "-", "UNAUTHENTICATED")
    before = refused._value.get()
    await http.post("/v1/embed", json={"texts": ["a"]}, headers={"authorization": "Bearer wrong"})
    assert refused._value.get() == before + 1


async def test_a_client_that_disconnects_leaves_the_batch(server: GatewayServer) -> None:
    body = json.dumps({"texts": ["left before the answer"]}).encode()
    request = (
        "POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    cancelled = server.metrics.requests.labels("POST /v1/embed", "distilbert-demo", "CANCELLED")
    before = cancelled._value.get()
    with hold(server, "distilbert-demo") as held:
        blocker = asyncio.create_task(_embed_over_http(server, "holds the batch"))
        await held.started.wait()  # the first request's batch is running (held)
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        writer.write(request)
        await writer.drain()
        await held.queued(1)  # the second one waits behind it
        (item,) = held.batcher._pending
        writer.close()  # ... and its client leaves
        await writer.wait_closed()
        done, _ = await asyncio.wait({item.future}, timeout=60)
        assert done, "the item stayed queued"
        assert item.future.cancelled()
        assert held.queue_depth == 0
        assert cancelled._value.get() == before + 1
        held.release()
        assert (await blocker).status_code == 200


async def _embed_over_http(server: GatewayServer, text: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base(server), timeout=60) as client:
        return await client.post(
            "/v1/embed", json={"texts": [text]}, headers={"authorization": f"Bearer {KEY}"}
        )


async def test_a_full_or_closing_server_answers_429_and_503_in_each_dialect(
    server: GatewayServer, http: httpx.AsyncClient
) -> None:
    admission = server.admission
    bound = admission.max_in_flight
    admission.max_in_flight = 0  # full: every request is over the server's bound
    try:
        full = await http.post("/v1/embeddings", json={"input": "a", "model": "distilbert-demo"})
        assert full.status_code == 429
        assert full.json()["error"]["code"] == "rate_limit_exceeded"
        assert (
            await http.post("/translate", json={"q": "a", "source": "en", "target": "de"})
        ).status_code == 429
    finally:
        admission.max_in_flight = bound
    admission.accepting = False  # shutting down
    try:
        closing = await http.post("/v1/embed", json={"texts": ["a"]})
        assert closing.status_code == 503
        assert closing.json()["error"]["code"] == "UNAVAILABLE"
        client = openai.AsyncOpenAI(base_url=f"{base(server)}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError):
            await client.embeddings.create(model="distilbert-demo", input="a")
    finally:
        admission.accepting = True
    assert (await http.post("/v1/embed", json={"texts": ["open again"]})).status_code == 200
