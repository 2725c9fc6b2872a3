"""Hypothesis-made requests for every rpc: floats with NaN and infinities, huge and zero counts, unknown enum
values, control characters and long strings. Every reply is OK or a clean status (never INTERNAL or
UNKNOWN), and after each one a normal request still succeeds. A fixed example budget keeps it short."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from tests.robustness.conftest import still_serving

Stub = polyglot_pb2_grpc.PolyglotStub
EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is never luck
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CLEAN = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
}

# Each strategy mixes ordinary values (so that many requests reach the models) with hostile ones.
SPECIAL_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, 3e38, -1.0, -1000.0]
floats = st.one_of(
    st.floats(0.05, 2.0),
    st.floats(0.05, 2.0),
    st.sampled_from(SPECIAL_FLOATS),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
counts = st.one_of(
    st.integers(0, 4), st.integers(0, 20), st.sampled_from([2**31 - 1, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
enums = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(-(2**31), 2**31 - 1))
words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)  # control characters, every script
ordinary = st.sampled_from(
    [
        "Hello world. How are you?",
        "Der Zug fährt um [MASK] Uhr.",
        "短い文です。もう一つ。",
        "Paris is the [MASK].",
    ]
)
texts = st.one_of(
    st.lists(ordinary, min_size=1, max_size=4),
    st.lists(
        st.one_of(
            ordinary,
            words,
            st.sampled_from(["", " ", "\n" * 50 + "x", "[MASK]" * 20, "\x00\x01\x7f\u200b"]),
            st.builds(lambda w, n: w * n, words, st.integers(1, 300)),  # long, repetitive
        ),
        max_size=10,
    ),
)
models = st.one_of(st.just(""), st.just(""), st.sampled_from(["nllb-demo", "sat-demo", "nope"]), words)
languages = st.one_of(
    st.sampled_from(["eng_Latn", "fra_Latn", "en", "fr", "deu_Latn"]),
    st.sampled_from(["zh", "", "auto"]),
    words,
)


def _outcome(stub: Stub, rpc: str, request: Any) -> tuple[grpc.StatusCode, str]:
    try:
        getattr(stub, rpc)(request, timeout=60)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _call(stub: Stub, rpc: str, request: Any) -> None:
    code, details = _outcome(stub, rpc, request)
    event(f"{rpc} {code.name}")
    if code is not grpc.StatusCode.OK:
        assert code in CLEAN, f"{rpc}: {code} {details}"
        assert details, f"{rpc}: {code} without a message"
        assert len(details) < 1000, f"{rpc}: a {len(details)}-character error message"
    still_serving(stub)


def _optional(message: Any, field: str, value: float | None) -> Any:
    if value is not None:
        setattr(message, field, value)
    return message


sampling = st.builds(
    lambda t, k, p, seed: _optional(pb.SamplingOptions(temperature=t, top_k=k, top_p=p), "seed", seed),
    floats,
    counts,
    floats,
    st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
translate_options = st.builds(
    lambda beam, new, penalty, early, n, sample, scores: _optional(
        pb.TranslateOptions(
            beam_size=beam,
            max_new_tokens=new,
            early_stopping=early,
            num_return=n,
            return_scores=scores,
            **({"sampling": sample} if sample is not None else {}),
        ),
        "length_penalty",
        penalty,
    ),
    counts,
    counts,
    st.one_of(st.none(), floats),
    st.booleans(),
    st.one_of(st.integers(1, 3), counts),
    st.one_of(st.none(), sampling, sampling),
    st.booleans(),
)


@EXAMPLES
@given(texts, languages, languages, models, translate_options, words)
def test_translate(
    stub: Stub, texts: list[str], source: str, target: str, model: str, options: Any, request_id: str
) -> None:
    request = pb.TranslateRequest(
        texts=texts,
        source_lang=source,
        target_lang=target,
        model=model,
        options=options,
        request_id=request_id,
    )
    _call(stub, "Translate", request)


markup = st.sampled_from(
    [
        "<p>",
        "</p>",
        "<b>",
        "<a href='x' title='t'>",
        "<script>",
        "<!--",
        "`",
        "**",
        "[x](y)",
        "| a |",
        "\r\n",
        "&amp;",
    ]
)
documents = st.lists(st.one_of(words, ordinary, markup), max_size=12).map("".join)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(documents, st.integers(0, 4), languages, languages, models, st.integers(0, 4), st.integers(1, 4))
def test_translate_document(
    stub: Stub, document: str, fmt: int, source: str, target: str, model: str, beam: int, new: int
) -> None:
    request = pb.TranslateDocumentRequest(
        document=document,
        format=fmt,  # type: ignore[arg-type]
        source_lang=source,
        target_lang=target,
        model=model,
        options=pb.TranslateOptions(beam_size=beam, max_new_tokens=new),
    )
    _call(stub, "TranslateDocument", request)


@EXAMPLES
@given(texts, counts)
def test_detect_language(stub: Stub, texts: list[str], top_k: int) -> None:
    _call(stub, "DetectLanguage", pb.DetectLanguageRequest(texts=texts, top_k=top_k))


@EXAMPLES
@given(translate_options)
def test_translate_options_on_a_valid_request(stub: Stub, options: Any) -> None:
    """Every decoding option hostile, the rest of the request valid: the options reach the decoder."""
    request = pb.TranslateRequest(
        texts=["Hello world.", "Zweiter Satz."], source_lang="en", target_lang="fra_Latn", options=options
    )
    _call(stub, "Translate", request)


@EXAMPLES
@given(texts, languages, translate_options)
def test_translate_tokens(stub: Stub, texts: list[str], target: str, options: Any) -> None:
    request = pb.TranslateRequest(texts=texts, source_lang="eng_Latn", target_lang=target, options=options)
    replies: list[Any] = []
    code, details = grpc.StatusCode.OK, ""
    try:
        replies = list(stub.TranslateTokens(request, timeout=60))
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
    if code is grpc.StatusCode.OK:
        assert replies[-1].HasField("result")
        assert all(not r.HasField("result") for r in replies[:-1])
    else:
        assert code in CLEAN, f"TranslateTokens: {code} {details}"
        assert details
    still_serving(stub)


@EXAMPLES
@given(texts, models, enums, enums, st.one_of(st.none(), floats), enums)
def test_classify(
    stub: Stub,
    texts: list[str],
    model: str,
    label_format: int,
    scores: int,
    threshold: float | None,
    long_input: int,
) -> None:
    request = pb.ClassifyRequest(
        texts=texts, model=model, format=label_format, return_scores=scores, long_input=long_input
    )
    _call(stub, "Classify", _optional(request, "threshold", threshold))


@EXAMPLES
@given(texts, models, st.one_of(st.none(), floats), counts, counts, *[st.booleans()] * 3)
def test_segment(
    stub: Stub,
    texts: list[str],
    model: str,
    threshold: float | None,
    max_length: int,
    stride: int,
    probabilities: bool,
    compat: bool,
    strip: bool,
) -> None:
    request = pb.SegmentRequest(
        texts=texts,
        model=model,
        max_length=max_length,
        stride=stride,
        return_probabilities=probabilities,
        wtpsplit_compat=compat,
        strip_whitespace=strip,
    )
    _call(stub, "Segment", _optional(request, "threshold", threshold))


@EXAMPLES
@given(texts, models, enums, st.booleans(), st.booleans(), enums, st.booleans())
def test_embed(
    stub: Stub,
    texts: list[str],
    model: str,
    pooling: int,
    normalize: bool,
    truncate: bool,
    long_input: int,
    chunks: bool,
) -> None:
    request = pb.EmbedRequest(
        texts=texts,
        model=model,
        pooling=pooling,
        normalize=normalize,
        truncate=truncate,
        long_input=long_input,
        return_chunks=chunks,
    )
    _call(stub, "Embed", request)


@EXAMPLES
@given(texts, st.one_of(st.sampled_from(["", "distilbert-demo-fill-mask"]), models), counts)
def test_fill_mask(stub: Stub, texts: list[str], model: str, top_k: int) -> None:
    _call(stub, "FillMask", pb.FillMaskRequest(texts=texts, model=model, top_k=top_k))


@EXAMPLES
@given(st.lists(st.tuples(texts, languages, translate_options), max_size=6))
def test_translate_stream_answers_every_message(
    stub: Stub, messages: list[tuple[list[str], str, Any]]
) -> None:
    requests = [
        pb.TranslateRequest(texts=t, source_lang="eng_Latn", target_lang=target, options=o, request_id=str(i))
        for i, (t, target, o) in enumerate(messages)
    ]
    replies = list(stub.TranslateStream(iter(requests), timeout=120))
    assert sorted(r.request_id for r in replies) == sorted(r.request_id for r in requests)
    for reply in replies:
        if reply.HasField("error"):
            assert reply.error.code in {code.name for code in CLEAN}, reply.error
            assert reply.error.message
    still_serving(stub)


@pytest.mark.parametrize(
    "rpc",
    [
        "Translate",
        "Classify",
        "Segment",
        "Embed",
        "FillMask",
        "ListModels",
        "DetectLanguage",
        "TranslateDocument",
    ],
)
@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",
        b"\x0a\xff\xff\xff\xff\x0f",
        b"\x12\x05abc",
        b"\x08" + b"\xff" * 11,
        bytes(range(64)),
    ],
)
def test_malformed_bytes_are_invalid_argument(
    channel: grpc.Channel, stub: Stub, rpc: str, payload: bytes
) -> None:
    method = channel.unary_unary(
        f"/polyglot.v1.Polyglot/{rpc}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.RpcError) as refused:  # none of these byte strings is a valid message
        method(payload, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "does not parse" in (refused.value.details() or "")
    still_serving(stub)


def test_an_undecodable_stream_message_ends_the_stream_at_once(channel: grpc.Channel, stub: Stub) -> None:
    good = pb.TranslateRequest(texts=["Hi."], source_lang="en", target_lang="fr", request_id="good")
    method = channel.stream_stream(
        "/polyglot.v1.Polyglot/TranslateStream",
        request_serializer=lambda b: b,
        response_deserializer=pb.TranslateResponse.FromString,
    )
    call = method(iter([good.SerializeToString(), b"\xff\xff\xff\xff"]), timeout=30)
    with pytest.raises(grpc.RpcError) as ended:
        list(call)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 1 of the stream" in (ended.value.details() or "")
    still_serving(stub)
