"""The decoding engine of one translation model: iteration-level (continuous) batching on a thread of its
own, with no asyncio inside.

Every step: requests that left (cancelled, past their deadline) leave the batch; waiting requests join
while the budgets allow (rows, beams and samples counted, and cached tokens: source plus self-attention
slots of every row), their encoder and cross projections run once; one decoder step runs for every row;
each text's search picks its tokens (greedy, beam, sampling) and says which rows go on; finished texts leave,
and a request's future resolves as soon as its last text is done. Rows of different lengths, target
languages and decoding modes share every step (`batch.Batch`). `scheduling="static"` admits only when the
batch is empty, for the side-by-side comparison.

The server runs the engine's loop on its thread (`start`); Triton's Python model, the export accuracy report
and the bench's ONNX-Runtime-direct baseline run it to completion in their own thread (`run_all`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from gateway.backends.onnxruntime import OnnxRuntimeBackend
from gateway.decoding.batch import Batch, Cache, StepParts
from gateway.decoding.search import Decoded, GenerationItem, Independent, Search, StepView, search_for
from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, ModelNotReady, Overloaded

log = logging.getLogger(__name__)
Scheduling = Literal["continuous", "static"]
KvCache = Literal["auto", "numpy", "ortvalue"]
TokenSink = Callable[[int, int, int], None]  # (text index, row, token): a token as soon as it is chosen


@dataclass(frozen=True)
class EngineSettings:
    max_batch_size: int = 64  # rows decoding at once (a text with 4 beams is 4 rows)
    max_batch_tokens: int = 65536  # cached tokens: source tokens plus self-attention slots, over all rows
    max_queue_size: int = 1024  # texts waiting to join; beyond it requests fail fast with RESOURCE_EXHAUSTED
    scheduling: Scheduling = "continuous"
    # Where the cache lives: numpy arrays in host memory (`batch.Batch`), or ONNX Runtime values on the
    # decoder's device (`resident.ResidentBatch`); auto: ortvalue for a session on a GPU, else numpy.
    kv_cache: KvCache = "auto"

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_batch_tokens, self.max_queue_size) < 1:
            raise InvalidInput("engine budgets must be >= 1")
        if self.scheduling not in ("continuous", "static"):
            raise InvalidInput(f"scheduling must be continuous or static, not {self.scheduling!r}")
        if self.kv_cache not in ("auto", "numpy", "ortvalue"):
            raise InvalidInput(f"kv_cache must be auto, numpy or ortvalue, not {self.kv_cache!r}")


def cache_for(parts: StepParts, pad_id: int, kind: KvCache = "auto") -> Cache:
    """The rows' state for `parts`: on the decoder's device when it is a GPU (or when asked), else numpy."""
    step = parts.decoder_step
    if kind == "auto":
        on_gpu = isinstance(step, OnnxRuntimeBackend) and step.device != "cpu"
        kind = "ortvalue" if on_gpu else "numpy"
    if kind == "ortvalue":
        from gateway.decoding.resident import ResidentBatch

        return ResidentBatch(parts, pad_id)
    return Batch(parts, pad_id)


@dataclass(frozen=True)
class StepStats:
    """One engine step, for metrics."""

    rows: int  # rows that ran the decoder step
    admitted: int  # texts that joined before it
    seconds: float
    new_tokens: int
    first_tokens: Sequence[float] = ()  # seconds from submission to the first token, for texts that got it
    waited: Sequence[float] = ()  # seconds the texts that joined before it waited for the engine to take them
    cached_tokens: int = 0
    encode_seconds: float = 0.0  # running the encoder for the texts that joined


@dataclass(frozen=True)
class Decodings:
    """A request's results, one per text, and where its time went."""

    decoded: list[Decoded]
    queue_seconds: float  # from submission until its last text joined the batch
    run_seconds: float  # from its first text joining until its last one finished


@dataclass
class _Request:
    items: list[GenerationItem]
    deadline: float | None
    future: concurrent.futures.Future[Decodings]
    sink: TokenSink | None
    submitted: float
    results: list[Decoded | None] = field(default_factory=list)
    remaining: int = 0
    first_joined: float | None = None
    last_joined: float = 0.0


@dataclass
class _Text:
    """One text in the batch, and its rows there (in the order its search knows them)."""

    request: _Request
    index: int  # in its request
    search: Search
    forced: list[int]  # prefix tokens still to feed
    next_tokens: list[int]  # per row, the token fed at the next step
    rows: list[int] = field(default_factory=list)
    length: int = 0  # decoder tokens fed so far (the next token's position)
    first_token: bool = False


