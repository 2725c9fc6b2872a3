"""Embeddings: pooling and normalization run inside the graph, so only [batch, hidden] leaves the runtime.

Each text is one batcher item; a batch pads its items to the longest and runs the encoder once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gateway.batcher import BatcherSettings, Observer
from gateway.errors import InvalidInput
from gateway.offload import off_loop
from gateway.runtime import LoadedModel
from gateway.tasks.base import DEFAULT_LIMITS, BatchedTask, TextLimits, Timing, Usage
from gateway.tokenization import Encoded, pad_batch

Pooling = Literal["mean", "cls"]


@dataclass(frozen=True)
class EmbedInput:
    texts: list[str]
    pooling: Pooling = "mean"
    normalize: bool = False
    truncate: bool = True  # False: texts over the input limit are refused instead of cut
    deadline: float | None = None


@dataclass(frozen=True)
class Embedding:
    values: np.ndarray  # float32 [dimensions]
    truncated: bool


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

    async def embed(self, request: EmbedInput) -> EmbedOutput:
        self.limits.check(request.texts)
        with self.serving(len(request.texts), request.deadline) as held:
            encoded = await off_loop(sum(map(len, request.texts)), self._encode, request)
            output = self._output_name(request.pooling, request.normalize)
            timed = await self.batcher.submit_all(
                [(_EmbedItem(e, output), len(e)) for e in encoded], request.deadline, reservation=held
            )
        return EmbedOutput(
            embeddings=[Embedding(t.value, e.truncated) for t, e in zip(timed, encoded, strict=True)],
            dimensions=self.dimensions,
            usage=Usage(input_tokens=sum(len(e) for e in encoded)),
            timing=Timing.of(timed),
        )

    def _encode(self, request: EmbedInput) -> list[Encoded]:
        encoded = self.model.tokenizer.encode_batch(request.texts)
        if not request.truncate:
            for index, item in enumerate(encoded):
                if item.truncated:
                    raise InvalidInput(
                        f"texts[{index}]: longer than the model's limit of {self.model.tokenizer.max_length} "
                        "tokens; shorten it or set truncate"
                    )
        return encoded

    async def _run(self, items: list[_EmbedItem]) -> list[np.ndarray]:
        input_ids, attention_mask = pad_batch(
            [i.encoded.ids for i in items], self.model.manifest.special_tokens.pad_id
        )
        names = sorted({i.output for i in items})
        out = await self.model.backend.run({"input_ids": input_ids, "attention_mask": attention_mask}, names)
        return [out[item.output][row].astype(np.float32, copy=False) for row, item in enumerate(items)]
