"""A typed Python client for the gateway, synchronous (`PolyglotClient`) and asynchronous
(`AsyncPolyglotClient`). Methods take plain Python values and return the typed reply messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc

Texts = str | Sequence[str]
_FORMATS = {"labels": pb.LABEL_FORMAT_LABELS, "bio": pb.LABEL_FORMAT_BIO, "bioes": pb.LABEL_FORMAT_BIOES}
_SCORES = {
    "none": pb.SCORE_KIND_UNSPECIFIED,
    "logits": pb.SCORE_KIND_LOGITS,
    "probabilities": pb.SCORE_KIND_PROBABILITIES,
}
_POOLING = {"mean": pb.POOLING_MEAN, "cls": pb.POOLING_CLS}


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
    """A TranslateRequest; giving `temperature` (or `seed`) turns sampling on."""
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


def classify_request(
    texts: Texts,
    model: str = "",
    format: str = "labels",
    scores: str = "none",
    threshold: float | None = None,
) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest(
        texts=_texts(texts),
        model=model,
        format=_choice(_FORMATS, format, "format"),  # type: ignore[arg-type]
        return_scores=_choice(_SCORES, scores, "scores"),  # type: ignore[arg-type]
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
    texts: Texts, model: str = "", pooling: str = "mean", normalize: bool = False, truncate: bool = True
) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        texts=_texts(texts),
        model=model,
        pooling=_choice(_POOLING, pooling, "pooling"),  # type: ignore[arg-type]
        normalize=normalize,
        truncate=truncate,
    )


def vectors(reply: pb.EmbedResponse) -> np.ndarray:
    """The embeddings of a reply as a float32 array [texts, dimensions]."""
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32).reshape(
        -1, reply.dimensions
    )


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
    """How to reach a server over TLS (see `channel_credentials`)."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca, self.cert, self.key)


class _Base:
    def __init__(self, target: str, api_key: str | None, timeout: float | None) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": self.metadata}


class PolyglotClient(_Base):
    """Blocking client: `with PolyglotClient("localhost:50051") as client: client.translate(...)`."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        tls: Tls | None = None,
    ) -> None:
        super().__init__(target, api_key, timeout)
        self.channel = (
            grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target, tls.credentials())
        )
        self.stub = pb_grpc.PolyglotStub(self.channel)

    def __enter__(self) -> PolyglotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def translate(
        self, texts: Texts, target_lang: str, *, timeout: float | None = None, **options: Any
    ) -> pb.TranslateResponse:
        """Translate into `target_lang`; options as `translate_request` takes them."""
        reply: pb.TranslateResponse = self.stub.Translate(
            translate_request(texts, target_lang, **options), **self._kwargs(timeout)
        )
        return reply

    def translate_stream(self, requests: Iterable[pb.TranslateRequest]) -> Iterator[pb.TranslateResponse]:
        """Many requests on one stream; replies carry their request_id and may come out of order."""
        replies: Iterator[pb.TranslateResponse] = self.stub.TranslateStream(
            iter(requests), **self._kwargs(None)
        )
        return replies

    def classify(self, texts: Texts, *, timeout: float | None = None, **options: Any) -> pb.ClassifyResponse:
        reply: pb.ClassifyResponse = self.stub.Classify(
            classify_request(texts, **options), **self._kwargs(timeout)
        )
        return reply

    def segment(self, texts: Texts, *, timeout: float | None = None, **options: Any) -> pb.SegmentResponse:
        reply: pb.SegmentResponse = self.stub.Segment(
            segment_request(texts, **options), **self._kwargs(timeout)
        )
        return reply

    def embed(self, texts: Texts, *, timeout: float | None = None, **options: Any) -> pb.EmbedResponse:
        reply: pb.EmbedResponse = self.stub.Embed(embed_request(texts, **options), **self._kwargs(timeout))
        return reply

    def fill_mask(
        self, texts: Texts, model: str = "", top_k: int = 5, timeout: float | None = None
    ) -> pb.FillMaskResponse:
        request = pb.FillMaskRequest(texts=_texts(texts), model=model, top_k=top_k)
        reply: pb.FillMaskResponse = self.stub.FillMask(request, **self._kwargs(timeout))
        return reply

    def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        reply: pb.ListModelsResponse = self.stub.ListModels(pb.ListModelsRequest(), **self._kwargs(timeout))
        return reply

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... of the server (""), of "polyglot.v1.Polyglot", or of one model
        ("polyglot.v1.Polyglot/<model>")."""
        reply = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), **self._kwargs(timeout)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class AsyncPolyglotClient(_Base):
    """asyncio client: `async with AsyncPolyglotClient(target) as client: await client.embed(...)`."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        tls: Tls | None = None,
    ) -> None:
        super().__init__(target, api_key, timeout)
        self.channel = (
            grpc.aio.insecure_channel(target)
            if tls is None
            else grpc.aio.secure_channel(target, tls.credentials())
        )
        self.stub = pb_grpc.PolyglotStub(self.channel)

    async def __aenter__(self) -> AsyncPolyglotClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def translate(
        self, texts: Texts, target_lang: str, *, timeout: float | None = None, **options: Any
    ) -> pb.TranslateResponse:
        reply: pb.TranslateResponse = await self.stub.Translate(
            translate_request(texts, target_lang, **options), **self._kwargs(timeout)
        )
        return reply

    async def translate_stream(
        self, requests: AsyncIterable[pb.TranslateRequest] | Iterable[pb.TranslateRequest]
    ) -> AsyncIterator[pb.TranslateResponse]:
        call = self.stub.TranslateStream(requests, **self._kwargs(None))
        async for reply in call:
            yield reply

    async def classify(
        self, texts: Texts, *, timeout: float | None = None, **options: Any
    ) -> pb.ClassifyResponse:
        reply: pb.ClassifyResponse = await self.stub.Classify(
            classify_request(texts, **options), **self._kwargs(timeout)
        )
        return reply

    async def segment(
        self, texts: Texts, *, timeout: float | None = None, **options: Any
    ) -> pb.SegmentResponse:
        reply: pb.SegmentResponse = await self.stub.Segment(
            segment_request(texts, **options), **self._kwargs(timeout)
        )
        return reply

    async def embed(self, texts: Texts, *, timeout: float | None = None, **options: Any) -> pb.EmbedResponse:
        reply: pb.EmbedResponse = await self.stub.Embed(
            embed_request(texts, **options), **self._kwargs(timeout)
        )
        return reply

    async def fill_mask(
        self, texts: Texts, model: str = "", top_k: int = 5, timeout: float | None = None
    ) -> pb.FillMaskResponse:
        request = pb.FillMaskRequest(texts=_texts(texts), model=model, top_k=top_k)
        reply: pb.FillMaskResponse = await self.stub.FillMask(request, **self._kwargs(timeout))
        return reply

    async def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        reply: pb.ListModelsResponse = await self.stub.ListModels(
            pb.ListModelsRequest(), **self._kwargs(timeout)
        )
        return reply
