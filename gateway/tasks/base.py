"""What every task model shares: request limits, admission, work off the event loop, usage and timing."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gateway.batcher import BatcherSettings, DynamicBatcher, Observer, Reservation, Timed
from gateway.errors import InvalidInput, Overloaded
from gateway.manifest import AccuracyReport
from gateway.runtime import LoadedModel
from gateway.samples import probe_sentences

In = TypeVar("In")
Out = TypeVar("Out")
WARM_UP_BATCHES = (1, 8)  # texts per warm-up run: the one-text path and a batch


@dataclass(frozen=True)
class TextLimits:
    """What one request may carry, and how many requests a model takes at once (the `limits` settings)."""

    max_texts: int = 256
    max_chars: int = 20000  # characters per text
    max_request_chars: int = 1_000_000  # characters of all texts of one request together
    max_in_flight: int = 256  # requests of one model being served at once; more are RESOURCE_EXHAUSTED
    max_masks: int = 16  # FillMask: mask tokens per text
    max_reply_chars: int = 4_000_000  # FillMask: text repeated in `sequence`s, summed over predictions

    def check(self, texts: Sequence[str]) -> None:
        """1..max_texts texts within the character limits, or InvalidInput naming the text. Empty and
        whitespace-only texts are texts: each task answers them (see the proto)."""
        if not texts:
            raise InvalidInput("texts: at least one text is required")
        if len(texts) > self.max_texts:
            raise InvalidInput(f"texts: {len(texts)} texts exceed the limit of {self.max_texts} per request")
        total = 0
        for index, text in enumerate(texts):
            if len(text) > self.max_chars:
                raise InvalidInput(
                    f"texts[{index}]: {len(text)} characters exceed the limit of {self.max_chars}"
                )
            total += len(text)
        if total > self.max_request_chars:
            raise InvalidInput(
                f"texts: {total} characters in all exceed the limit of {self.max_request_chars} per request; "
                "split the request"
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


class Throughput:
    """Rows a model finishes per second of being busy, over its last few seconds of work: what admission
    divides the work ahead of a request by. Idle time does not count, so a burst after a quiet spell is
    judged by what the model can do, not by what it was asked to do."""

    WINDOW = 5.0  # seconds of busy time remembered
    MIN_ROWS = 16  # rows finished before the figure is trusted

    def __init__(self) -> None:
        self._finished: collections.deque[tuple[float, int]] = collections.deque()  # (busy clock, rows)
        self._busy = 0.0  # busy seconds before the current busy spell
        self._busy_since: float | None = None
        self._active = 0

    def _clock(self, now: float) -> float:
        return self._busy + (now - self._busy_since if self._busy_since is not None else 0.0)

    def begin(self) -> None:
        if self._active == 0:
            self._busy_since = time.monotonic()
        self._active += 1

    def end(self, rows: int, finished: bool) -> None:
        now = time.monotonic()
        clock = self._clock(now)
        if finished:
            self._finished.append((clock, rows))
            while self._finished and self._finished[0][0] < clock - self.WINDOW:
                self._finished.popleft()
        self._active -= 1
        if self._active == 0:
            self._busy, self._busy_since = clock, None

    def per_second(self) -> float | None:
        rows = sum(r for _, r in self._finished)
        if rows < self.MIN_ROWS:
            return None
        span = self._clock(time.monotonic()) - self._finished[0][0]
        return rows / max(span, 0.05)


@dataclass(frozen=True)
class ModelDescription:
    """What a served model is and where it runs: what ListModels answers, the metrics' model_info and the
    startup log say about it."""

    name: str
    task: str
    variant: str
    backend: str  # "onnxruntime" | "triton"
    device: str
    provider: str
    max_input_tokens: int
    source: str  # the checkpoint it was exported from, and the start of its hash
    random_weights: bool
    ready: bool
    accuracy: AccuracyReport | None
    languages: list[str] = field(default_factory=list)  # translation
    max_new_tokens: int = 0  # translation: the most tokens a request may ask for
    labels: list[str] = field(default_factory=list)  # token classification
    dimensions: int = 0  # embedding


class BatchedTask(Generic[In, Out]):
    """What every task model shares: its exported model, request limits, admission, one batcher over
    `_run`, and its lifecycle: `start` connects the model's parts and takes work, `close` drains and
    releases them."""

    task: str

    def __init__(
        self, model: LoadedModel, settings: BatcherSettings, observer: Observer | None, limits: TextLimits
    ) -> None:
        self.model = model
        self.limits = limits
        self.batcher: DynamicBatcher[In, Out] = DynamicBatcher(model.name, self._run, settings, observer)
        self.in_flight = 0
        self.rows_in_flight = 0
        self.throughput = Throughput()

    @property
    def queue_depth(self) -> int:
        """Items waiting to run."""
        return self.batcher.queue_depth

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def ready(self) -> bool:
        """Whether its parts can run now (a Triton model: whether the server has it ready)."""
        return self.model.ready

    async def start(self) -> None:
        await self.model.start()
        if self.model.runner.name == "onnxruntime":  # a Triton server warms its own models
            await self._warm_up()
        self._take_work()

    async def _warm_up(self) -> None:
        """Run the model once on one text and once on a small batch before it takes work, so that the
        first requests do not pay for the session's first runs (memory arena, thread pool, kernels). Below
        the batcher: warm-up runs are not requests and do not show in the metrics."""
        texts = [sentence.text for sentence in probe_sentences()]
        for count in WARM_UP_BATCHES:
            items = self._warm_up_items(texts[:count])
            if items:
                await self._run(items)

    def _warm_up_items(self, texts: list[str]) -> list[In]:
        """A batch of the task's items made of `texts`, for the warm-up; none: no warm-up."""
        return []

    def _take_work(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        await self.model.close()

    def describe(self) -> ModelDescription:
        model, manifest = self.model, self.model.manifest
        runner = model.runner
        return ModelDescription(
            name=model.name,
            task=manifest.task,
            variant=model.variant.name,
            backend=runner.name,
            device=runner.device,
            provider=runner.provider,
            max_input_tokens=manifest.max_input_tokens,
            source=f"{manifest.source.name} sha256:{manifest.source.sha256[:16]}",
            random_weights=manifest.source.random_weights,
            ready=model.ready,
            accuracy=model.variant.accuracy,
            **self._details(),
        )

    def _details(self) -> dict[str, Any]:
        """The task's own fields of its description."""
        return {}

    @contextmanager
    def admitted(self, rows: int, deadline: float | None) -> Iterator[None]:
        """One request of `rows` rows (texts, times their beams or samples) being served. Refused at once
        (RESOURCE_EXHAUSTED) beyond `max_in_flight`, or when the work already in flight, at the rate the
        model has been finishing it, would take longer than the time left before `deadline`."""
        name = self.model.name
        if self.in_flight >= self.limits.max_in_flight:
            raise Overloaded(
                f"model {name} is serving {self.in_flight} requests (max_in_flight "
                f"{self.limits.max_in_flight}); retry with backoff"
            )
        if deadline is not None and self.rows_in_flight:
            rate = self.throughput.per_second()
            remaining = deadline - time.monotonic()
            if rate is not None and (self.rows_in_flight + rows) / rate > remaining:
                expected = (self.rows_in_flight + rows) / rate
                ahead = f"{self.in_flight} request{'s' if self.in_flight > 1 else ''}"
                raise Overloaded(
                    f"model {name} cannot answer within the deadline: with the {ahead} in flight it needs "
                    f"about {expected:.2f} s and {max(remaining, 0):.2f} s remain; retry with backoff"
                )
        self.in_flight += 1
        self.rows_in_flight += rows
        self.throughput.begin()
        finished = False
        try:
            yield
            finished = True
        finally:
            self.in_flight -= 1
            self.rows_in_flight -= rows
            self.throughput.end(rows, finished)

    @contextmanager
    def serving(self, texts: int, deadline: float | None, rows: int | None = None) -> Iterator[Reservation]:
        """Admission of a request of `texts` items (`rows` rows in all, default one per item) and room held
        for its items in the queue, before any work is done for it."""
        with (
            self.admitted(texts if rows is None else rows, deadline),
            self.batcher.reserve(texts, deadline) as held,
        ):
            yield held

    async def _run(self, items: list[In]) -> Sequence[Out]:
        """Run one batch: one result per item, in order."""
        raise NotImplementedError
