"""Embeddings: pooling and normalization run inside the graph, so only [batch, hidden] leaves the runtime.

Each text is one batcher item; a batch pads its items to the longest and runs the encoder once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gateway.batcher import BatcherSettings, Observer, Reservation
from gateway.errors import InvalidInput
from gateway.offload import off_loop
from gateway.runtime import LoadedModel
from gateway.tasks.base import DEFAULT_LIMITS, BatchedTask, TextLimits, Timing, Usage
from gateway.tokenization import Encoded, pad_batch

Pooling = Literal["mean", "cls"]
# Sentence ends (code-point offsets) of each text, for chunking long ones at sentence boundaries
Boundaries = Callable[[list[str]], Awaitable[list[list[int]]]]


@dataclass(frozen=True)
class EmbedInput:
    texts: list[str]
    pooling: Pooling = "mean"
    normalize: bool = False
    truncate: bool = True  # False: texts over the input limit are refused instead of cut
    long_input: Literal["truncate", "chunk"] = "truncate"  # chunk: the whole text, in chunks that fit
    return_chunks: bool = False
    deadline: float | None = None


@dataclass(frozen=True)
class EmbedTokensInput:
    """Texts a client tokenized with this model's own tokenizer (OpenAI's token-array `input`)."""

    token_ids: list[list[int]]
    pooling: Pooling = "mean"
    normalize: bool = False
    truncate: bool = True
    deadline: float | None = None


@dataclass(frozen=True)
class Chunk:
    start: int  # code-point offsets into the text
    end: int
    tokens: int  # its weight: the tokens the encoder read (special tokens included)
    values: np.ndarray


@dataclass(frozen=True)
class Embedding:
    values: np.ndarray  # float32 [dimensions]
    truncated: bool
    chunks: list[Chunk] = field(default_factory=list)  # long_input chunk with return_chunks


@dataclass(frozen=True)
class EmbedOutput:
    embeddings: list[Embedding]
    dimensions: int
    usage: Usage
    timing: Timing


@dataclass(frozen=True)
class _EmbedItem:
    encoded: Encoded
    output: str  # the graph output holding this item's pooling


class EmbeddingModel(BatchedTask[_EmbedItem, np.ndarray]):
    """Sentence embeddings from an `embedding` export."""

    task = "embedding"

    def __init__(
        self,
        model: LoadedModel,
        settings: BatcherSettings,
        observer: Observer | None = None,
        limits: TextLimits = DEFAULT_LIMITS,
    ) -> None:
        info = model.manifest.embedding
        if info is None:
            raise InvalidInput(f"{model.name} is a {model.manifest.task} model, not an embedding model")
        self.dimensions = info.dimensions
        self._outputs = info.outputs
        super().__init__(model, settings, observer, limits)

    def _details(self) -> dict[str, Any]:
        return {"dimensions": self.dimensions}

    def _output_name(self, pooling: Pooling, normalize: bool) -> str:
        return self._outputs[f"{pooling}_normalized" if normalize else pooling]

    async def embed(self, request: EmbedInput, boundaries: Boundaries | None = None) -> EmbedOutput:
        """Embed each text; with long_input chunk, a text over the input limit is cut into chunks that fit
        (at the sentence ends `boundaries` gives, else at token boundaries), all embedded in the same
        batches, and its vector is their token-weighted mean (normalized after, if asked)."""
        self.limits.check(request.texts)
        if request.long_input == "chunk":
            return await self._embed_chunked(request, boundaries)
        with self.serving(len(request.texts), request.deadline) as held:
            encoded = await off_loop(sum(map(len, request.texts)), self._encode, request)
            return await self._embed_encoded(
                encoded, request.pooling, request.normalize, request.deadline, held
            )

    async def embed_tokens(self, request: EmbedTokensInput) -> EmbedOutput:
        """Embed token id arrays of this model's tokenizer, between the special tokens it adds to a text."""
        rows = request.token_ids
        if not rows:
            raise InvalidInput("input: at least one text or token array is required")
        if len(rows) > self.limits.max_texts:
            raise InvalidInput(
                f"input: {len(rows)} inputs exceed the limit of {self.limits.max_texts} per request"
            )
        vocabulary = self.model.tokenizer.vocab_size
        for index, row in enumerate(rows):
            if not row:
                raise InvalidInput(f"input[{index}]: an empty token array")
            if len(row) > self.limits.max_chars:
                raise InvalidInput(
                    f"input[{index}]: {len(row)} tokens exceed the limit of {self.limits.max_chars}"
                )
            bad = next((token for token in row if not 0 <= token < vocabulary), None)
            if bad is not None:
                raise InvalidInput(
                    f"input[{index}]: token id {bad} is not in this model's vocabulary "
                    f"(0..{vocabulary - 1}); token arrays must come from the model's own tokenizer"
                )
        with self.serving(len(rows), request.deadline) as held:
            encoded = self.model.tokenizer.encode_ids(rows, request.truncate)
            if not request.truncate:
                self._refuse_truncated(encoded, "input")
            return await self._embed_encoded(
                encoded, request.pooling, request.normalize, request.deadline, held
            )

    async def _embed_encoded(
        self,
        encoded: list[Encoded],
        pooling: Pooling,
        normalize: bool,
        deadline: float | None,
        held: Reservation,
    ) -> EmbedOutput:
        output = self._output_name(pooling, normalize)
        timed = await self.batcher.submit_all(
            [(_EmbedItem(e, output), len(e)) for e in encoded], deadline, reservation=held
        )
        return EmbedOutput(
            embeddings=[Embedding(t.value, e.truncated) for t, e in zip(timed, encoded, strict=True)],
            dimensions=self.dimensions,
            usage=Usage(input_tokens=sum(len(e) for e in encoded)),
            timing=Timing.of(timed),
        )

    async def _embed_chunked(self, request: EmbedInput, boundaries: Boundaries | None) -> EmbedOutput:
        size = sum(map(len, request.texts))
        tokenizer = self.model.tokenizer
        whole = await off_loop(size, tokenizer.encode_batch, request.texts, False, False)
        room = tokenizer.max_length - len(tokenizer.encode_batch([""])[0])  # content tokens per chunk
        long = [index for index, e in enumerate(whole) if len(e) > room]
        ends: dict[int, list[int]] = {}
        if long and boundaries is not None:
            found = await boundaries([request.texts[index] for index in long])
            ends = dict(zip(long, found, strict=True))
        spans = [
            _chunks(text, e, room, ends.get(index, []))
            if index in ends or len(e) > room
            else [(0, len(text))]
            for index, (text, e) in enumerate(zip(request.texts, whole, strict=True))
        ]
        pieces = [request.texts[i][a:b] for i, text_spans in enumerate(spans) for a, b in text_spans]
        output = self._output_name(request.pooling, normalize=False)
        with self.serving(len(pieces), request.deadline) as held:
            encoded = await off_loop(size, tokenizer.encode_batch, pieces)
            timed = await self.batcher.submit_all(
                [(_EmbedItem(e, output), len(e)) for e in encoded], request.deadline, reservation=held
            )
        embeddings, cursor = [], 0
        for text_spans in spans:
            parts = [
                Chunk(a, b, len(e), t.value)
                for (a, b), e, t in zip(
                    text_spans,
                    encoded[cursor : cursor + len(text_spans)],
                    timed[cursor : cursor + len(text_spans)],
                    strict=True,
                )
            ]
            cursor += len(text_spans)
            weights = np.array([c.tokens for c in parts], dtype=np.float64)
            mean = (np.stack([c.values for c in parts]) * weights[:, None]).sum(0) / weights.sum()
            if request.normalize:
                mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
            embeddings.append(
                Embedding(mean.astype(np.float32), False, parts if request.return_chunks else [])
            )
        return EmbedOutput(embeddings, self.dimensions, Usage(sum(len(e) for e in encoded)), Timing.of(timed))

    def _encode(self, request: EmbedInput) -> list[Encoded]:
        encoded = self.model.tokenizer.encode_batch(request.texts)
        if not request.truncate:
            self._refuse_truncated(encoded, "texts")
        return encoded

    def _refuse_truncated(self, encoded: list[Encoded], field: str) -> None:
        for index, item in enumerate(encoded):
            if item.truncated:
                raise InvalidInput(
                    f"{field}[{index}]: longer than the model's limit of {self.model.tokenizer.max_length} "
                    "tokens; shorten it or set truncate"
                )

    def _warm_up_items(self, texts: list[str]) -> list[_EmbedItem]:
        output = self._output_name("mean", normalize=True)
        return [_EmbedItem(e, output) for e in self.model.tokenizer.encode_batch(texts)]

    async def _run(self, items: list[_EmbedItem]) -> list[np.ndarray]:
        input_ids, attention_mask = pad_batch(
            [i.encoded.ids for i in items], self.model.manifest.special_tokens.pad_id
        )
        names = sorted({i.output for i in items})
        out = await self.model.backend.run({"input_ids": input_ids, "attention_mask": attention_mask}, names)
        return [out[item.output][row].astype(np.float32, copy=False) for row, item in enumerate(items)]


def _chunks(text: str, encoded: Encoded, room: int, sentence_ends: list[int]) -> list[tuple[int, int]]:
    """Spans of `text` of at most `room` tokens each, cut at the last sentence end that fits (or, inside a
    sentence longer than that, at a token boundary). Between chunks, whitespace goes with neither."""
    offsets = encoded.offsets
    if not offsets:
        return [(0, len(text))]
    # a cut may fall before token i when a sentence ends at or before that token's start
    starts = np.array([start for start, _ in offsets])
    cuttable = set(np.searchsorted(starts, sentence_ends).tolist())
    spans, first = [], 0
    while first < len(offsets):
        last = min(first + room, len(offsets))
        if last < len(offsets):
            best = max((i for i in cuttable if first < i <= last), default=last)
            last = best
        spans.append((offsets[first][0], offsets[last - 1][1]))
        first = last
    return spans
