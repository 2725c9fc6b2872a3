"""Dynamic batching: a bounded queue, a wake-up event and one future per request item.

One `DynamicBatcher` serves one (model, variant). Items wait at most `max_queue_delay_ms` for company, but
only when company is likely: an item that reaches an idle batcher (nothing queued, no batch running) runs
at once, so a lone request never pays the delay, while under concurrent load batches fill up. A batch
closes earlier when it reaches `max_batch_size` rows or `max_batch_tokens` padded tokens (the longest row
times the rows, which is what the runtime computes on). An item is one text; it counts as several rows when
the model decodes several sequences for it (beams, samples). Waiting items are sorted by length, so each
batch pads little.

A request enters the queue in one step, all its items or none (RESOURCE_EXHAUSTED when they do not fit), and
leaves it as one: when the caller goes away or one of its items fails, its other items are withdrawn. Room
can be reserved before a request is tokenized (`reserve`), so that a request to be refused costs nothing.
A request with more items than the whole queue holds is admitted in parts, each once the one before it has
run and there is room (other requests' items run between its parts). Items whose deadline passed or whose
caller went away are dropped before they reach the model. A batch that raises an unexpected error is split
and run again in halves, so that only the item that caused it fails.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, ModelNotReady, Overloaded

In = TypeVar("In")
Out = TypeVar("Out")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherSettings:
    max_batch_size: int = 32  # rows per batch
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

    @property
    def part_size(self) -> int:
        """Items a request too large for the whole queue enters at a time: a few batches' worth, so that
        other requests' items queue between its parts."""
        return max(1, min(self.max_queue_size // 2, 4 * self.max_batch_size))


@dataclass(order=True)
class _Item(Generic[In, Out]):
    tokens: int  # per row
    arrival: int  # tie-breaker: first come, first served among equal lengths
    payload: In = field(compare=False)
    future: asyncio.Future[Timed[Out]] = field(compare=False)
    deadline: float | None = field(compare=False)  # time.monotonic() value
    enqueued_at: float = field(compare=False)
    rows: int = field(compare=False, default=1)
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

    size: int  # items
    padded_tokens: int
    queue_seconds: Sequence[float]  # per item
    run_seconds: float
    failed: bool
    rows: int = 0


class Reservation:
    """Room held in a batcher's queue for a request that is not queued yet; released on exit or when its
    items are queued."""

    def __init__(self, batcher: DynamicBatcher[Any, Any], count: int) -> None:
        self._batcher = batcher
        self.count = count

    def take(self) -> None:
        """The request is being queued: its room is no longer held apart (nobody else may take it)."""
        self._batcher._reserved -= self.count
        self.count = 0

    def release(self) -> None:
        if self.count:
            self.take()
            self._batcher._wake_waiters()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
        # Parts of large requests waiting for room, first come first served: (items needed, wake-up).
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._reserved = 0  # room held for requests being tokenized (`reserve`)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    async def close(self) -> None:
        """Stop taking requests, let the queued items run, then stop the loop."""
        self._closed = True
        self._wakeup.set()
        for _, waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(ModelNotReady(f"model {self.name} is shutting down"))
        if self._task is not None:
            await self._task
            self._task = None

    # ----------------------------------------------------------------------------------------- callers

    async def submit(
        self, payload: In, tokens: int, deadline: float | None = None, rows: int = 1
    ) -> Timed[Out]:
        """Queue one item and wait for its result. `deadline` is a time.monotonic() value."""
        return (await self.submit_all([(payload, tokens)], deadline, rows))[0]

    def reserve(self, count: int, deadline: float | None = None) -> Reservation:
        """Hold room for a request of `count` items before it is tokenized, so that a request that will be
        refused (queue full, deadline out of reach) is refused before any work is done for it. Use it as a
        context manager around the work and `submit_all(..., reservation=...)`."""
        if self._closed:
            raise ModelNotReady(f"model {self.name} is shutting down")
        self._check_deadline(deadline)
        first = count if count <= self.settings.max_queue_size else self.settings.part_size
        self._refuse_unless_room(first)
        self._reserved += first
        return Reservation(self, first)

    async def submit_all(
        self,
        items: Sequence[tuple[In, int]],
        deadline: float | None = None,
        rows: int = 1,
        reservation: Reservation | None = None,
    ) -> list[Timed[Out]]:
        """Queue a request's (payload, tokens per row) items in one step and wait for all of them; each item
        stands for `rows` rows. When the caller goes away or one item fails, the others are withdrawn."""
        if reservation is not None:
            reservation.take()  # its room is this request's: no await until the items are queued
        if not items:
            return []
        self._check(items, deadline, rows)
        size = self.settings.max_queue_size
        parts = (
            [items]
            if len(items) <= size
            else [
                items[i : i + self.settings.part_size] for i in range(0, len(items), self.settings.part_size)
            ]
        )
        futures: list[asyncio.Future[Timed[Out]]] = []
        results: list[Timed[Out]] = []
        try:
            for number, part in enumerate(parts):
                if number == 0:
                    self._refuse_unless_room(len(part))
                else:  # the next part of a large request: once the last one ran, and there is room
                    await self._room_for(len(part), deadline)
                queued = self._enqueue(part, deadline, rows)
                futures += queued
                results += await asyncio.gather(*queued)
            return results
        finally:
            self._withdraw(futures)

    def _check(self, items: Sequence[tuple[In, int]], deadline: float | None, rows: int) -> None:
        if self._closed:
            raise ModelNotReady(f"model {self.name} is shutting down")
        budget = self.settings.max_batch_tokens
        for index, (_, tokens) in enumerate(items):
            if tokens * rows > budget:
                raise InvalidInput(
                    f"input {index} needs {tokens} tokens x {rows} rows, over this model's max_batch_tokens "
                    f"({budget}); shorten it or ask for fewer beams or samples"
                )
        self._check_deadline(deadline)

    def _check_deadline(self, deadline: float | None) -> None:
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(f"the deadline passed before the request was queued for {self.name}")

    def _room(self) -> int:
        waiting = sum(needed for needed, _ in self._waiting)
        return self.settings.max_queue_size - len(self._pending) - waiting - self._reserved

    def _refuse_unless_room(self, count: int) -> None:
        if self._room() < count:
            raise Overloaded(
                f"model {self.name} has {len(self._pending)} items queued and this request adds {count} "
                f"(max_queue_size {self.settings.max_queue_size}); retry with backoff"
            )

    async def _room_for(self, count: int, deadline: float | None) -> None:
        """Wait (first come, first served) until `count` more items fit in the queue."""
        if not self._waiting and self._room() >= count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (count, waiter)
        self._waiting.append(entry)
        try:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException as exc:
            self._waiting.remove(entry)
            self._wake_waiters()  # the room it was waiting for may now suit the next part in line
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"deadline passed while waiting for room in the queue of {self.name}"
                ) from None
            raise
        # Woken: the caller queues its part before the loop runs anything else.
        self._waiting.remove(entry)

    def _wake_waiters(self) -> None:
        free = self.settings.max_queue_size - len(self._pending) - self._reserved
        for needed, waiter in self._waiting:
            if needed > free:
                break  # first come, first served: later parts wait behind this one
            if not waiter.done():
                waiter.set_result(None)
            free -= needed

    def _enqueue(
        self, items: Sequence[tuple[In, int]], deadline: float | None, rows: int
    ) -> list[asyncio.Future[Timed[Out]]]:
        """Append items to the queue in one step (no await between the room check and this)."""
        if self._closed:
            raise ModelNotReady(f"model {self.name} is shutting down")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        alone = not self._pending and self._running == 0
        futures = []
        for payload, tokens in items:
            future: asyncio.Future[Timed[Out]] = loop.create_future()
            item = _Item(tokens, next(self._arrivals), payload, future, deadline, now, rows, alone)
            self._pending.append(item)
            futures.append(future)
        self._wakeup.set()
        return futures

    def _withdraw(self, futures: Sequence[asyncio.Future[Timed[Out]]]) -> None:
        """Cancel a finished request's unfinished items and take them out of the queue."""
        withdrawn = False
        for future in futures:
            if not future.done():
                future.cancel()
            if future.cancelled():
                withdrawn = True
            else:
                future.exception()  # retrieved: a sibling's failure already reached the caller
        if withdrawn:
            self._pending = [item for item in self._pending if not item.future.done()]
            self._wake_waiters()

    # -------------------------------------------------------------------------------------------- loop

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
            if not self._pending:  # withdrawn meanwhile
                slots.release()
                continue
            await self._wait_for_company()
            batch = self._take_batch()
            self._wake_waiters()
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
        rows = longest = 0
        for item in self._pending:
            if not item.future.done():
                rows += item.rows
                longest = max(longest, item.tokens)
        return rows >= self.settings.max_batch_size or longest * rows >= self.settings.max_batch_tokens

    def _take_batch(self) -> list[_Item[In, Out]]:
        """The oldest live item and the items closest to it in length, within the row and token budgets."""
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
        longest, real, rows = oldest.tokens, oldest.tokens * oldest.rows, oldest.rows
        ratio = self.settings.max_padding_ratio
        while True:
            below = ordered[low - 1] if low > 0 else None
            above = ordered[high + 1] if high + 1 < len(ordered) else None
            if below is None and above is None:
                break
            take_above = above is not None and (
                below is None or above.tokens - oldest.tokens <= oldest.tokens - below.tokens
            )
            candidate = above if take_above else below
            assert candidate is not None
            if rows + candidate.rows > self.settings.max_batch_size:
                break
            padded = max(longest, candidate.tokens) * (rows + candidate.rows)
            if padded > self.settings.max_batch_tokens:
                break
            if ratio and padded > ratio * (real + candidate.tokens * candidate.rows):
                break  # the closest remaining length already pads too much: farther ones would pad more
            longest = max(longest, candidate.tokens)
            real += candidate.tokens * candidate.rows
            rows += candidate.rows
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
        outcomes = await self._outcomes(batch)
        finished = time.monotonic()
        failed = False
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed = True
                if not item.future.done():
                    item.future.set_exception(outcome)
            elif not item.future.done():
                timed = Timed(outcome, started - item.enqueued_at, finished - started, len(batch), number)
                item.future.set_result(timed)
        rows = sum(item.rows for item in batch)
        if self._observer is not None:
            self._observer(
                BatchStats(
                    size=len(batch),
                    padded_tokens=max(item.tokens for item in batch) * rows,
                    queue_seconds=[started - item.enqueued_at for item in batch],
                    run_seconds=finished - started,
                    failed=failed,
                    rows=rows,
                )
            )

    async def _outcomes(self, batch: list[_Item[In, Out]]) -> list[Out | BaseException]:
        """Each item's result or error. A domain error (a backend down, ...) is every item's; any other error
        is narrowed down by running the batch again in halves, so that only the items that cause it fail."""
        try:
            results = await self._run_batch([item.payload for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: batch of {len(batch)} returned {len(results)} results")
            return list(results)
        except GatewayError as exc:  # expected: its message says it all
            log.warning("batch of %d failed on %s: %s", len(batch), self.name, exc)
            return [exc] * len(batch)
        except Exception as exc:
            if len(batch) == 1:
                log.error("an item failed on %s: %s: %s", self.name, type(exc).__name__, exc, exc_info=exc)
                return [exc]
        live = [item for item in batch if not item.future.done()]
        if len(live) < len(batch):  # callers that left meanwhile are not run again
            outcomes: dict[int, Out | BaseException] = {id(i): asyncio.CancelledError() for i in batch}
            for item, outcome in zip(live, await self._outcomes(live) if live else [], strict=True):
                outcomes[id(item)] = outcome
            return [outcomes[id(item)] for item in batch]
        half = len(batch) // 2
        return [*await self._outcomes(batch[:half]), *await self._outcomes(batch[half:])]
