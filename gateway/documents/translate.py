"""TranslateDocument: parse -> segment every block (SaT) -> detect each sentence's language (with "auto")
-> translate every sentence as one engine item -> reassemble, in order, as parts for the stream.

The sentences go to the translator in small requests, a bounded number at a time: they batch with each
other and with other traffic in the engine, and a document never holds more of the engine's queue than a
window's worth. The request's deadline goes with each of them; cancelling the document cancels the
requests in flight and starts no more.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from gateway.documents import html, markdown
from gateway.documents.structure import Block, Format, Parsed, distribute, parse_text
from gateway.errors import DeadlineExceeded, InvalidInput
from gateway.langid import identifier
from gateway.offload import off_loop
from gateway.tasks import token_classification as tc
from gateway.tasks import translation as tr
from gateway.tasks.base import Usage

DETECTED = 0.5  # a sentence's detection below this probability takes its document's language instead
REQUEST_SENTENCES = 16  # sentences per translation request
WINDOW = 4  # translation requests of one document in flight at once: 64 sentences, 2 batches
_FALLBACK_SPLIT = re.compile(r"(?<=[.!?。！？])\s+|\n")


@dataclass(frozen=True)
class DocumentLimits:
    max_bytes: int = 1_000_000  # UTF-8 bytes of one document
    max_sentences: int = 20_000  # sentences (and attribute values) of one document
    max_html_depth: int = html.DEFAULT_MAX_DEPTH


DEFAULT_LIMITS = DocumentLimits()


@dataclass(frozen=True)
class DocumentInput:
    document: str
    format: Format
    source_lang: str
    target_lang: str
    options: tr.DecodingOptions = field(default_factory=tr.DecodingOptions)
    deadline: float | None = None


@dataclass
class DocumentSentence:
    start: int  # source span
    end: int
    text: str  # what it reads as (the plain text the translator is given)
    block: Block
    source_lang: str = ""
    probability: float = 1.0
    translation: str = ""
    score: float = 0.0
    truncated: bool = False
    kept: bool = False
    done: bool = False  # translated, or kept
    output_start: int = 0
    output_end: int = 0
    inner: list[DocumentSentence] = field(default_factory=list)  # attribute values inside its markup

    @property
    def attribute(self) -> bool:
        return self.block.whole


@dataclass(frozen=True)
class Phases:
    parse_ms: float = 0.0
    segment_ms: float = 0.0
    detect_ms: float = 0.0
    translate_ms: float = 0.0


@dataclass(frozen=True)
class DocumentPart:
    text: str  # the translated document's next part
    sentences: list[DocumentSentence]
    done: int
    total: int


@dataclass(frozen=True)
class DocumentOutput:
    document: str
    sentences: list[DocumentSentence]
    target_lang: str
    usage: Usage
    queue_ms: float
    inference_ms: float
    phases: Phases


def parse(document: str, format: Format, limits: DocumentLimits) -> Parsed:
    if format == "markdown":
        return markdown.parse(document)
    if format == "html":
        return html.parse(document, limits.max_html_depth)
    return parse_text(document)


class DocumentTranslator:
    """One document through a translation model and (if the server has one) a SaT model."""

    def __init__(
        self,
        translator: tr.TranslationModel,
        segmenter: tc.TokenClassificationModel | None,
        limits: DocumentLimits = DEFAULT_LIMITS,
    ) -> None:
        self.translator = translator
        self.segmenter = segmenter
        self.limits = limits

    async def translate(self, request: DocumentInput) -> DocumentOutput:
        async for event in self.parts(request):
            if isinstance(event, DocumentOutput):
                return event
        raise AssertionError("parts() ends with the output")  # pragma: no cover

    async def parts(self, request: DocumentInput) -> AsyncIterator[DocumentPart | DocumentOutput]:
        """The translated document part by part, in order, as its sentences finish; then the whole."""
        source, target = self._validate(request)
        options = replace(request.options, return_scores=True)
        started = time.perf_counter()
        parsed = await off_loop(len(request.document), parse, request.document, request.format, self.limits)
        parsed_at = time.perf_counter()
        sentences, segment_usage = await self._sentences(parsed, request.deadline)
        segmented_at = time.perf_counter()
        if len(sentences) > self.limits.max_sentences:
            raise InvalidInput(
                f"document: {len(sentences)} sentences exceed the limit of {self.limits.max_sentences}; "
                "split the document"
            )
        blocks = [block.plain for block in parsed.blocks if not block.whole]
        await self._languages(sentences, blocks, source, target, len(request.document))
        detected_at = time.perf_counter()
        assembler = Assembler(parsed, sentences)
        total = len(sentences)
        done = 0
        usage = [segment_usage.input_tokens, 0]
        timings: list[tuple[float, float]] = []
        async for finished in self._translated(sentences, target, options, request.deadline, usage, timings):
            done += len(finished)
            text, completed = assembler.advance()
            if text or completed:
                yield DocumentPart(text, completed, done, total)
        tail, completed = assembler.finish()
        if tail or completed:
            yield DocumentPart(tail, completed, done, total)
        finished_at = time.perf_counter()
        yield DocumentOutput(
            document=assembler.output(),
            sentences=sentences,
            target_lang=target,
            usage=Usage(usage[0], usage[1]),
            queue_ms=max((queue for queue, _ in timings), default=0.0),
            inference_ms=sum(run for _, run in timings),
            phases=Phases(
                parse_ms=1000 * (parsed_at - started),
                segment_ms=1000 * (segmented_at - parsed_at),
                detect_ms=1000 * (detected_at - segmented_at),
                translate_ms=1000 * (finished_at - detected_at),
            ),
        )

    def _validate(self, request: DocumentInput) -> tuple[str, str]:
        size = len(request.document.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_bytes:
            raise InvalidInput(
                f"document: {size} bytes exceed the limit of {self.limits.max_bytes}; split the document"
            )
        if request.options.num_return != 1:
            raise InvalidInput("options.num_return: a document takes one translation per sentence (1)")
        probe = tr.TranslateInput(["-"], request.source_lang, request.target_lang, request.options)
        source, target, _ = self.translator.validate(probe)
        return source, target

    # ------------------------------------------------------------------------------------------ sentences

    async def _sentences(
        self, parsed: Parsed, deadline: float | None
    ) -> tuple[list[DocumentSentence], Usage]:
        """Every sentence of the document, and the segmenter's token usage."""
        split = [block for block in parsed.blocks if not block.whole]
        spans, usage = await self._split([block.plain for block in split], deadline)
        return sentences_of(parsed, spans), usage

    async def _split(
        self, texts: list[str], deadline: float | None
    ) -> tuple[list[list[tuple[int, int]]], Usage]:
        """Each text's sentences as stripped [start, end) spans of it, each short enough to translate."""
        room = max(16, self.translator.model.tokenizer.max_length - 2)
        segmenter = self.segmenter
        if segmenter is None:
            return [fallback_spans(text, room) for text in texts], Usage(0)
        limits = segmenter.limits
        # Texts longer than the segmenter takes are cut at line breaks (or spaces) into pieces it takes.
        pieces: list[tuple[int, int, str]] = []  # (text index, offset, piece)
        for index, text in enumerate(texts):
            for offset, piece in _pieces(text, limits.max_chars):
                pieces.append((index, offset, piece))
        spans: list[list[tuple[int, int]]] = [[] for _ in texts]
        tokens = 0
        group: list[tuple[int, int, str]] = []
        size = 0

        async def run(group: list[tuple[int, int, str]]) -> None:
            nonlocal tokens
            result = await segmenter.segment(
                tc.SegmentInput([piece for _, _, piece in group], max_length=room, deadline=deadline)
            )
            tokens += result.usage.input_tokens
            for (index, offset, _), segmented in zip(group, result.results, strict=True):
                for s in segmented.sentences:
                    text = s.text
                    a = offset + s.start + len(text) - len(text.lstrip())
                    b = offset + s.start + len(text.rstrip())
                    if b > a:
                        spans[index].append((a, b))

        for item in pieces:
            if group and (len(group) >= limits.max_texts or size + len(item[2]) > limits.max_request_chars):
                await run(group)
                group, size = [], 0
            group.append(item)
            size += len(item[2])
        if group:
            await run(group)
        return spans, Usage(tokens)

    # ---------------------------------------------------------------------------------------- languages

    async def _languages(
        self, sentences: list[DocumentSentence], blocks: list[str], source: str, target: str, size: int
    ) -> None:
        """Each sentence's source language, and whether it is kept (already in the target language, or
        nothing to translate)."""
        known = set(self.translator.info.languages)
        if source != tr.AUTO_SOURCE:
            for s in sentences:
                s.source_lang = source
                s.kept = s.done = source == target or not _has_letters(s.text)
            return
        texts = [s.text for s in sentences]
        found = await off_loop(size, _detect, texts)
        document = await off_loop(size, _detect, ["\n".join(blocks)[:20_000]])
        fallback = document[0] if document and document[0][0] in known else ("", 0.0)
        for s, (language, probability) in zip(sentences, found, strict=True):
            if not _has_letters(s.text):  # nothing to detect, nothing to translate
                s.source_lang, s.probability, s.kept, s.done = "", 0.0, True, True
                continue
            if language not in known or probability < DETECTED:
                language, probability = fallback
            s.source_lang, s.probability = language, probability
            s.kept = s.done = not language or language == target

    # ------------------------------------------------------------------------------------------ translate

    async def _translated(
        self,
        sentences: list[DocumentSentence],
        target: str,
        options: tr.DecodingOptions,
        deadline: float | None,
        usage: list[int],
        timings: list[tuple[float, float]],
    ) -> AsyncIterator[list[DocumentSentence]]:
        """Translate the sentences that are not kept, WINDOW requests at a time; yield each request's
        sentences as it finishes."""
        requests: list[list[DocumentSentence]] = []
        open_: dict[str, list[DocumentSentence]] = {}
        for s in sentences:
            if s.kept:
                continue
            bucket = open_.setdefault(s.source_lang, [])
            bucket.append(s)
            if len(bucket) == REQUEST_SENTENCES:
                requests.append(open_.pop(s.source_lang))
        requests += open_.values()
        finished: asyncio.Queue[list[DocumentSentence] | BaseException] = asyncio.Queue()
        window = asyncio.Semaphore(WINDOW)
        running: set[asyncio.Task[None]] = set()

        async def one(group: list[DocumentSentence]) -> None:
            try:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded(
                        "the document's deadline passed before all its sentences were translated"
                    )
                result = await self.translator.translate(
                    tr.TranslateInput(
                        [s.text for s in group], group[0].source_lang, target, options, deadline
                    )
                )
                usage[0] += result.usage.input_tokens
                usage[1] += result.usage.output_tokens
                timings.append((result.timing.queue_ms, result.timing.inference_ms))
                for s, t in zip(group, result.translations, strict=True):
                    best = t.hypotheses[0]
                    s.translation = " ".join(best.text.split())
                    s.score = (
                        sum(best.token_logprobs) / len(best.token_logprobs) if best.token_logprobs else 0.0
                    )
                    s.truncated = t.truncated
                    s.done = True
                finished.put_nowait(group)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                finished.put_nowait(exc)
            finally:
                window.release()

        async def feed() -> None:
            for group in requests:
                await window.acquire()
                task = asyncio.create_task(one(group))
                running.add(task)
                task.add_done_callback(running.discard)

        feeder = asyncio.create_task(feed())
        try:
            yield [s for s in sentences if s.kept]  # done already
            for _ in requests:
                result = await finished.get()
                if isinstance(result, BaseException):
                    raise result
                yield result
        finally:
            feeder.cancel()
            for task in list(running):
                task.cancel()


