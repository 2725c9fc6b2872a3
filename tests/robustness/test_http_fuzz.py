"""Hypothesis-made JSON and form bodies for every HTTP route of a `pgw serve` process: wrong types, nesting,
huge and negative numbers, unknown fields, control characters. Every reply is a success or a clean 4xx/5xx
with a JSON error body (never a 500), a normal request still succeeds after each, and the server's log
holds no traceback when it stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import free_port
from tests.robustness.conftest import Exported, running

EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CLEAN = {400, 403, 404, 413, 429, 503, 504}
ROUTES = {
    "/v1/embeddings": ["input", "model", "encoding_format", "dimensions", "user"],
    "/translate": ["q", "source", "target", "format", "alternatives", "api_key"],
    "/detect": ["q", "api_key"],
    "/v1/embed": ["texts", "model", "pooling", "normalize", "long_input", "truncate"],
    "/v1/translate": ["texts", "source_lang", "target_lang", "options", "model"],
    "/v1/segment": ["texts", "threshold", "max_length", "stride", "return_probabilities"],
    "/v1/classify": ["texts", "format", "return_scores", "threshold"],
    "/v1/fill-mask": ["texts", "top_k"],
    "/v1/detect-language": ["texts", "top_k"],
    "/v1/translate-document": ["document", "format", "source_lang", "target_lang", "segmenter"],
}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, 3, -1, 2**31, 2**63]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(["en", "de", "auto", "eng_Latn", "distilbert-demo", "nllb-demo", "html", "float",
                     "base64", "LABEL_FORMAT_BIO", "POOLING_CLS", "Hello world. How are you?"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner)),
    max_leaves=12,
)


def bodies(route: str) -> st.SearchStrategy[dict[str, Any]]:
    fields = ROUTES[route]
    return st.dictionaries(st.sampled_from(fields), values, max_size=len(fields)) | st.dictionaries(
        st.text(max_size=10), values, max_size=3
    )


@pytest.fixture(scope="module")
def client(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    port = free_port()
    with (
        running(exported, tmp_path_factory.mktemp("http"), {"http_port": port}),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http,
    ):
        yield http


def _clean(reply: httpx.Response) -> None:
    assert reply.status_code == 200 or reply.status_code in CLEAN, reply.text[:500]
    body = reply.json()
    if reply.status_code != 200:
        assert "error" in body


def _still_serving(client: httpx.Client) -> None:
    reply = client.post("/v1/embed", json={"texts": ["still serving"]})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_json_bodies(client: httpx.Client, route: str) -> None:
    @EXAMPLES
    @given(bodies(route))
    def one(body: dict[str, Any]) -> None:
        _clean(client.post(route, json=body))
        _still_serving(client)

    one()


@EXAMPLES
@given(st.dictionaries(st.sampled_from(ROUTES["/translate"]), st.text(max_size=40), max_size=6))
def test_libretranslate_form_fields(client: httpx.Client, fields: dict[str, str]) -> None:
    _clean(client.post("/translate", data=fields))
    _clean(client.post("/detect", data=fields))
    _still_serving(client)


@EXAMPLES
@given(st.binary(max_size=300), st.sampled_from(sorted(ROUTES)), st.sampled_from(
    ["application/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"]
))  # fmt: skip
def test_raw_bytes(client: httpx.Client, raw: bytes, route: str, kind: str) -> None:
    _clean(client.post(route, content=raw, headers={"content-type": kind}))
    _still_serving(client)


def test_a_file_upload_that_is_no_text(client: httpx.Client, tmp_path: Path) -> None:
    files = {"file": ("a.md", b"\xff\xfe\x00binary", "text/markdown")}
    reply = client.post("/translate_file", data={"source": "en", "target": "de"}, files=files)
    assert reply.status_code == 400
    assert "UTF-8" in reply.json()["error"]
    _still_serving(client)
