"""A typed Python client for the gateway, synchronous (`PolyglotClient`) and asynchronous
(`AsyncPolyglotClient`). Methods take plain Python values and return the typed reply messages.

- Every failed call raises `PolyglotError` (a `grpc.RpcError`): its status code, the server's message,
  the request id and the reply's trailers. Options the client refuses before calling raise ValueError.
- UNAVAILABLE (a server starting, restarting or shutting down) is retried by gRPC itself, with exponential
  backoff and retry throttling, from the channel's service config (`Retry`); `wait_for_ready` makes calls
  wait for the server to come up instead of failing at once.
- Per call: `timeout`, `metadata` (e.g. `{"x-request-id": "..."}`), `wait_for_ready`, and `call`: a `Call`
  that receives the reply's request id, headers and trailers.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, cast

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc

Texts = str | Sequence[str]
Metadata = Mapping[str, str] | Sequence[tuple[str, str]]
LabelFormat = Literal["labels", "bio", "bioes"]
ScoreKind = Literal["none", "logits", "probabilities"]
LongInput = Literal["truncate", "chunk"]
Pooling = Literal["mean", "cls"]
DocumentFormat = Literal["text", "markdown", "html"]
R = TypeVar("R")
P = ParamSpec("P")

REQUEST_ID = "x-request-id"
SERVICES = ("polyglot.v1.Polyglot", "grpc.health.v1.Health")
MAX_REPLY_BYTES = 256 * 1024 * 1024  # FillMask and Segment probabilities can exceed gRPC's 4 MB default
_FORMATS = {"labels": pb.LABEL_FORMAT_LABELS, "bio": pb.LABEL_FORMAT_BIO, "bioes": pb.LABEL_FORMAT_BIOES}
_SCORES = {
    "none": pb.SCORE_KIND_UNSPECIFIED,
    "logits": pb.SCORE_KIND_LOGITS,
    "probabilities": pb.SCORE_KIND_PROBABILITIES,
}
_POOLING = {"mean": pb.POOLING_MEAN, "cls": pb.POOLING_CLS}
_LONG_INPUT = {"truncate": pb.LONG_INPUT_TRUNCATE, "chunk": pb.LONG_INPUT_CHUNK}
_DOCUMENT_FORMATS = {
    "text": pb.DOCUMENT_FORMAT_TEXT,
    "markdown": pb.DOCUMENT_FORMAT_MARKDOWN,
    "html": pb.DOCUMENT_FORMAT_HTML,
}


# ----------------------------------------------------------------------------------------------- errors


class PolyglotError(grpc.RpcError):  # type: ignore[misc]  # grpc ships no types
    """A call that failed: `code` (a grpc.StatusCode), `message` (the server's, for a person to act on),
    `request_id` (the id the server logged it under, when it answered) and `trailers`. `code()` and
    `details()` answer as on grpc's own errors."""

    def __init__(
        self, code: grpc.StatusCode, message: str, trailers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.status = code
        self.message = message
        self.trailers = dict(trailers or {})
        self.request_id = self.trailers.get(REQUEST_ID)

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


def _metadata_dict(pairs: Any) -> dict[str, str]:
    """Metadata as a dict of its text entries (binary `-bin` entries are left out)."""
    result = {}
    for key, value in pairs or ():
        if isinstance(value, str):
            result[key] = value
    return result


def _error(exc: grpc.RpcError) -> PolyglotError:
    if isinstance(exc, PolyglotError):
        return exc
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    trailers = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else ()
    return PolyglotError(code, details or "", _metadata_dict(trailers))


# ------------------------------------------------------------------------------------------ call options


@dataclass
class Call:
    """Pass one as `call=` to learn what came back besides the reply (as Go's grpc.Header/Trailer):
    filled in when the call returns, and when it fails."""

    request_id: str | None = None  # the id the server logged the call under (x-request-id)
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)

    def _fill(self, headers: Any, trailers: Any) -> None:
        self.headers = _metadata_dict(headers)
        self.trailers = _metadata_dict(trailers)
        self.request_id = self.trailers.get(REQUEST_ID, self.headers.get(REQUEST_ID))


@dataclass(frozen=True)
class Retry:
    """gRPC's own retry of failed attempts (the channel's service config): up to `attempts` in all,
    backoff from `initial_backoff` seconds, times `multiplier` each time, at most `max_backoff`, for the
    given status codes. Retry throttling stops retrying when most recent calls of the channel failed.
    `Retry(attempts=1)` turns it off."""

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    codes: tuple[str, ...] = ("UNAVAILABLE",)

    def service_config(self, wait_for_ready: bool) -> str:
        method: dict[str, Any] = {"name": [{"service": s} for s in SERVICES], "waitForReady": wait_for_ready}
        if self.attempts > 1:
            method["retryPolicy"] = {
                "maxAttempts": min(self.attempts, 5),  # gRPC caps attempts at 5
                "initialBackoff": f"{self.initial_backoff:.3f}s",
                "maxBackoff": f"{self.max_backoff:.3f}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": list(self.codes),
            }
        config: dict[str, Any] = {"methodConfig": [method]}
        if self.attempts > 1:
            config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 0.1}
        return json.dumps(config)


