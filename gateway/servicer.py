"""The Polyglot servicer: protobuf in -> domain dataclass -> one task call -> protobuf out. Nothing else."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, TypeVar

from grpc import aio

from gateway import langid
from gateway.documents import translate as doc
from gateway.errors import GatewayError, InvalidInput
from gateway.interceptors import client_message, status_of
from gateway.metrics import label_request
from gateway.offload import off_loop
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc
from gateway.registry import Registry, Served
from gateway.tasks import embedding as emb
from gateway.tasks import fill_mask as fm
from gateway.tasks import token_classification as tc
from gateway.tasks import translation as tr
from gateway.tasks.base import DEFAULT_LIMITS, TextLimits, Timing, Usage

E = TypeVar("E", bound=str)
log = logging.getLogger(__name__)
STREAM_WINDOW = 64  # requests of one TranslateStream read ahead of their replies
_FORMATS: dict[int, Literal["labels", "bio", "bioes"]] = {
    pb.LABEL_FORMAT_UNSPECIFIED: "labels",
    pb.LABEL_FORMAT_LABELS: "labels",
    pb.LABEL_FORMAT_BIO: "bio",
    pb.LABEL_FORMAT_BIOES: "bioes",
}
_SCORES: dict[int, Literal["none", "logits", "probabilities"]] = {
    pb.SCORE_KIND_UNSPECIFIED: "none",
    pb.SCORE_KIND_LOGITS: "logits",
    pb.SCORE_KIND_PROBABILITIES: "probabilities",
}
_LONG_INPUT: dict[int, Literal["truncate", "chunk"]] = {
    pb.LONG_INPUT_UNSPECIFIED: "truncate",
    pb.LONG_INPUT_TRUNCATE: "truncate",
    pb.LONG_INPUT_CHUNK: "chunk",
}
_DOCUMENT_FORMATS: dict[int, Literal["text", "markdown", "html"]] = {
    pb.DOCUMENT_FORMAT_UNSPECIFIED: "text",
    pb.DOCUMENT_FORMAT_TEXT: "text",
    pb.DOCUMENT_FORMAT_MARKDOWN: "markdown",
    pb.DOCUMENT_FORMAT_HTML: "html",
}
_POOLING: dict[int, Literal["mean", "cls"]] = {
    pb.POOLING_UNSPECIFIED: "mean",
    pb.POOLING_MEAN: "mean",
    pb.POOLING_CLS: "cls",
}


def deadline_of(context: aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() value, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _usage(usage: Usage) -> pb.Usage:
    return pb.Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


def _timing(timing: Timing, started: float) -> pb.Timing:
    total = 1000 * (time.perf_counter() - started)
    return pb.Timing(queue_ms=timing.queue_ms, inference_ms=timing.inference_ms, total_ms=total)


def _add_token_labels(field: Any, labels: list[tc.TokenLabel]) -> None:
    """Per-token messages built in place with `add` (a message passed to a repeated field is copied), and
    `scores` set only when there are some (an empty one costs as much as the rest of the message)."""
    add = field.add
    for t in labels:
        if t.scores:
            add(token=t.token, start=t.start, end=t.end, label=t.label, score=t.score, scores=t.scores)
        else:
            add(token=t.token, start=t.start, end=t.end, label=t.label, score=t.score)


def _request_error(exc: Exception) -> pb.RequestError:
    """The error of one request on a stream, as the interceptor would have made its status."""
    if not isinstance(exc, GatewayError):
        request_id = uuid.uuid4().hex
        log.error("a TranslateStream request failed (error id %s)", request_id, exc_info=exc)
        return pb.RequestError(code="INTERNAL", message=client_message(exc, request_id))
    return pb.RequestError(code=status_of(exc).name, message=str(exc))


def _enum(table: Mapping[int, E], value: int, field: str) -> E:
    if value not in table:
        raise InvalidInput(f"{field}: unknown value {value}")
    return table[value]


MAX_LANGUAGE_CANDIDATES = 10


def _decoding_options(o: pb.TranslateOptions) -> tr.DecodingOptions:
    sampling = None
    if o.HasField("sampling"):
        s = o.sampling
        sampling = tr.SamplingOptions(
            temperature=s.temperature or 1.0,
            top_k=s.top_k,
            top_p=s.top_p or 1.0,
            seed=s.seed if s.HasField("seed") else None,
        )
    return tr.DecodingOptions(
        beam_size=max(1, o.beam_size),
        max_new_tokens=o.max_new_tokens,
        length_penalty=o.length_penalty if o.HasField("length_penalty") else 1.0,
        early_stopping=o.early_stopping,
        num_return=max(1, o.num_return),
        sampling=sampling,
        return_scores=o.return_scores,
    )


class PolyglotServicer(pb_grpc.PolyglotServicer):
    def __init__(
        self,
        registry: Registry,
        limits: TextLimits = DEFAULT_LIMITS,
        document_limits: doc.DocumentLimits = doc.DEFAULT_LIMITS,
    ) -> None:
        self.registry = registry
        self.limits = limits  # of the requests no task model takes (DetectLanguage)
        self.document_limits = document_limits

    # ------------------------------------------------------------------------------------------ translate

    def _translate_input(self, request: pb.TranslateRequest, deadline: float | None) -> tr.TranslateInput:
        return tr.TranslateInput(
            texts=list(request.texts),
            source_lang=request.source_lang,
            target_lang=request.target_lang,
            options=_decoding_options(request.options),
            deadline=deadline,
        )

    # ------------------------------------------------------------------------------------------ documents

    def _document(
        self, request: pb.TranslateDocumentRequest, context: aio.ServicerContext
    ) -> tuple[str, doc.DocumentTranslator, doc.DocumentInput]:
        segmenter = self._segmenter(request.segmenter)  # first: the request's metrics are the translator's
        served = self.registry.resolve("translation", request.model)
        translator = served.model
        assert isinstance(translator, tr.TranslationModel)
        job = doc.DocumentInput(
            document=request.document,
            format=_enum(_DOCUMENT_FORMATS, request.format, "format"),
            source_lang=request.source_lang,
            target_lang=request.target_lang,
            options=_decoding_options(request.options),
            deadline=deadline_of(context),
        )
        return served.name, doc.DocumentTranslator(translator, segmenter, self.document_limits), job

    def _segmenter(self, name: str) -> tc.TokenClassificationModel | None:
        """The named SaT model, or the server's default one (None when it serves none)."""
        if name:
            try:
                model = self.registry.resolve("token-classification", name).model
            except InvalidInput as exc:  # named for the field the client set
                raise InvalidInput(f"segmenter: {str(exc).removeprefix('model: ')}") from None
            assert isinstance(model, tc.TokenClassificationModel)
            if not model.info.sat:
                raise InvalidInput(f"segmenter: {name} is not a SaT (sentence segmentation) model")
            return model
        return self._default_sat()

    async def TranslateDocument(
        self, request: pb.TranslateDocumentRequest, context: aio.ServicerContext
    ) -> pb.TranslateDocumentResponse:
        started = time.perf_counter()
        name, translator, job = self._document(request, context)
        result = await translator.translate(job)
        return await off_loop(len(result.sentences), _document_reply, name, result, started)

    async def TranslateDocumentStream(
        self, request: pb.TranslateDocumentRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateDocumentProgress]:
        started = time.perf_counter()
        name, translator, job = self._document(request, context)
        async for event in translator.parts(job):
            if isinstance(event, doc.DocumentPart):
                progress = pb.TranslateDocumentProgress(part=event.text, done=event.done, total=event.total)
                _add_document_sentences(progress.sentences, event.sentences)
                yield progress
            else:
                reply = await off_loop(len(event.sentences), _document_reply, name, event, started)
                total = len(event.sentences)
                yield pb.TranslateDocumentProgress(done=total, total=total, result=reply)

    async def _translate(self, request: pb.TranslateRequest, deadline: float | None) -> pb.TranslateResponse:
        started = time.perf_counter()
        served = self.registry.resolve("translation", request.model)
        model = served.model
        assert isinstance(model, tr.TranslationModel)
        result = await model.translate(self._translate_input(request, deadline))
        return _translate_reply(served.name, request, result, started)

    async def TranslateTokens(
        self, request: pb.TranslateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateTokensResponse]:
        started = time.perf_counter()
        served = self.registry.resolve("translation", request.model)
        model = served.model
        assert isinstance(model, tr.TranslationModel)
        async for event in model.translate_tokens(self._translate_input(request, deadline_of(context))):
            if isinstance(event, tr.TokenPiece):
                yield pb.TranslateTokensResponse(
                    text_index=event.text_index,
                    hypothesis=event.hypothesis,
                    token_ids=[event.token_id],
                    text=event.text,
                )
            else:
                yield pb.TranslateTokensResponse(
                    result=_translate_reply(served.name, request, event, started)
                )

    async def Translate(
        self, request: pb.TranslateRequest, context: aio.ServicerContext
    ) -> pb.TranslateResponse:
        return await self._translate(request, deadline_of(context))

    async def TranslateStream(
        self, request_iterator: AsyncIterator[pb.TranslateRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateResponse]:
        """Requests run concurrently; each reply (or its error) is sent as soon as it is ready. At most
        STREAM_WINDOW requests of one stream are read ahead of their replies (gRPC flow control does the
        rest). A message that does not parse ends the stream (INVALID_ARGUMENT)."""
        deadline = deadline_of(context)
        replies: asyncio.Queue[pb.TranslateResponse | BaseException | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        running: set[asyncio.Task[None]] = set()

        async def one(request: pb.TranslateRequest) -> None:
            try:
                reply = await self._translate(request, deadline)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every message gets a reply, whatever went wrong
                reply = pb.TranslateResponse(request_id=request.request_id, error=_request_error(exc))
            replies.put_nowait(reply)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
                replies.put_nowait(None)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the stream itself failed: end it with that error
                replies.put_nowait(exc)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                if isinstance(reply, BaseException):
                    raise reply
                yield reply
                window.release()
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # ---------------------------------------------------------------------------------------- classify

    async def Classify(
        self, request: pb.ClassifyRequest, context: aio.ServicerContext
    ) -> pb.ClassifyResponse:
        started = time.perf_counter()
        served = self.registry.resolve("token-classification", request.model)
        model = served.model
        assert isinstance(model, tc.TokenClassificationModel)
        result = await model.classify(
            tc.ClassifyInput(
                texts=list(request.texts),
                format=_enum(_FORMATS, request.format, "format"),
                scores=_enum(_SCORES, request.return_scores, "return_scores"),
                threshold=request.threshold if request.HasField("threshold") else None,
                long_input=_enum(_LONG_INPUT, request.long_input, "long_input"),
                deadline=deadline_of(context),
            )
        )
        size = sum(len(text.tokens) for text in result.results)
        return await off_loop(size, _classify_reply, served.name, result, started)

    async def Segment(self, request: pb.SegmentRequest, context: aio.ServicerContext) -> pb.SegmentResponse:
        started = time.perf_counter()
        served = self.registry.resolve("token-classification", request.model)
        model = served.model
        assert isinstance(model, tc.TokenClassificationModel)
        result = await model.segment(
            tc.SegmentInput(
                texts=list(request.texts),
                threshold=request.threshold if request.HasField("threshold") else None,
                max_length=request.max_length,
                stride=request.stride,
                return_probabilities=request.return_probabilities,
                wtpsplit_compat=request.wtpsplit_compat,
                strip_whitespace=request.strip_whitespace,
                deadline=deadline_of(context),
            )
        )
        size = sum(len(t.sentences) + len(t.probabilities or ()) // 16 for t in result.results)
        return await off_loop(size, _segment_reply, served.name, result, started)

    # ------------------------------------------------------------------------------------ embed, fill-mask

    async def Embed(self, request: pb.EmbedRequest, context: aio.ServicerContext) -> pb.EmbedResponse:
        started = time.perf_counter()
        served = self.registry.resolve("embedding", request.model)
        model = served.model
        assert isinstance(model, emb.EmbeddingModel)
        deadline = deadline_of(context)
        result = await model.embed(
            emb.EmbedInput(
                texts=list(request.texts),
                pooling=_enum(_POOLING, request.pooling, "pooling"),
                normalize=request.normalize,
                truncate=request.truncate,
                long_input=_enum(_LONG_INPUT, request.long_input, "long_input"),
                return_chunks=request.return_chunks,
                deadline=deadline,
            ),
            self._sentence_ends(deadline),
        )
        size = len(result.embeddings) * result.dimensions // 64
        return await off_loop(size, _embed_reply, served.name, result, started)

    def _default_sat(self) -> tc.TokenClassificationModel | None:
        """The server's default token-classification model when it is a SaT model."""
        return next(
            (
                entry.model
                for entry in self.registry.all()
                if isinstance(entry.model, tc.TokenClassificationModel)
                and entry.model.info.sat
                and self.registry.is_default(entry.name)
            ),
            None,
        )

    def _sentence_ends(self, deadline: float | None) -> emb.Boundaries | None:
        """Where the server's default SaT model ends each sentence of some texts, if it serves one."""
        segmenter = self._default_sat()
        if segmenter is None:
            return None

        async def ends(texts: list[str]) -> list[list[int]]:
            found = await segmenter.segment(tc.SegmentInput(texts, deadline=deadline))
            return [[s.end for s in text.sentences] for text in found.results]

        return ends

    async def FillMask(
        self, request: pb.FillMaskRequest, context: aio.ServicerContext
    ) -> pb.FillMaskResponse:
        started = time.perf_counter()
        served = self.registry.resolve("fill-mask", request.model)
        model = served.model
        assert isinstance(model, fm.FillMaskModel)
        result = await model.fill_mask(
            fm.FillMaskInput(
                texts=list(request.texts), top_k=request.top_k or 5, deadline=deadline_of(context)
            )
        )
        size = 4 * sum(len(m.predictions) for masks in result.results for m in masks)
        return await off_loop(size, _fill_mask_reply, served.name, result, started)

    # -------------------------------------------------------------------------------- language detection

    async def DetectLanguage(
        self, request: pb.DetectLanguageRequest, context: aio.ServicerContext
    ) -> pb.DetectLanguageResponse:
        started = time.perf_counter()
        label_request(langid.MODEL)
        texts = list(request.texts)
        self.limits.check(texts)
        top_k = request.top_k or 3
        if not 1 <= top_k <= MAX_LANGUAGE_CANDIDATES:
            raise InvalidInput(f"top_k: {top_k} is outside 1..{MAX_LANGUAGE_CANDIDATES}")
        detections = await off_loop(sum(map(len, texts)), langid.identifier().detect_all, texts, top_k)
        reply = pb.DetectLanguageResponse(model=langid.MODEL)
        for detection in detections:
            result = reply.results.add()
            for c in detection.candidates:
                result.candidates.add(language=c.language, iso_code=c.iso, probability=c.probability)
            if detection.best is not None:
                b = detection.best
                result.best.CopyFrom(
                    pb.LanguageCandidate(language=b.language, iso_code=b.iso, probability=b.probability)
                )
        reply.timing.CopyFrom(_timing(Timing(0.0, 1000 * (time.perf_counter() - started)), started))
        return reply

    # ------------------------------------------------------------------------------------------ models

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(entry) for entry in self.registry.all()])

    def _model_info(self, entry: Served) -> pb.ModelInfo:
        d = entry.model.describe()
        report = d.accuracy
        accuracy = None
        if report is not None:
            accuracy = pb.AccuracyReport(
                reference=report.reference,
                probe_set=report.probe_set,
                passed=report.passed,
                metrics=[
                    pb.AccuracyMetric(name=k, value=v, bound=report.bounds.get(k))
                    for k, v in report.metrics.items()
                ],
            )
        return pb.ModelInfo(
            name=entry.name,
            task=d.task,
            backend=d.backend,
            device=d.device,
            variant=d.variant,
            provider=d.provider,
            max_input_tokens=d.max_input_tokens,
            accuracy=accuracy,
            source=d.source,
            random_weights=d.random_weights,
            ready=d.ready,
            is_default=self.registry.is_default(entry.name),
            languages=d.languages,
            max_new_tokens=d.max_new_tokens,
            labels=d.labels,
            dimensions=d.dimensions,
        )


# ----------------------------------------------------------------------------------------------- replies
# Built off the event loop when large (`off_loop`): a long Classify reply holds thousands of messages.


def _classify_reply(model: str, result: tc.ClassifyOutput, started: float) -> pb.ClassifyResponse:
    reply = pb.ClassifyResponse(model=model, labels=result.labels, usage=_usage(result.usage))
    for text in result.results:
        classified = reply.results.add(truncated=text.truncated)
        _add_token_labels(classified.tokens, text.tokens)
        for s in text.spans:
            classified.spans.add(label=s.label, start=s.start, end=s.end, text=s.text, score=s.score)
    reply.timing.CopyFrom(_timing(result.timing, started))
    return reply


def _segment_reply(model: str, result: tc.SegmentOutput, started: float) -> pb.SegmentResponse:
    reply = pb.SegmentResponse(model=model, threshold=result.threshold, usage=_usage(result.usage))
    for text in result.results:  # messages built in place: one per sentence, thousands in a long text
        segmented = reply.results.add()
        add = segmented.sentences.add
        for s in text.sentences:
            add(text=s.text, start=s.start, end=s.end)
        if text.probabilities:
            segmented.probabilities.extend(text.probabilities)
    reply.timing.CopyFrom(_timing(result.timing, started))
    return reply


def _embed_reply(model: str, result: emb.EmbedOutput, started: float) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        embeddings=[
            pb.Embedding(
                values=e.values.tolist(),
                truncated=e.truncated,
                chunks=[
                    pb.EmbeddingChunk(start=c.start, end=c.end, tokens=c.tokens, values=c.values.tolist())
                    for c in e.chunks
                ],
            )
            for e in result.embeddings
        ],
        model=model,
        dimensions=result.dimensions,
        usage=_usage(result.usage),
        timing=_timing(result.timing, started),
    )


