"""What every task reply carries: token usage and timing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.batcher import BatcherSettings, DynamicBatcher, Observer, Timed
from gateway.errors import InvalidInput
from gateway.runtime import LoadedModel

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class TextLimits:
    """What one request may carry (the server's `limits` settings)."""

    max_texts: int = 256
    max_chars: int = 20000  # characters per text

    def check(self, texts: Sequence[str]) -> None:
        """1..max_texts non-empty texts of at most max_chars characters, or InvalidInput naming the text."""
        if not texts:
            raise InvalidInput("texts: at least one text is required")
        if len(texts) > self.max_texts:
            raise InvalidInput(f"texts: {len(texts)} texts exceed the limit of {self.max_texts} per request")
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidInput(f"texts[{index}]: empty text")
            if len(text) > self.max_chars:
                raise InvalidInput(
                    f"texts[{index}]: {len(text)} characters exceed the limit of {self.max_chars}"
                )


DEFAULT_LIMITS = TextLimits()


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    queue_ms: float  # the longest any of the request's items waited in the queue
    inference_ms: float  # the sum of the runs of the batches its items took part in, each counted once

    @classmethod
    def of(cls, items: Sequence[Timed[Any]]) -> Timing:
        if not items:
            return cls(0.0, 0.0)
        runs = {item.batch: item.run_seconds for item in items}
        return cls(
            queue_ms=1000 * max(item.queue_seconds for item in items),
            inference_ms=1000 * sum(runs.values()),
        )


class BatchedTask(Generic[In, Out]):
    """What every task model shares: its exported model, request limits, and one batcher over `_run`."""

    def __init__(
        self, model: LoadedModel, settings: BatcherSettings, observer: Observer | None, limits: TextLimits
    ) -> None:
        self.model = model
        self.limits = limits
        self.batcher: DynamicBatcher[In, Out] = DynamicBatcher(model.name, self._run, settings, observer)

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    async def _run(self, items: list[In]) -> Sequence[Out]:
        """Run one batch: one result per item, in order."""
        raise NotImplementedError