def channel_credentials(
    tls_ca: str | Path | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: the CA that signed the server's certificate (None: the system's
    roots), and a client certificate and key for servers that require them (mutual TLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key: pass both tls_cert and tls_key, or neither")

    def read(path: str | Path | None) -> bytes | None:
        return None if path is None else Path(path).expanduser().read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
    )


@dataclass(frozen=True)
class Tls:
    """How to reach a server over TLS (see `channel_credentials`); `server_name`: the name to check the
    server's certificate against when it differs from the target's host (e.g. connecting by address)."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca, self.cert, self.key)


# -------------------------------------------------------------------------------------------- requests


def _texts(texts: Texts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _choice(table: dict[str, int], value: str, name: str) -> int:
    if value not in table:
        raise ValueError(f"{name} must be one of {', '.join(table)}, not {value!r}")
    return table[value]


def translate_request(
    texts: Texts,
    target_lang: str,
    source_lang: str = "eng_Latn",
    model: str = "",
    beam_size: int = 1,
    max_new_tokens: int = 0,
    num_return: int = 1,
    length_penalty: float | None = None,
    early_stopping: bool = False,
    temperature: float | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    return_scores: bool = False,
    request_id: str = "",
) -> pb.TranslateRequest:
    """A TranslateRequest; giving `temperature` (or `seed`) turns sampling on. `request_id` matches the
    replies of TranslateStream to their requests."""
    options = pb.TranslateOptions(
        beam_size=beam_size,
        max_new_tokens=max_new_tokens,
        early_stopping=early_stopping,
        num_return=num_return,
        return_scores=return_scores,
    )
    if length_penalty is not None:
        options.length_penalty = length_penalty
    if temperature is not None or seed is not None:
        sampling = pb.SamplingOptions(temperature=temperature or 1.0, top_k=top_k, top_p=top_p)
        if seed is not None:
            sampling.seed = seed
        options.sampling.CopyFrom(sampling)
    return pb.TranslateRequest(
        texts=_texts(texts),
        source_lang=source_lang,
        target_lang=target_lang,
        model=model,
        options=options,
        request_id=request_id,
    )


def translate_document_request(
    document: str,
    target_lang: str,
    format: DocumentFormat = "text",
    source_lang: str = "auto",
    model: str = "",
    beam_size: int = 1,
    max_new_tokens: int = 0,
    segmenter: str = "",
) -> pb.TranslateDocumentRequest:
    """A TranslateDocumentRequest: `format` text, markdown or html; `source_lang` "auto" detects each
    sentence's language."""
    return pb.TranslateDocumentRequest(
        document=document,
        format=_choice(_DOCUMENT_FORMATS, format, "format"),  # type: ignore[arg-type]
        source_lang=source_lang,
        target_lang=target_lang,
        model=model,
        options=pb.TranslateOptions(beam_size=beam_size, max_new_tokens=max_new_tokens),
        segmenter=segmenter,
    )


def classify_request(
    texts: Texts,
    model: str = "",
    format: LabelFormat = "labels",
    scores: ScoreKind = "none",
    threshold: float | None = None,
    long_input: LongInput = "truncate",
) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest(
        texts=_texts(texts),
        model=model,
        format=_choice(_FORMATS, format, "format"),  # type: ignore[arg-type]
        return_scores=_choice(_SCORES, scores, "scores"),  # type: ignore[arg-type]
        long_input=_choice(_LONG_INPUT, long_input, "long_input"),  # type: ignore[arg-type]
    )
    if threshold is not None:
        request.threshold = threshold
    return request