class Engine:
    """Continuous batching over one model's translation parts."""

    def __init__(
        self,
        name: str,
        parts: StepParts,
        eos_id: int,
        pad_id: int,
        settings: EngineSettings = EngineSettings(),
        observer: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.name = name
        self.eos = eos_id
        self.batch = cache_for(parts, pad_id, settings.kv_cache)
        self.settings = settings
        self.observer = observer
        self._waiting: collections.deque[tuple[_Request, int]] = collections.deque()  # (request, text index)
        self._texts: list[_Text] = []  # in batch row order
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    # --------------------------------------------------------------------------------- any thread

    @property
    def rows_in_flight(self) -> int:
        return self.batch.rows

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self, items: Sequence[GenerationItem], deadline: float | None = None, sink: TokenSink | None = None
    ) -> concurrent.futures.Future[Decodings]:
        """Queue one request's texts (thread-safe). Its future resolves with one Decoded per text; cancel
        it and its rows leave at the next step. `deadline` is a time.monotonic() value. A text over the
        budgets (more beams than `max_batch_size` rows) decodes alone, when the batch is empty."""
        future: concurrent.futures.Future[Decodings] = concurrent.futures.Future()
        budget = self.settings
        with self._lock:
            if self._closing:
                raise ModelNotReady(f"model {self.name} is shutting down")
            # a request larger than the whole queue is taken when the queue is empty
            if self._waiting and len(self._waiting) + len(items) > budget.max_queue_size:
                raise Overloaded(
                    f"model {self.name} has {len(self._waiting)} texts waiting and this request adds "
                    f"{len(items)} (max_queue_size {budget.max_queue_size}); retry with backoff"
                )
            request = _Request(list(items), deadline, future, sink, time.monotonic())
            request.results = [None] * len(items)
            request.remaining = len(items)
            self._waiting.extend((request, index) for index in range(len(items)))
            self._lock.notify()
        if not items:
            _resolve(future, Decodings([], 0.0, 0.0))
        return future

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"engine-{self.name}", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Finish what was submitted, then stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_all(self) -> None:
        """Run steps in the calling thread until nothing is waiting or decoding (no thread started)."""
        while self._iteration():
            pass

    # ------------------------------------------------------------------------------- engine thread

    def _serve(self) -> None:
        from gateway.offload import behind_the_loop

        behind_the_loop()
        while True:
            with self._lock:
                while not self._waiting and not self._texts and not self._closing:
                    self._lock.wait()
                if self._closing and not self._waiting and not self._texts:
                    return
            try:
                self._iteration()
            except Exception as exc:  # a failed step fails the texts in it; the engine goes on
                log.error("decoding step failed on %s: %s", self.name, exc, exc_info=exc)
                self._fail_all(exc)

    def _iteration(self) -> bool:
        """One step; False when there was nothing to do."""
        self._drop_departed()
        waited, encode_seconds = self._admit()
        if not self._texts:
            return bool(self._waiting)
        started = time.monotonic()
        cached = self.batch.cached_tokens
        tokens = np.zeros(self.batch.rows, dtype=np.int64)
        positions = np.zeros(self.batch.rows, dtype=np.int64)
        for text in self._texts:
            tokens[text.rows] = text.next_tokens
            positions[text.rows] = text.length
        view = StepView.of(self.batch.step(tokens, positions))
        leaving: list[int] = []
        survivors: list[_Text] = []
        new_tokens = 0
        first: list[float] = []
        now = time.monotonic()
        for text in self._texts:
            text.length += 1
            if text.forced:
                text.forced.pop(0)
            if text.forced:  # still in its prefix: every row takes the next forced token
                text.next_tokens = [text.forced[0]] * len(text.rows)
                survivors.append(text)
                continue
            parents, chosen = text.search.step(view, text.rows)
            generated = text.search.new_tokens()
            new_tokens += len(generated) if isinstance(text.search, Independent) else 1
            if not text.first_token:
                text.first_token = True
                first.append(now - text.request.submitted)
            if text.request.sink is not None:
                for copy, token in generated:
                    text.request.sink(text.index, copy, token)
            if text.search.done:
                leaving += text.rows
                self._finish(text)
                continue
            if isinstance(text.search, Independent):  # rows that finished leave; the others keep their state
                kept = [text.rows[p] for p in parents]
                leaving += sorted(set(text.rows) - set(kept))
                text.rows = kept
            else:  # beams: the same rows, each taking its parent's state
                self.batch.reorder(text.rows, parents)
            text.next_tokens = chosen
            survivors.append(text)
        self._texts = survivors
        self._remove(leaving)
        if self.observer is not None:
            seconds = time.monotonic() - started
            stats = StepStats(
                len(tokens), len(waited), seconds, new_tokens, first, waited, cached, encode_seconds
            )
            self.observer(stats)
        return True

    def _remove(self, rows: list[int]) -> None:
        """Take rows out of the batch and follow the rows it moves into their places."""
        moved = self.batch.remove(rows)
        if moved:
            for text in self._texts:
                text.rows = [moved.get(row, row) for row in text.rows]

    def _admit(self) -> tuple[list[float], float]:
        """Let waiting texts join, first come first served, while the budgets allow (static: only into an
        empty batch). An empty batch always takes the next text. Returns how long each waited for the engine
        to take it, and the seconds its encoder took."""
        if self.settings.scheduling == "static" and self._texts:
            return [], 0.0
        joining: list[_Text] = []
        budget = self.settings
        rows, cached = self.batch.rows, self.batch.cached_tokens
        with self._lock:
            while self._waiting:
                request, index = self._waiting[0]
                item = request.items[index]
                need = item.options.rows
                tokens = need * (len(item.source) + self.batch.slots + 2)
                over = rows + need > budget.max_batch_size or cached + tokens > budget.max_batch_tokens
                if over and (joining or self._texts):
                    break
                self._waiting.popleft()
                if request.future.done():  # cancelled, or failed meanwhile
                    continue
                rows, cached = rows + need, cached + tokens
                now = time.monotonic()
                request.first_joined = request.first_joined or now
                request.last_joined = now
                search = search_for(item, self.eos)
                forced = list(item.prefix)
                joining.append(_Text(request, index, search, forced, [forced[0]] * search.rows))
        if not joining:
            return [], 0.0
        taken = time.monotonic()
        waited = [taken - text.request.submitted for text in joining]
        try:
            sources = [text.request.items[text.index].source for text in joining]
            cross_kv, source_mask = self.batch.encode(sources)
        except Exception as exc:
            log.error("encoder failed on %s: %s", self.name, exc, exc_info=exc)
            for text in joining:
                self._fail(text.request, exc)
            return [], 0.0
        placed = self.batch.join(cross_kv, source_mask, [t.search.rows for t in joining])
        for text, text_rows in zip(joining, placed, strict=True):
            text.rows = text_rows
        self._texts.extend(joining)
        return waited, time.monotonic() - taken

    def _drop_departed(self) -> None:
        """Texts whose request was cancelled or whose deadline passed leave the batch now."""
        now = time.monotonic()
        leaving: list[int] = []
        survivors: list[_Text] = []
        for text in self._texts:
            request = text.request
            if request.deadline is not None and request.deadline <= now:
                _reject(
                    request.future, DeadlineExceeded(f"the deadline passed while {self.name} was translating")
                )
            if request.future.done():
                leaving += text.rows
            else:
                survivors.append(text)
        if leaving:
            self._texts = survivors
            self._remove(leaving)
        with self._lock:  # waiting texts whose request left never join
            expired = [r for r, _ in self._waiting if r.deadline is not None and r.deadline <= now]
            for request in expired:
                _reject(
                    request.future, DeadlineExceeded(f"the deadline passed while waiting for {self.name}")
                )
            if any(request.future.done() for request, _ in self._waiting):
                self._waiting = collections.deque((r, i) for r, i in self._waiting if not r.future.done())

    def _finish(self, text: _Text) -> None:
        request = text.request
        request.results[text.index] = text.search.result()
        request.remaining -= 1
        if request.remaining == 0:
            now = time.monotonic()
            decoded = [r for r in request.results if r is not None]
            joined = request.first_joined or now
            _resolve(
                request.future, Decodings(decoded, request.last_joined - request.submitted, now - joined)
            )

    def _fail(self, request: _Request, exc: BaseException) -> None:
        _reject(
            request.future, exc if isinstance(exc, GatewayError) else RuntimeError(f"decoding failed: {exc}")
        )

    def _fail_all(self, exc: BaseException) -> None:
        for text in self._texts:
            self._fail(text.request, exc)
        self._texts = []
        self.batch.clear()


def _resolve(future: concurrent.futures.Future[Decodings], value: Decodings) -> None:
    """Set a result unless the caller cancelled meanwhile (from another thread)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_result(value)


def _reject(future: concurrent.futures.Future[Decodings], exc: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_exception(exc)
