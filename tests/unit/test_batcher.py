"""DynamicBatcher: batching, budgets, length sorting, deadlines, cancellation, failures, overload,
all-or-nothing admission, parts, rows."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.batcher import BatcherSettings, BatchStats, DynamicBatcher
from gateway.errors import DeadlineExceeded, ModelNotReady, Overloaded


class Recorder:
    """A fake runtime: records each batch, doubles each payload, optionally fails or blocks.

    `started` is set when a batch reaches the runtime (before it waits on `hold`), so that tests know a
    batch is running without guessing with a sleep."""

    def __init__(
        self, fail_on: int | None = None, hold: asyncio.Event | None = None, error: Exception | None = None
    ) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.hold = hold
        self.error = error or RuntimeError("runtime failure")
        self.started = asyncio.Event()

    async def __call__(self, payloads: list[int]) -> list[int]:
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        self.batches.append(payloads)
        if self.fail_on is not None and self.fail_on in payloads:
            raise self.error
        return [p * 2 for p in payloads]

    async def running(self) -> None:
        """Wait until a batch is in the runtime, and reset for the next one."""
        await self.started.wait()
        self.started.clear()


class Batcher(DynamicBatcher[int, int]):
    """Returns plain values, and keeps the observed batch stats."""

    def __init__(self, run: Recorder, settings: BatcherSettings) -> None:
        self.stats: list[BatchStats] = []
        super().__init__("test", run, settings, self.stats.append)

    async def value(self, payload: int, tokens: int, deadline: float | None = None, rows: int = 1) -> int:
        timed = await self.submit(payload, tokens, deadline, rows)
        assert timed.queue_seconds >= 0
        assert timed.run_seconds >= 0
        return timed.value

    async def values(self, payloads: list[int], tokens: int = 1, rows: int = 1) -> list[int]:
        return [t.value for t in await self.submit_all([(p, tokens) for p in payloads], rows=rows)]


def _batcher(run: Recorder, **settings: float) -> Batcher:
    batcher = Batcher(run, BatcherSettings(**settings))  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def _queued(batcher: Batcher, count: int) -> None:
    """Let the loop run until `count` items are queued (each step is one loop turn, no sleeping)."""
    for _ in range(1000):
        if batcher.queue_depth >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{count} items never queued (queue depth {batcher.queue_depth})")


async def test_concurrent_items_share_a_batch_and_get_their_own_results() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_ms=50)
    results = await asyncio.gather(*(batcher.value(i, tokens=10) for i in range(8)))
    assert results == [i * 2 for i in range(8)]
    assert [len(b) for b in run.batches] == [8]
    await batcher.close()


async def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=4, max_queue_delay_ms=600_000)
    await asyncio.wait_for(asyncio.gather(*(batcher.value(i, tokens=1) for i in range(4))), 60)
    await batcher.close()


async def test_token_budget_counts_padding() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=64, max_batch_tokens=100, max_queue_delay_ms=20)
    # 10 items of 30 tokens: at most 3 per batch (3 x 30 = 90 <= 100 < 4 x 30).
    await asyncio.gather(*(batcher.value(i, tokens=30) for i in range(10)))
    assert max(len(b) for b in run.batches) == 3
    assert sorted(p for b in run.batches for p in b) == list(range(10))
    assert all(s.padded_tokens <= 100 for s in batcher.stats)
    await batcher.close()


async def test_rows_count_against_both_budgets() -> None:
    """A text decoded with 4 beams is 4 rows: 8 such texts fill batches of 8 rows two at a time."""
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=8, max_batch_tokens=1000, max_queue_delay_ms=1)
    first = asyncio.create_task(batcher.values([100], tokens=10, rows=4))
    await run.running()
    rest = asyncio.create_task(batcher.values(list(range(8)), tokens=10, rows=4))
    await _queued(batcher, 8)
    hold.set()
    assert await first == [200]
    assert await rest == [i * 2 for i in range(8)]
    assert [len(b) for b in run.batches] == [1, 2, 2, 2, 2]
    assert all(s.rows <= 8 for s in batcher.stats)
    # 30 tokens x 40 rows cannot fit a budget of 1000 padded tokens, even alone
    with pytest.raises(Exception, match="max_batch_tokens"):
        await batcher.submit(1, tokens=30, rows=40)
    await batcher.close()


async def test_batches_group_similar_lengths() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=2, max_queue_delay_ms=1)
    first = asyncio.create_task(batcher.value(9, tokens=1))
    await run.running()
    lengths = {0: 5, 1: 500, 2: 6, 3: 490}
    tasks = [asyncio.create_task(batcher.value(i, tokens=n)) for i, n in lengths.items()]
    await _queued(batcher, 4)
    hold.set()
    await asyncio.gather(first, *tasks)
    assert sorted(sorted(b) for b in run.batches[1:]) == [[0, 2], [1, 3]]
    await batcher.close()


async def test_expired_items_never_reach_the_model() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=1, max_queue_delay_ms=0)
    first = asyncio.create_task(batcher.value(1, tokens=1))
    await run.running()
    expired = asyncio.create_task(batcher.value(2, tokens=1, deadline=time.monotonic() + 0.01))
    await _queued(batcher, 1)
    while time.monotonic() < batcher._pending[0].deadline:  # type: ignore[operator]
        await asyncio.sleep(0.005)  # until the deadline has passed (a condition, not a guess)
    hold.set()
    assert await first == 2
    with pytest.raises(DeadlineExceeded):
        await expired
    assert [p for b in run.batches for p in b] == [1]
    await batcher.close()


async def test_cancelled_items_never_reach_the_model() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=1, max_queue_delay_ms=0)
    first = asyncio.create_task(batcher.value(1, tokens=1))
    await run.running()
    gone = asyncio.create_task(batcher.values([2, 3]))
    kept = asyncio.create_task(batcher.value(4, tokens=1))
    await _queued(batcher, 3)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.queue_depth == 1, "a cancelled request's items leave the queue at once"
    hold.set()
    assert await first == 2
    assert await kept == 8
    assert [p for b in run.batches for p in b] == [1, 4]
    await batcher.close()


async def test_one_bad_item_fails_alone() -> None:
    """An unexpected error is narrowed down by running the batch again in halves."""
    run = Recorder(fail_on=13)
    batcher = _batcher(run, max_batch_size=4, max_queue_delay_ms=20)
    results = await asyncio.gather(
        *(batcher.value(i, tokens=1) for i in (13, 14, 15, 16)), return_exceptions=True
    )
    assert isinstance(results[0], RuntimeError)
    assert results[1:] == [28, 30, 32]
    assert sorted(run.batches[0]) == [13, 14, 15, 16]
    assert await batcher.value(5, tokens=1) == 10  # still serving
    await batcher.close()


async def test_a_domain_error_fails_the_whole_batch_at_once() -> None:
    """A backend that is down fails every item of the batch: running it again in halves would not help."""
    run = Recorder(fail_on=13, error=ModelNotReady("backend down"))
    batcher = _batcher(run, max_batch_size=4, max_queue_delay_ms=20)
    results = await asyncio.gather(*(batcher.value(i, tokens=1) for i in (13, 14)), return_exceptions=True)
    assert all(isinstance(r, ModelNotReady) for r in results)
    assert len(run.batches) == 1
    await batcher.close()


async def test_when_an_item_fails_its_request_withdraws_the_rest() -> None:
    hold = asyncio.Event()
    run = Recorder(fail_on=13, hold=hold)
    batcher = _batcher(run, max_batch_size=1, max_queue_delay_ms=0)
    request = asyncio.create_task(batcher.values([13, 14, 15]))
    await run.running()
    hold.set()
    with pytest.raises(RuntimeError):
        await request
    assert batcher.queue_depth == 0
    assert run.batches == [[13]], "the failed request's other items ran for nothing"
    await batcher.close()


async def test_full_queue_is_refused_at_once() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=1, max_queue_size=2, max_queue_delay_ms=0)
    running = asyncio.create_task(batcher.value(0, tokens=1))
    await run.running()
    queued = [asyncio.create_task(batcher.value(i, tokens=1)) for i in (1, 2)]
    await _queued(batcher, 2)
    with pytest.raises(Overloaded, match="max_queue_size 2"):
        await batcher.value(3, tokens=1)
    hold.set()
    assert await asyncio.gather(running, *queued) == [0, 2, 4]
    await batcher.close()


async def test_a_request_enters_the_queue_whole_or_not_at_all() -> None:
    """Two requests that each fit but not together: the first is queued whole in one step, the second
    is refused whole, and none of its items runs."""
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=8, max_queue_size=4, max_queue_delay_ms=0)
    busy = asyncio.create_task(batcher.value(0, tokens=1))
    await run.running()
    first = asyncio.create_task(batcher.values([1, 2, 3]))
    second = asyncio.create_task(batcher.values([4, 5, 6]))
    await _queued(batcher, 3)
    assert batcher.queue_depth == 3
    hold.set()
    results = await asyncio.gather(busy, first, second, return_exceptions=True)
    assert results[0] == 0
    assert results[1] == [2, 4, 6]
    assert isinstance(results[2], Overloaded)
    assert sorted(p for b in run.batches for p in b) == [0, 1, 2, 3]
    await batcher.close()


async def test_a_request_larger_than_the_queue_is_admitted_in_parts() -> None:
    """10 items on a queue of 4: admitted 2 at a time (part_size), other requests run between parts."""
    run = Recorder()
    settings = {"max_batch_size": 2, "max_queue_size": 4, "max_queue_delay_ms": 0}
    batcher = _batcher(run, **settings)
    assert batcher.settings.part_size == 2
    big = asyncio.create_task(batcher.values(list(range(10))))
    await run.running()
    small = await batcher.values([100])
    assert small == [200]
    assert await big == [i * 2 for i in range(10)]
    order = [p for b in run.batches for p in b]
    assert sorted(order) == [*range(10), 100]
    assert order.index(100) < order.index(9), "the small request waited for the whole large one"
    assert max(len(b) for b in run.batches) <= 2
    await batcher.close()


async def test_reserved_room_is_held_for_a_request_being_tokenized() -> None:
    """Room reserved before tokenizing counts as taken: a second request is refused before any work."""
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_size=4)
    with batcher.reserve(3) as held:
        with pytest.raises(Overloaded, match="max_queue_size 4"):
            batcher.reserve(2)
        timed = await batcher.submit_all([(1, 1), (2, 1), (3, 1)], reservation=held)
    assert [t.value for t in timed] == [2, 4, 6]
    with batcher.reserve(4):
        pass  # released on exit
    assert [t.value for t in await batcher.submit_all([(i, 1) for i in range(4)])] == [0, 2, 4, 6]
    await batcher.close()


async def test_a_passed_deadline_is_refused_before_queueing() -> None:
    run = Recorder()
    batcher = _batcher(run)
    with pytest.raises(DeadlineExceeded, match="before the request was queued"):
        await batcher.submit(1, tokens=1, deadline=time.monotonic() - 1)
    assert run.batches == []
    await batcher.close()


async def test_close_drains_the_queue() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=2, max_queue_delay_ms=1000)
    tasks = [asyncio.create_task(batcher.value(i, tokens=1)) for i in range(3)]
    await _queued(batcher, 1)
    await batcher.close()
    assert [await t for t in tasks] == [0, 2, 4]
    with pytest.raises(ModelNotReady, match="shutting down"):
        await batcher.value(1, tokens=1)


async def test_a_lone_item_on_an_idle_batcher_does_not_wait_for_company() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_ms=600_000)
    assert await asyncio.wait_for(batcher.value(3, tokens=1), 60) == 6
    assert run.batches == [[3]]
    await batcher.close()


async def test_items_that_arrive_while_a_batch_runs_wait_for_company() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=3, max_queue_delay_ms=600_000)
    first = asyncio.ensure_future(batcher.value(1, tokens=1))
    await run.running()
    second = asyncio.ensure_future(batcher.value(2, tokens=1))
    await _queued(batcher, 1)
    hold.set()
    assert await first == 2
    for _ in range(100):
        await asyncio.sleep(0)
    assert not second.done(), "an item that arrived with company in flight should wait for more"
    third = [asyncio.ensure_future(batcher.value(i, tokens=1)) for i in (3, 4)]
    assert await asyncio.gather(second, *third) == [4, 6, 8]
    assert run.batches == [[1], [2, 3, 4]]
    await batcher.close()


async def test_padding_ratio_keeps_far_lengths_apart() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_ms=50, max_padding_ratio=1.5)
    results = await asyncio.gather(
        batcher.value(1, tokens=10), batcher.value(2, tokens=12), batcher.value(3, tokens=100)
    )
    assert results == [2, 4, 6]
    # together: 3 x 100 padded tokens for 122 real ones; apart: 2 x 12 for 22, and 100 for 100
    assert sorted(sorted(b) for b in run.batches) == [[1, 2], [3]]
    await batcher.close()


async def test_a_request_over_several_batches_counts_each_batch_once() -> None:
    """Timing.inference_ms of a request: the runs of the batches its items took part in, each once."""
    from gateway.tasks.base import Timing

    run = Recorder()
    stats: list[BatchStats] = []
    batcher = DynamicBatcher("test", run, BatcherSettings(max_batch_size=2), stats.append)
    batcher.start()
    timed = await batcher.submit_all([(i, 10) for i in range(5)])
    assert [t.value for t in timed] == [0, 2, 4, 6, 8]
    assert [len(b) for b in run.batches] == [2, 2, 1]
    assert len({t.batch for t in timed}) == 3
    runs = [s.run_seconds for s in stats]
    assert Timing.of(timed).inference_ms == pytest.approx(1000 * sum(runs))
    await batcher.close()