def segment_request(
    texts: Texts,
    model: str = "",
    threshold: float | None = None,
    max_length: int = 0,
    stride: int = 0,
    return_probabilities: bool = False,
    wtpsplit_compat: bool = False,
    strip_whitespace: bool = False,
) -> pb.SegmentRequest:
    request = pb.SegmentRequest(
        texts=_texts(texts),
        model=model,
        max_length=max_length,
        stride=stride,
        return_probabilities=return_probabilities,
        wtpsplit_compat=wtpsplit_compat,
        strip_whitespace=strip_whitespace,
    )
    if threshold is not None:
        request.threshold = threshold
    return request


def embed_request(
    texts: Texts,
    model: str = "",
    pooling: Pooling = "mean",
    normalize: bool = False,
    truncate: bool = True,
    long_input: LongInput = "truncate",
    return_chunks: bool = False,
) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        texts=_texts(texts),
        model=model,
        pooling=_choice(_POOLING, pooling, "pooling"),  # type: ignore[arg-type]
        normalize=normalize,
        truncate=truncate,
        long_input=_choice(_LONG_INPUT, long_input, "long_input"),  # type: ignore[arg-type]
        return_chunks=return_chunks,
    )


def fill_mask_request(texts: Texts, model: str = "", top_k: int = 5) -> pb.FillMaskRequest:
    return pb.FillMaskRequest(texts=_texts(texts), model=model, top_k=top_k)


def vectors(reply: pb.EmbedResponse) -> np.ndarray:
    """The embeddings of a reply as a float32 array [texts, dimensions]."""
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32).reshape(
        -1, reply.dimensions
    )