def _fill_mask_reply(model: str, result: fm.FillMaskOutput, started: float) -> pb.FillMaskResponse:
    return pb.FillMaskResponse(
        results=[
            pb.FilledText(
                masks=[
                    pb.MaskPredictions(
                        start=m.start,
                        end=m.end,
                        predictions=[
                            pb.TokenPrediction(
                                token=p.token, token_id=p.token_id, score=p.score, sequence=p.sequence
                            )
                            for p in m.predictions
                        ],
                    )
                    for m in masks
                ]
            )
            for masks in result.results
        ],
        model=model,
        mask_token=result.mask_token,
        usage=_usage(result.usage),
        timing=_timing(result.timing, started),
    )


def _translate_reply(
    model: str, request: pb.TranslateRequest, result: tr.TranslateOutput, started: float
) -> pb.TranslateResponse:
    return pb.TranslateResponse(
        translations=[
            pb.Translation(
                hypotheses=[
                    pb.Hypothesis(
                        text=h.text, score=h.score, token_ids=h.token_ids, token_logprobs=h.token_logprobs
                    )
                    for h in t.hypotheses
                ],
                truncated=t.truncated,
                source_lang=t.source_lang,
                source_lang_probability=t.source_probability,
            )
            for t in result.translations
        ],
        model=model,
        source_lang=result.source_lang,
        target_lang=result.target_lang,
        usage=_usage(result.usage),
        timing=_timing(result.timing, started),
        request_id=request.request_id,
    )


def _add_document_sentences(field: Any, sentences: list[doc.DocumentSentence]) -> None:
    add = field.add
    for s in sentences:
        add(
            start=s.start,
            end=s.end,
            output_start=s.output_start,
            output_end=s.output_end,
            source_lang=s.source_lang,
            source_lang_probability=s.probability,
            translation=s.translation,
            score=s.score,
            truncated=s.truncated,
            kept=s.kept,
            attribute=s.attribute,
            text=s.text,
        )


def _document_reply(model: str, result: doc.DocumentOutput, started: float) -> pb.TranslateDocumentResponse:
    p = result.phases
    reply = pb.TranslateDocumentResponse(
        document=result.document,
        model=model,
        target_lang=result.target_lang,
        usage=_usage(result.usage),
        timing=_timing(Timing(result.queue_ms, result.inference_ms), started),
        phases=pb.DocumentTiming(
            parse_ms=p.parse_ms, segment_ms=p.segment_ms, detect_ms=p.detect_ms, translate_ms=p.translate_ms
        ),
    )
    _add_document_sentences(reply.sentences, result.sentences)
    return reply