def sentences_of(parsed: Parsed, spans: list[list[tuple[int, int]]]) -> list[DocumentSentence]:
    """The document's sentences in source order: `spans[i]` are the sentences of the i-th block that is
    not `whole` (plain-text offsets); each whole block (an attribute value) is one sentence, nested in the
    sentence whose markup holds it."""
    found: list[DocumentSentence] = []
    split = [block for block in parsed.blocks if not block.whole]
    for block, block_spans in zip(split, spans, strict=True):
        found += [_sentence(block, a, b) for a, b in block_spans]
    for block in parsed.blocks:
        if block.whole:
            plain = block.plain
            found.append(_sentence(block, len(plain) - len(plain.lstrip()), len(plain.rstrip())))
    found.sort(key=lambda s: (s.start, -s.end))
    top: list[DocumentSentence] = []
    for sentence in found:
        if top and sentence.start < top[-1].end:
            top[-1].inner.append(sentence)
        else:
            top.append(sentence)
    return found


def _sentence(block: Block, a: int, b: int) -> DocumentSentence:
    start, end = block.span(a, b)
    return DocumentSentence(start, end, block.plain[a:b], block)


def _detect(texts: list[str]) -> list[tuple[str, float]]:
    out = []
    for detection in identifier().detect_all(texts, 1):
        best = detection.best
        out.append(("", 0.0) if best is None else (best.language, best.probability))
    return out