def _status_name(reply: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


# ------------------------------------------------------------------------------------------ unary calls


class _ClientDefault:
    def __repr__(self) -> str:
        return "<the client's timeout>"


_UNSET: Any = _ClientDefault()  # `timeout` not given: the client's default


@dataclass(frozen=True)
class _Prepared(Generic[R]):
    """One unary call, ready to send: which rpc, its request, and the call's options."""

    rpc: str  # the stub's attribute: "Translate", ...
    request: Any
    timeout: float | None
    metadata: Metadata | None
    wait_for_ready: bool | None
    call: Call | None


# Each unary rpc is written once, as the signature both clients' methods take (`_sync` and `_async` make
# the methods); the request builders above stay public for TranslateStream and for callers' own stubs.


def _translate(
    texts: Texts,
    target_lang: str,
    *,
    source_lang: str = "eng_Latn",
    model: str = "",
    beam_size: int = 1,
    max_new_tokens: int = 0,
    num_return: int = 1,
    length_penalty: float | None = None,
    early_stopping: bool = False,
    temperature: float | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    return_scores: bool = False,
    timeout: float | None = _UNSET,
    metadata: Metadata | None = None,
    wait_for_ready: bool | None = None,
    call: Call | None = None,
) -> _Prepared[pb.TranslateResponse]:
    """Translate into `target_lang` (FLORES-200 or ISO 639-1) from `source_lang`; sampling when
    `temperature` or `seed` is given, beam search when `beam_size` > 1."""
    request = translate_request(
        texts, target_lang, source_lang, model, beam_size, max_new_tokens, num_return, length_penalty,
        early_stopping, temperature, top_k, top_p, seed, return_scores,
    )  # fmt: skip
    return _Prepared("Translate", request, timeout, metadata, wait_for_ready, call)


def _translate_document(
    document: str,
    target_lang: str,
    *,
    format: DocumentFormat = "text",
    source_lang: str = "auto",
    model: str = "",
    beam_size: int = 1,
    max_new_tokens: int = 0,
    segmenter: str = "",
    timeout: float | None = _UNSET,
    metadata: Metadata | None = None,
    wait_for_ready: bool | None = None,
    call: Call | None = None,
) -> _Prepared[pb.TranslateDocumentResponse]:
    """Translate a whole document (`format` text, markdown or html), keeping its structure; each
    sentence's language is detected unless `source_lang` is given. `translate_document_stream` sends the
    translation part by part."""
    request = translate_document_request(
        document, target_lang, format, source_lang, model, beam_size, max_new_tokens, segmenter
    )
    return _Prepared("TranslateDocument", request, timeout, metadata, wait_for_ready, call)


def _classify(
    texts: Texts,
    *,
    model: str = "",
    format: LabelFormat = "labels",
    scores: ScoreKind = "none",
    threshold: float | None = None,
    long_input: LongInput = "truncate",
    timeout: float | None = _UNSET,
    metadata: Metadata | None = None,
    wait_for_ready: bool | None = None,
    call: Call | None = None,
) -> _Prepared[pb.ClassifyResponse]:
    """Per-token labels (and spans, for `bio`/`bioes`) with character offsets; `long_input="chunk"`
    labels texts over the model's input limit whole, in overlapping windows."""
    request = classify_request(texts, model, format, scores, threshold, long_input)
    return _Prepared("Classify", request, timeout, metadata, wait_for_ready, call)


def _segment(
    texts: Texts,
    *,
    model: str = "",
    threshold: float | None = None,
    max_length: int = 0,
    stride: int = 0,
    return_probabilities: bool = False,
    wtpsplit_compat: bool = False,
    strip_whitespace: bool = False,
    timeout: float | None = _UNSET,
    metadata: Metadata | None = None,
    wait_for_ready: bool | None = None,
    call: Call | None = None,
) -> _Prepared[pb.SegmentResponse]:
    """Sentences with character offsets; `wtpsplit_compat` for wtpsplit's `SaT.split` segments."""
    request = segment_request(
        texts, model, threshold, max_length, stride, return_probabilities, wtpsplit_compat, strip_whitespace
    )
    return _Prepared("Segment", request, timeout, metadata, wait_for_ready, call)


def _embed(
    texts: Texts,
    *,
    model: str = "",
    pooling: Pooling = "mean",
    normalize: bool = False,
    truncate: bool = True,
    long_input: LongInput = "truncate",
    return_chunks: bool = False,
    timeout: float | None = _UNSET,
    metadata: Metadata | None = None,
    wait_for_ready: bool | None = None,
    call: Call | None = None,
) -> _Prepared[pb.EmbedResponse]:
    """Sentence embeddings (`vectors(reply)` gives them as one numpy array); `long_input="chunk"` embeds
    long texts whole, as the token-weighted mean of chunks cut at sentence ends."""
    request = embed_request(texts, model, pooling, normalize, truncate, long_input, return_chunks)
    return _Prepared("Embed", request, timeout, metadata, wait_for_ready, call)


def _fill_mask(
    texts: Texts,
    *,
    model: str = "",
    top_k: int = 5,
    timeout: float | None = _UNSET,
    metadata: Metadata | None = None,
    wait_for_ready: bool | None = None,
    call: Call | None = None,
) -> _Prepared[pb.FillMaskResponse]:
    """The `top_k` likeliest tokens at each mask token of each text."""
    request = fill_mask_request(texts, model, top_k)
    return _Prepared("FillMask", request, timeout, metadata, wait_for_ready, call)


def _list_models(
    *,
    timeout: float | None = _UNSET,
    metadata: Metadata | None = None,
    wait_for_ready: bool | None = None,
    call: Call | None = None,
) -> _Prepared[pb.ListModelsResponse]:
    """The served models: task, variant, device, limits, languages and accuracy reports."""
    return _Prepared("ListModels", pb.ListModelsRequest(), timeout, metadata, wait_for_ready, call)


def _named(method: Any, prepare: Callable[..., Any]) -> None:
    """`help()` and IDEs show the method as its rpc's signature, returning the reply."""
    functools.update_wrapper(method, prepare)
    method.__name__ = method.__qualname__ = prepare.__name__.removeprefix("_")
    returns = str(prepare.__annotations__.get("return", "")).removeprefix("_Prepared[").removesuffix("]")
    method.__signature__ = inspect.signature(prepare).replace(return_annotation=returns)


def _detect_language(
    texts: Texts,
    *,
    top_k: int = 3,
    timeout: float | None = _UNSET,
    metadata: Metadata | None = None,
    wait_for_ready: bool | None = None,
    call: Call | None = None,
) -> _Prepared[pb.DetectLanguageResponse]:
    """Each text's language (FLORES-200 code, ISO code, probability) and the next likeliest."""
    request = pb.DetectLanguageRequest(texts=_texts(texts), top_k=top_k)
    return _Prepared("DetectLanguage", request, timeout, metadata, wait_for_ready, call)


def _sync(prepare: Callable[P, _Prepared[R]]) -> Callable[Concatenate[PolyglotClient, P], R]:
    def method(self: PolyglotClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._unary(prepare(*args, **kwargs))

    _named(method, prepare)
    return method


def _async(
    prepare: Callable[P, _Prepared[R]],
) -> Callable[Concatenate[AsyncPolyglotClient, P], Awaitable[R]]:
    async def method(self: AsyncPolyglotClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._unary(prepare(*args, **kwargs))

    _named(method, prepare)
    return method


# -------------------------------------------------------------------------------------------- clients


class _Base:
    def __init__(
        self,
        target: str,
        api_key: str | None,
        timeout: float | None,
        tls: Tls | None,
        retry: Retry,
        wait_for_ready: bool,
        metadata: Metadata,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        pairs = list(metadata.items()) if isinstance(metadata, Mapping) else list(metadata)
        self.metadata = tuple(pairs) + ((("authorization", f"Bearer {api_key}"),) if api_key else ())
        self.credentials = tls.credentials() if tls is not None else None
        channel_options: list[tuple[str, Any]] = [
            ("grpc.service_config", retry.service_config(wait_for_ready)),
            ("grpc.enable_retries", 1 if retry.attempts > 1 else 0),
            ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
        ]
        if tls is not None and tls.server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
        self.channel_options = channel_options + list(options)

    def _kwargs(
        self, timeout: float | None, metadata: Metadata | None, wait_for_ready: bool | None
    ) -> dict[str, Any]:
        extra = list(metadata.items()) if isinstance(metadata, Mapping) else list(metadata or ())
        return {
            "timeout": self.timeout if timeout is _UNSET else timeout,
            "metadata": self.metadata + tuple(extra),
            "wait_for_ready": self.wait_for_ready if wait_for_ready is None else wait_for_ready,
        }

    def _options(self, prepared: _Prepared[Any]) -> dict[str, Any]:
        return self._kwargs(prepared.timeout, prepared.metadata, prepared.wait_for_ready)

    @staticmethod
    def _failed(exc: grpc.RpcError, call: Call | None) -> PolyglotError:
        error = _error(exc)
        if call is not None:
            call._fill((), error.trailers.items())
        return error


_HEALTH = "grpc.health.v1.Health"


class PolyglotClient(_Base):
    """Blocking client: `with PolyglotClient("localhost:50051") as client: client.translate(...)`.

    `timeout`: seconds per call by default (None: no deadline); `retry`: gRPC's retries of UNAVAILABLE;
    `wait_for_ready`: calls wait for the server instead of failing while it is unreachable; `metadata`:
    sent with every call; `options`: more gRPC channel arguments."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        tls: Tls | None = None,
        *,
        retry: Retry = Retry(),  # frozen: one default shared safely
        wait_for_ready: bool = False,
        metadata: Metadata = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, api_key, timeout, tls, retry, wait_for_ready, metadata, options)
        self.channel = (
            grpc.insecure_channel(target, self.channel_options)
            if self.credentials is None
            else grpc.secure_channel(target, self.credentials, self.channel_options)
        )
        self.stub = pb_grpc.PolyglotStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> PolyglotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, prepared: _Prepared[R]) -> R:
        stub = self.health_stub if prepared.rpc == "Check" else self.stub
        try:
            reply, done = getattr(stub, prepared.rpc).with_call(prepared.request, **self._options(prepared))
        except grpc.RpcError as exc:
            raise self._failed(exc, prepared.call) from None
        if prepared.call is not None:
            prepared.call._fill(done.initial_metadata(), done.trailing_metadata())
        return cast(R, reply)

    def _stream(self, calling: Callable[..., Any], options: dict[str, Any]) -> Iterator[Any]:
        replies = calling(**options)
        try:
            yield from replies
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            replies.cancel()  # a caller that stops reading ends the call

    translate = _sync(_translate)
    translate_document = _sync(_translate_document)
    classify = _sync(_classify)
    segment = _sync(_segment)
    embed = _sync(_embed)
    fill_mask = _sync(_fill_mask)
    list_models = _sync(_list_models)
    detect_language = _sync(_detect_language)

    def translate_stream(
        self,
        requests: Iterable[pb.TranslateRequest],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> Iterator[pb.TranslateResponse]:
        """Many requests (`translate_request(..., request_id=...)`) on one stream; replies carry their
        request_id and may come out of order. `timeout` bounds the whole stream (default: none)."""
        return self._stream(
            lambda **kw: self.stub.TranslateStream(iter(requests), **kw),
            self._kwargs(timeout, metadata, wait_for_ready),
        )

    def translate_tokens(
        self,
        request: pb.TranslateRequest,
        *,
        timeout: float | None = _UNSET,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> Iterator[pb.TranslateTokensResponse]:
        """The tokens of a greedy or sampled translation as they are chosen; the last message's `result`
        is the whole reply."""
        return self._stream(
            lambda **kw: self.stub.TranslateTokens(request, **kw),
            self._kwargs(timeout, metadata, wait_for_ready),
        )

    def translate_document_stream(
        self,
        request: pb.TranslateDocumentRequest,
        *,
        timeout: float | None = _UNSET,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> Iterator[pb.TranslateDocumentProgress]:
        """A document's translation part by part (`translate_document_request(...)`), in order; the last
        message's `result` is the whole reply."""
        return self._stream(
            lambda **kw: self.stub.TranslateDocumentStream(request, **kw),
            self._kwargs(timeout, metadata, wait_for_ready),
        )

    def health(
        self, service: str = "", *, timeout: float | None = _UNSET, wait_for_ready: bool | None = None
    ) -> str:
        """SERVING, NOT_SERVING, ... of the server (""), of "polyglot.v1.Polyglot", or of one model
        ("polyglot.v1.Polyglot/<model>")."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply: health_pb2.HealthCheckResponse = self._unary(
            _Prepared("Check", request, timeout, None, wait_for_ready, None)
        )
        return _status_name(reply)


class AsyncPolyglotClient(_Base):
    """asyncio client: `async with AsyncPolyglotClient(target) as client: await client.embed(...)`; the
    same methods and options as `PolyglotClient`."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        tls: Tls | None = None,
        *,
        retry: Retry = Retry(),  # frozen: one default shared safely
        wait_for_ready: bool = False,
        metadata: Metadata = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, api_key, timeout, tls, retry, wait_for_ready, metadata, options)
        self.channel = (
            grpc.aio.insecure_channel(target, self.channel_options)
            if self.credentials is None
            else grpc.aio.secure_channel(target, self.credentials, self.channel_options)
        )
        self.stub = pb_grpc.PolyglotStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncPolyglotClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, prepared: _Prepared[R]) -> R:
        stub = self.health_stub if prepared.rpc == "Check" else self.stub
        running = getattr(stub, prepared.rpc)(prepared.request, **self._options(prepared))
        try:
            reply = await running
        except grpc.RpcError as exc:
            raise self._failed(exc, prepared.call) from None
        if prepared.call is not None:
            prepared.call._fill(await running.initial_metadata(), await running.trailing_metadata())
        return cast(R, reply)

    async def _stream(self, running: Any) -> AsyncIterator[Any]:
        try:
            async for reply in running:
                yield reply
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            running.cancel()  # a caller that stops reading ends the call

    translate = _async(_translate)
    translate_document = _async(_translate_document)
    classify = _async(_classify)
    segment = _async(_segment)
    embed = _async(_embed)
    fill_mask = _async(_fill_mask)
    list_models = _async(_list_models)
    detect_language = _async(_detect_language)

    def translate_stream(
        self,
        requests: AsyncIterable[pb.TranslateRequest] | Iterable[pb.TranslateRequest],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> AsyncIterator[pb.TranslateResponse]:
        """Many requests on one stream; `timeout` bounds the whole stream (default: none)."""
        return self._stream(
            self.stub.TranslateStream(requests, **self._kwargs(timeout, metadata, wait_for_ready))
        )

    def translate_tokens(
        self,
        request: pb.TranslateRequest,
        *,
        timeout: float | None = _UNSET,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> AsyncIterator[pb.TranslateTokensResponse]:
        """The tokens of a greedy or sampled translation as they are chosen, then the whole reply."""
        return self._stream(
            self.stub.TranslateTokens(request, **self._kwargs(timeout, metadata, wait_for_ready))
        )

    def translate_document_stream(
        self,
        request: pb.TranslateDocumentRequest,
        *,
        timeout: float | None = _UNSET,
        metadata: Metadata | None = None,
        wait_for_ready: bool | None = None,
    ) -> AsyncIterator[pb.TranslateDocumentProgress]:
        """A document's translation part by part, in order, then the whole reply."""
        return self._stream(
            self.stub.TranslateDocumentStream(request, **self._kwargs(timeout, metadata, wait_for_ready))
        )

    async def health(
        self, service: str = "", *, timeout: float | None = _UNSET, wait_for_ready: bool | None = None
    ) -> str:
        """SERVING, NOT_SERVING, ... of the server (""), of "polyglot.v1.Polyglot", or of one model."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply: health_pb2.HealthCheckResponse = await self._unary(
            _Prepared("Check", request, timeout, None, wait_for_ready, None)
        )
        return _status_name(reply)
