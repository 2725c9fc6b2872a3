"""Dynamic batching: a bounded queue, a wake-up event and one future per request item.

One `DynamicBatcher` serves one (model, variant). Items wait at most `max_queue_delay_ms` for company, but
only when company is likely: an item that reaches an idle batcher (nothing queued, no batch running) runs
at once, so a lone request never pays the delay, while under concurrent load batches fill up. A batch
closes earlier when it reaches `max_batch_size` items or `max_batch_tokens` padded tokens (the longest
item times the item count, which is what the runtime computes on). Waiting items are sorted by length, so
each batch pads little. Items whose deadline passed or whose caller went away are dropped before they reach
the model; a batch that raises fails its own items only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, ModelNotReady, Overloaded

In = TypeVar("In")
Out = TypeVar("Out")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherSettings:
    max_batch_size: int = 32
    max_batch_tokens: int = 16384  # padded tokens per batch
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 1024  # items waiting; beyond it requests fail fast with RESOURCE_EXHAUSTED
    # Batches running at once: 1 for an in-process session (it uses every core already); more for a remote
    # backend such as Triton, which queues and batches requests itself.
    max_concurrent_batches: int = 1
    # Padded tokens may be at most this many times the real tokens of a batch (0: no limit). On a CPU the
    # padding of mixed lengths costs more than batching gains: items too far in length run apart.
    max_padding_ratio: float = 0.0

    def __post_init__(self) -> None:
        sizes = (self.max_batch_size, self.max_batch_tokens, self.max_queue_size, self.max_concurrent_batches)
        if min(sizes) < 1:
            raise InvalidInput("batcher sizes must be >= 1")
        if self.max_queue_delay_ms < 0:
            raise InvalidInput("max_queue_delay_ms must be >= 0")
        if self.max_padding_ratio != 0 and self.max_padding_ratio < 1:
            raise InvalidInput("max_padding_ratio must be 0 (no limit) or >= 1")


@dataclass(order=True)
class _Item(Generic[In, Out]):
    tokens: int
    arrival: int  # tie-breaker: first come, first served among equal lengths
    payload: In = field(compare=False)
    future: asyncio.Future[Timed[Out]] = field(compare=False)
    deadline: float | None = field(compare=False)  # time.monotonic() value
    enqueued_at: float = field(compare=False)
    alone: bool = field(compare=False, default=False)  # arrived at an idle batcher: runs without waiting


@dataclass(frozen=True)
class Timed(Generic[Out]):
    """An item's result and where its time went."""

    value: Out
    queue_seconds: float
    run_seconds: float
    batch_size: int
    batch: int  # which batch of its batcher it ran in (a sequence number)


@dataclass(frozen=True)
class BatchStats:
    """What one batch looked like: handed to the observer after it ran."""

    size: int
    padded_tokens: int
    queue_seconds: Sequence[float]  # per item
    run_seconds: float
    failed: bool


RunBatch = Callable[[list[In]], Awaitable[Sequence[Out]]]
Observer = Callable[[BatchStats], None]