def _has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def _pieces(text: str, size: int) -> list[tuple[int, str]]:
    """A text as pieces of at most `size` characters, cut after a line break, else after a space, else
    anywhere; with the offset of each."""
    out, at = [], 0
    while len(text) - at > size:
        window = text[at : at + size]
        cut = max(window.rfind("\n"), window.rfind(" ")) + 1 or size
        out.append((at, text[at : at + cut]))
        at += cut
    out.append((at, text[at:]))
    return out


def fallback_spans(text: str, room: int) -> list[tuple[int, int]]:
    """Sentences without a SaT model: at line breaks and after sentence-ending punctuation, cut at spaces
    to fit `room` characters."""
    spans = []
    at = 0
    for match in [*_FALLBACK_SPLIT.finditer(text), None]:
        end = match.start() if match else len(text)
        for offset, piece in _pieces(text[at:end], room):
            a = at + offset + len(piece) - len(piece.lstrip())
            b = at + offset + len(piece.rstrip())
            if b > a:
                spans.append((a, b))
        at = match.end() if match else len(text)
    return spans


class Assembler:
    """The translated document, written in source order as sentences finish: a sentence is written once
    it and every sentence before it (and the attribute values inside its markup) are done."""

    def __init__(self, parsed: Parsed, sentences: list[DocumentSentence]) -> None:
        self.parsed = parsed
        inner = {id(i) for s in sentences for i in s.inner}
        self.top = [s for s in sentences if id(s) not in inner]
        self.next = 0
        self.at = 0  # source offset written up to
        self.parts: list[str] = []
        self.length = 0

    def advance(self) -> tuple[str, list[DocumentSentence]]:
        before = len(self.parts)
        completed: list[DocumentSentence] = []
        while self.next < len(self.top) and self._finished(self.top[self.next]):
            s = self.top[self.next]
            self._write(self._render(self.at, s.start))
            s.output_start = self.length
            self._write(self._sentence(s))
            s.output_end = self.length
            self.at = s.end
            completed += [s, *s.inner]
            self.next += 1
        return "".join(self.parts[before:]), completed

    def finish(self) -> tuple[str, list[DocumentSentence]]:
        text, completed = self.advance()
        assert self.next == len(self.top), "every sentence is translated before the end"
        tail = self._render(self.at, len(self.parsed.source))
        self._write(tail)
        self.at = len(self.parsed.source)
        return text + tail, completed

    def output(self) -> str:
        return "".join(self.parts)

    def _finished(self, s: DocumentSentence) -> bool:
        return s.done and all(i.done for i in s.inner)

    def _write(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def _render(
        self, start: int, end: int, inner: Sequence[DocumentSentence] = (), base: int | None = None
    ) -> str:
        """Source [start, end) with the translated attribute values (of `inner`) inside it."""
        source = self.parsed.source
        out, at = [], start
        for s in inner:
            if start <= s.start and s.end <= end:
                out.append(source[at : s.start])
                offset = (self.length if base is None else base) + sum(map(len, out))
                value = source[s.start : s.end] if s.kept else self.parsed.escape_attribute(s.translation)
                s.output_start, s.output_end = offset, offset + len(value)
                out.append(value)
                at = s.end
        out.append(source[at:end])
        return "".join(out)

    def _sentence(self, s: DocumentSentence) -> str:
        parsed = self.parsed
        if s.kept:
            return self._render(s.start, s.end, s.inner)
        if s.attribute:
            return parsed.escape_attribute(s.translation)
        runs, marks = s.block.slots(s.start, s.end)
        words = distribute(runs, s.translation)
        out: list[str] = []
        for index, run in enumerate(words):
            out.append(parsed.escape(run) if run.strip() else run)
            if index < len(marks):
                for piece in marks[index]:
                    base = self.length + sum(map(len, out))
                    out.append(self._render(piece.start, piece.end, s.inner, base))
        return "".join(out)
