"""Translation: NLLB language codes, validation and tokenization here; decoding in the model's engine
(`gateway.decoding.engine`: continuous batching on a thread of its own, in-process), or in Triton's
Python-backend translation model, which runs the same engine (a `generate` part, reached through the
batcher and the wire format of `gateway.triton.wire`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.batcher import BatcherSettings, Observer
from gateway.decoding.batch import StepParts
from gateway.decoding.engine import (
    Decodings,
    Engine,
    EngineSettings,
    KvCache,
    Scheduling,
    StepStats,
    TokenSink,
)
from gateway.decoding.search import Decoded, DecodingOptions, GenerationItem, SamplingOptions
from gateway.errors import InvalidInput
from gateway.langid import identifier
from gateway.languages import resolve_language
from gateway.offload import off_loop
from gateway.runtime import LoadedModel
from gateway.samples import probe_sentences
from gateway.tasks.base import DEFAULT_LIMITS, WARM_UP_BATCHES, BatchedTask, TextLimits, Timing, Usage

AUTO = ("auto", "")  # source_lang values that ask for each text's language to be detected
AUTO_SOURCE = "auto"
MAX_BEAMS = 16
MAX_SAMPLES = 16  # num_return with sampling
MAX_LENGTH_PENALTY = 10.0  # |length_penalty|: beyond it length ** penalty leaves the float range
WARM_UP_TOKENS = 4  # decoder steps of each warm-up run: the first step and a few on the cache after it
WARM_UP_TARGETS = ("fra_Latn", "deu_Latn")
__all__ = ["DecodingOptions", "SamplingOptions", "TranslateInput", "TranslationModel"]


@dataclass(frozen=True)
class TranslateInput:
    texts: list[str]
    source_lang: str
    target_lang: str
    options: DecodingOptions = field(default_factory=DecodingOptions)
    deadline: float | None = None


@dataclass(frozen=True)
class Hypothesis:
    text: str
    score: float
    token_ids: list[int]
    token_logprobs: list[float]


@dataclass(frozen=True)
class Translation:
    hypotheses: list[Hypothesis]
    truncated: bool
    source_lang: str = ""  # the request's, or with "auto" the detected one ("" for an empty text)
    source_probability: float = 1.0  # with "auto": the detection's probability


@dataclass(frozen=True)
class TranslateOutput:
    translations: list[Translation]
    source_lang: str
    target_lang: str
    usage: Usage
    timing: Timing


class TranslationModel(BatchedTask[GenerationItem, Decoded]):
    """Translation from a `translation` export (NLLB / M2M100 architecture)."""

    task = "translation"

    def __init__(
        self,
        model: LoadedModel,
        settings: BatcherSettings,
        observer: Observer | None = None,
        limits: TextLimits = DEFAULT_LIMITS,
        max_new_tokens: int | None = None,
        scheduling: Scheduling = "continuous",
        kv_cache: KvCache = "auto",
        engine_observer: Callable[[StepStats], None] | None = None,
    ) -> None:
        info = model.manifest.translation
        special = model.manifest.special_tokens
        if info is None or special.eos_id is None:
            raise InvalidInput(f"{model.name} is a {model.manifest.task} model, not a translation model")
        self.info = info
        self.eos = special.eos_id
        self.pad = special.pad_id
        # The smaller of the export's and the server's caps on generated tokens.
        self.max_new_tokens = min(info.max_new_tokens, max_new_tokens or info.max_new_tokens)
        self.engine: Engine | None = None
        if model.remote is None:  # in-process: the engine; else Triton runs it
            engine_settings = EngineSettings(
                settings.max_batch_size,
                settings.max_batch_tokens,
                settings.max_queue_size,
                scheduling,
                kv_cache,
            )
            self.engine = Engine(
                model.name, StepParts.of(model.parts), self.eos, self.pad, engine_settings, engine_observer
            )
        super().__init__(model, settings, observer, limits)

    @property
    def queue_depth(self) -> int:
        return self.engine.waiting if self.engine is not None else self.batcher.queue_depth

    async def _warm_up(self) -> None:
        """The engine's parts run on one text and on a batch of eight, a few decoder steps each, before it
        takes work (the engine's thread is not started yet: `run_all` steps here, on a worker thread).
        Warm-up steps are not requests: the engine's observer (its metrics) does not see them."""
        engine = self.engine
        if engine is None:
            return
        texts = [sentence.text for sentence in probe_sentences()]
        languages = self.info.languages
        source = "eng_Latn" if "eng_Latn" in languages else languages[0]
        target = next(code for code in (*WARM_UP_TARGETS, *languages) if code in languages and code != source)
        options = DecodingOptions(max_new_tokens=WARM_UP_TOKENS)
        observer, engine.observer = engine.observer, None
        try:
            await asyncio.to_thread(engine.batch.prepare)
            for count in WARM_UP_BATCHES:
                request = TranslateInput(texts[:count], source, target, options)
                present = list(range(len(request.texts)))
                items, _ = self._items(
                    request, present, [(source, 1.0)] * len(present), target, WARM_UP_TOKENS
                )
                future = engine.submit(items)
                await asyncio.to_thread(engine.run_all)
                future.result()
        finally:
            engine.observer = observer

    def _take_work(self) -> None:
        if self.engine is not None:
            self.engine.start()
        else:
            super()._take_work()

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
        await super().close()

    def _details(self) -> dict[str, Any]:
        return {"languages": list(self.info.languages), "max_new_tokens": self.max_new_tokens}

    async def _run(self, items: list[GenerationItem]) -> list[Decoded]:
        """A batch for Triton's translation model (the remote path)."""
        from gateway.triton.wire import pack_items, unpack_decoded

        assert self.model.remote is not None
        return unpack_decoded(await self.model.remote.run(pack_items(items, self.pad)))

    async def _decode(
        self, items: list[GenerationItem], deadline: float | None, sink: TokenSink | None = None
    ) -> Decodings:
        """The engine's results for a request's texts; leaving early takes its rows out of the batch."""
        assert self.engine is not None
        future = self.engine.submit(items, deadline, sink)
        try:
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()  # no-op once it is done

    # ------------------------------------------------------------------------------------------ requests

    def validate(self, request: TranslateInput) -> tuple[str, str, int]:
        """Normalized source and target codes and the token limit, or InvalidInput naming the field."""
        self.limits.check(request.texts)
        if request.source_lang.strip().lower() in AUTO:
            source = AUTO_SOURCE
        else:
            source = resolve_language(request.source_lang, self.info.languages, "source_lang")
        target = resolve_language(request.target_lang, self.info.languages, "target_lang")
        o = request.options
        cap = self.max_new_tokens
        if o.max_new_tokens > cap:
            raise InvalidInput(
                f"options.max_new_tokens: {o.max_new_tokens} exceeds this model's limit of {cap}"
            )
        if not 1 <= o.beam_size <= MAX_BEAMS:
            raise InvalidInput(f"options.beam_size: {o.beam_size} is outside 1..{MAX_BEAMS}")
        if o.sampling is None and not 1 <= o.num_return <= o.beam_size:
            raise InvalidInput(
                f"options.num_return: {o.num_return} must be between 1 and beam_size ({o.beam_size})"
            )
        if o.sampling is not None and not 1 <= o.num_return <= MAX_SAMPLES:
            raise InvalidInput(f"options.num_return: {o.num_return} samples is outside 1..{MAX_SAMPLES}")
        if not (math.isfinite(o.length_penalty) and abs(o.length_penalty) <= MAX_LENGTH_PENALTY):
            raise InvalidInput(
                f"options.length_penalty: {o.length_penalty} must be a number between "
                f"-{MAX_LENGTH_PENALTY} and {MAX_LENGTH_PENALTY}"
            )
        if o.sampling is not None:
            if o.beam_size > 1:
                raise InvalidInput("options.sampling cannot be combined with beam_size > 1")
            s = o.sampling
            if not (math.isfinite(s.temperature) and s.temperature > 0):
                raise InvalidInput(f"options.sampling.temperature: {s.temperature} must be a number > 0")
            if not 0 < s.top_p <= 1:  # also false for NaN
                raise InvalidInput(f"options.sampling.top_p: {s.top_p} must be in (0, 1]")
            if s.top_k < 0:
                raise InvalidInput(f"options.sampling.top_k: {s.top_k} must be >= 0")
        return source, target, o.max_new_tokens or cap

    async def translate(self, request: TranslateInput, sink: TokenSink | None = None) -> TranslateOutput:
        """Translate a request's texts; `sink` (in-process engine only) gets each token as it is chosen."""
        source, target, limit = self.validate(request)
        size = sum(map(len, request.texts))
        # An empty or whitespace-only text translates to "" without decoding: the rest decode as usual.
        present = [index for index, text in enumerate(request.texts) if text and not text.isspace()]
        sources = await self._sources(request, present, source, size)
        texts, rows = len(present), request.options.rows
        decoded: list[Decoded] = []
        items: list[GenerationItem] = []
        truncated: list[bool] = []
        timing = Timing(0.0, 0.0)
        if present and self.engine is None:  # Triton: through the batcher
            with self.serving(texts, request.deadline, rows=texts * rows) as held:
                items, truncated = await off_loop(size, self._items, request, present, sources, target, limit)
                timed = await self.batcher.submit_all(
                    [(item, len(item.source)) for item in items], request.deadline, rows, held
                )
            decoded, timing = [t.value for t in timed], Timing.of(timed)
        elif present:
            if sink is not None:  # the engine numbers the texts it was given; the sink, the request's
                given, sink = sink, lambda text, row, token: given(present[text], row, token)
            with self.admitted(texts * rows, request.deadline):
                items, truncated = await off_loop(size, self._items, request, present, sources, target, limit)
                result = await self._decode(items, request.deadline, sink)
            decoded = result.decoded
            timing = Timing(1000 * result.queue_seconds, 1000 * result.run_seconds)
        decodings = dict(zip(present, zip(decoded, truncated, strict=True), strict=True))
        translations, output_tokens = await off_loop(
            size, self._translations, request, decodings, dict(zip(present, sources, strict=True)), source
        )
        return TranslateOutput(
            translations=translations,
            source_lang=source,
            target_lang=target,
            usage=Usage(sum(len(item.source) for item in items), output_tokens),
            timing=timing,
        )

    async def translate_tokens(self, request: TranslateInput) -> AsyncIterator[TokenPiece | TranslateOutput]:
        """Each token of a greedy or sampled translation as the engine picks it, with the text it adds;
        then the whole output, as `translate` returns it."""
        if request.options.mode == "beam":
            raise InvalidInput(
                "TranslateTokens streams greedy or sampled translations: beam search knows its tokens only "
                "at the end; use Translate"
            )
        if self.engine is None:
            raise InvalidInput(
                f"model {self.model.name} runs on Triton, which does not stream; use Translate"
            )
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()

        def sink(text: int, row: int, token: int) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(tokens.put_nowait, (text, row, token))

        pieces = _Pieces(self.model.tokenizer.decode)
        translating = asyncio.ensure_future(self.translate(request, sink))
        try:
            while True:
                arrival = asyncio.ensure_future(tokens.get())
                await asyncio.wait({arrival, translating}, return_when=asyncio.FIRST_COMPLETED)
                if not arrival.done():
                    arrival.cancel()
                    break
                yield pieces.add(*arrival.result())
            while not tokens.empty():  # every token the engine chose before it finished
                yield pieces.add(*tokens.get_nowait())
            yield translating.result()
        finally:
            translating.cancel()

    async def _sources(
        self, request: TranslateInput, present: list[int], source: str, size: int
    ) -> list[tuple[str, float]]:
        """Each present text's source language and its probability: the request's, or with "auto" the
        detected one, which must be one this model translates (else InvalidInput naming the text)."""
        if source != AUTO_SOURCE:
            return [(source, 1.0)] * len(present)
        detections = await off_loop(
            size, identifier().detect_all, [request.texts[index] for index in present], 1
        )
        sources = []
        for index, detection in zip(present, detections, strict=True):
            best = detection.best
            if best is None or best.language not in self.info.languages:
                found = "nothing" if best is None else f"{best.iso} ({best.probability:.2f})"
                raise InvalidInput(
                    f"texts[{index}]: its language was detected as {found}, which this model does not "
                    "translate; give source_lang"
                )
            sources.append((best.language, best.probability))
        return sources

    def _items(
        self,
        request: TranslateInput,
        present: list[int],
        sources: list[tuple[str, float]],
        target: str,
        limit: int,
    ) -> tuple[list[GenerationItem], list[bool]]:
        """The texts at `present` as the model's inputs, `<src_lang> tokens </s>`, each seeded by its place
        in the request; and whether each was cut to the model's limit."""
        tokenizer = self.model.tokenizer
        codes = self.info.language_token_ids
        target_id = codes[target]
        room = tokenizer.max_length - 2
        prefix = (self.info.decoder_start_token_id, target_id)
        encoded = tokenizer.encode_batch(
            [request.texts[index] for index in present], add_special_tokens=False, truncate=False
        )
        items = [
            GenerationItem([codes[source], *e.ids[:room], self.eos], prefix, limit, request.options, index)
            for index, e, (source, _) in zip(present, encoded, sources, strict=True)
        ]
        return items, [len(e.ids) > room for e in encoded]

    def _translations(
        self,
        request: TranslateInput,
        decodings: dict[int, tuple[Decoded, bool]],
        sources: dict[int, tuple[str, float]],
        source: str,
    ) -> tuple[list[Translation], int]:
        """One translation per text: the decoded ones, and "" for the texts that were not decoded."""
        translations = []
        output_tokens = 0
        empty = [Hypothesis("", 0.0, [], []) for _ in range(request.options.num_return)]
        for index in range(len(request.texts)):
            if index not in decodings:
                auto = source == AUTO_SOURCE
                translations.append(Translation(empty, False, "" if auto else source, 0.0 if auto else 1.0))
                continue
            decoded, was_cut = decodings[index]
            texts = self.model.tokenizer.decode_batch(decoded.tokens)
            output_tokens += len(decoded.tokens[0])
            hypotheses = [
                Hypothesis(text, score, tokens, logprobs if request.options.return_scores else [])
                for text, score, tokens, logprobs in zip(
                    texts, decoded.scores, decoded.tokens, decoded.logprobs, strict=True
                )
            ]
            translations.append(Translation(hypotheses, was_cut, *sources[index]))
        return translations, output_tokens


@dataclass(frozen=True)
class TokenPiece:
    """A token of one hypothesis as the engine chose it, and the text it adds."""

    text_index: int
    hypothesis: int
    token_id: int
    text: str


class _Pieces:
    """Incremental detokenization: each hypothesis's text so far, decoded whole (a piece can change how
    the one before it reads, e.g. a word-start marker), and what each new token adds to it."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.tokens: dict[tuple[int, int], list[int]] = {}
        self.texts: dict[tuple[int, int], str] = {}

    def add(self, text_index: int, hypothesis: int, token: int) -> TokenPiece:
        key = (text_index, hypothesis)
        ids = self.tokens.setdefault(key, [])
        ids.append(token)
        before, now = self.texts.get(key, ""), self.decode(ids)
        self.texts[key] = now
        piece = now[len(before) :] if now.startswith(before) else now
        return TokenPiece(text_index, hypothesis, token, piece)