class DynamicBatcher(Generic[In, Out]):
    """Collects items from concurrent callers into batches for `run_batch`, up to
    `max_concurrent_batches` batches at a time."""

    def __init__(
        self,
        name: str,
        run_batch: RunBatch[In, Out],
        settings: BatcherSettings,
        observer: Observer | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._run_batch = run_batch
        self._observer = observer
        self._pending: list[_Item[In, Out]] = []
        self._wakeup = asyncio.Event()
        self._arrivals = itertools.count()
        self._numbers = itertools.count()  # batches run
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._running = 0  # batches in flight

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    async def close(self) -> None:
        """Stop taking items, let the queued ones run, then stop the loop."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def submit_all(
        self, items: Sequence[tuple[In, int]], deadline: float | None = None
    ) -> list[Timed[Out]]:
        """Queue a request's (payload, tokens) items together and wait for all of them."""
        self.ensure_room(len(items))
        return list(
            await asyncio.gather(*(self.submit(payload, tokens, deadline) for payload, tokens in items))
        )

    def ensure_room(self, count: int) -> None:
        """Refuse a request of `count` items up front when they cannot all be queued, so that none of them
        runs for nothing."""
        if self._closed:
            raise ModelNotReady(f"model {self.name} is shutting down")
        if len(self._pending) + count > self.settings.max_queue_size:
            raise Overloaded(
                f"model {self.name} has {len(self._pending)} items queued and this request adds {count} "
                f"(max_queue_size {self.settings.max_queue_size}); retry with backoff"
            )

    async def submit(self, payload: In, tokens: int, deadline: float | None = None) -> Timed[Out]:
        """Queue one item and wait for its result. `deadline` is a time.monotonic() value."""
        if self._closed:
            raise ModelNotReady(f"model {self.name} is shutting down")
        if len(self._pending) >= self.settings.max_queue_size:
            raise Overloaded(
                f"model {self.name} has {len(self._pending)} items queued (max_queue_size "
                f"{self.settings.max_queue_size}); retry with backoff"
            )
        if tokens > self.settings.max_batch_tokens:
            raise InvalidInput(
                f"an input of {tokens} tokens exceeds max_batch_tokens ({self.settings.max_batch_tokens})"
            )
        future: asyncio.Future[Timed[Out]] = asyncio.get_running_loop().create_future()
        alone = not self._pending and self._running == 0
        item = _Item(tokens, next(self._arrivals), payload, future, deadline, time.monotonic(), alone)
        self._pending.append(item)
        self._wakeup.set()
        try:
            return await future
        finally:
            # A caller that goes away (cancelled, deadline) leaves its future cancelled: the loop skips it.
            if not future.done():
                future.cancel()

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self.settings.max_concurrent_batches)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            self._running -= 1
            slots.release()

        while not (self._closed and not self._pending):
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await slots.acquire()  # a batch forms only when it can run at once
            await self._wait_for_company()
            batch = self._take_batch()
            if not batch:
                slots.release()
                continue
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            running.add(task)
            task.add_done_callback(finished)
        if running:
            await asyncio.gather(*running)

    async def _wait_for_company(self) -> None:
        """Wait until the batch is full or the oldest item has waited max_queue_delay_ms (not at all when it
        arrived at an idle batcher)."""
        oldest = min(self._pending, key=lambda item: item.enqueued_at)
        if oldest.alone:
            return
        close_at = oldest.enqueued_at + self.settings.max_queue_delay_ms / 1000
        while not self._closed and not self._full():
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _full(self) -> bool:
        live = [item for item in self._pending if not item.future.done()]
        if len(live) >= self.settings.max_batch_size:
            return True
        longest = max((item.tokens for item in live), default=0)
        return longest * len(live) >= self.settings.max_batch_tokens

    def _take_batch(self) -> list[_Item[In, Out]]:
        """The oldest live item and the items closest to it in length, within the size and token budgets."""
        now = time.monotonic()
        live: list[_Item[In, Out]] = []
        for item in self._pending:
            if item.future.done():
                continue  # cancelled by its caller
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(DeadlineExceeded(f"deadline passed after queueing for {self.name}"))
                continue
            live.append(item)
        if not live:
            self._pending = []
            return []
        oldest = min(live, key=lambda item: item.arrival)
        ordered = sorted(live)
        start = ordered.index(oldest)
        low = high = start  # grow a window of similar lengths around the oldest item
        longest = real = oldest.tokens
        ratio = self.settings.max_padding_ratio
        while high - low + 1 < self.settings.max_batch_size:
            below = ordered[low - 1] if low > 0 else None
            above = ordered[high + 1] if high + 1 < len(ordered) else None
            if below is None and above is None:
                break
            take_above = above is not None and (
                below is None or above.tokens - oldest.tokens <= oldest.tokens - below.tokens
            )
            candidate = above if take_above else below
            assert candidate is not None
            padded = max(longest, candidate.tokens) * (high - low + 2)
            if padded > self.settings.max_batch_tokens:
                break
            if ratio and padded > ratio * (real + candidate.tokens):
                break  # the closest remaining length already pads too much: farther ones would pad more
            longest = max(longest, candidate.tokens)
            real += candidate.tokens
            if take_above:
                high += 1
            else:
                low -= 1
        batch = ordered[low : high + 1]
        taken = {id(item) for item in batch}
        self._pending = [item for item in live if id(item) not in taken]
        return sorted(batch, key=lambda item: item.arrival)

    async def _run(self, batch: list[_Item[In, Out]]) -> None:
        number = next(self._numbers)
        started = time.monotonic()
        failed = False
        results: Sequence[Out] = []
        try:
            results = await self._run_batch([item.payload for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: batch of {len(batch)} returned {len(results)} results")
        except Exception as exc:  # the batch's callers get the error; the loop goes on
            failed = True
            if isinstance(exc, GatewayError):  # expected (a backend down, ...): its message says it all
                log.warning("batch of %d failed on %s: %s", len(batch), self.name, exc)
            else:
                log.exception("batch of %d failed on %s", len(batch), self.name)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finished = time.monotonic()
        if not failed:
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    timed = Timed(result, started - item.enqueued_at, finished - started, len(batch), number)
                    item.future.set_result(timed)
        if self._observer is not None:
            self._observer(
                BatchStats(
                    size=len(batch),
                    padded_tokens=max(item.tokens for item in batch) * len(batch),
                    queue_seconds=[started - item.enqueued_at for item in batch],
                    run_seconds=finished - started,
                    failed=failed,
                )
            )
