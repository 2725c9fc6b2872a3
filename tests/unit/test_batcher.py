"""DynamicBatcher: batching, budgets, length sorting, deadlines, cancellation, failures, overload."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.batcher import BatcherSettings, BatchStats, DynamicBatcher
from gateway.errors import DeadlineExceeded, Overloaded


class Recorder:
    """A fake runtime: records each batch, doubles each payload, optionally fails or blocks."""

    def __init__(self, fail_on: int | None = None, hold: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.hold = hold

    async def __call__(self, payloads: list[int]) -> list[int]:
        if self.hold is not None:
            await self.hold.wait()
        self.batches.append(payloads)
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("runtime failure")
        return [p * 2 for p in payloads]


class Batcher(DynamicBatcher[int, int]):
    """Returns plain values, and keeps the observed batch stats."""

    def __init__(self, run: Recorder, settings: BatcherSettings) -> None:
        self.stats: list[BatchStats] = []
        super().__init__("test", run, settings, self.stats.append)

    async def submit(self, payload: int, tokens: int, deadline: float | None = None) -> int:  # type: ignore[override]
        timed = await super().submit(payload, tokens, deadline)
        assert timed.queue_seconds >= 0
        assert timed.run_seconds >= 0
        return timed.value


def _batcher(run: Recorder, **settings: float) -> Batcher:
    batcher = Batcher(run, BatcherSettings(**settings))  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_concurrent_items_share_a_batch_and_get_their_own_results() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_ms=50)
    results = await asyncio.gather(*(batcher.submit(i, tokens=10) for i in range(8)))
    assert results == [i * 2 for i in range(8)]
    assert [len(b) for b in run.batches] == [8]
    await batcher.close()


async def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=4, max_queue_delay_ms=10_000)
    started = time.monotonic()
    await asyncio.gather(*(batcher.submit(i, tokens=1) for i in range(4)))
    assert time.monotonic() - started < 5
    await batcher.close()


async def test_token_budget_counts_padding() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=64, max_batch_tokens=100, max_queue_delay_ms=20)
    # 10 items of 30 tokens: at most 3 per batch (3 x 30 = 90 <= 100 < 4 x 30).
    await asyncio.gather(*(batcher.submit(i, tokens=30) for i in range(10)))
    assert max(len(b) for b in run.batches) == 3
    assert sorted(p for b in run.batches for p in b) == list(range(10))
    assert all(s.padded_tokens <= 100 for s in batcher.stats)
    await batcher.close()


async def test_batches_group_similar_lengths() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=2, max_queue_delay_ms=1)
    lengths = {0: 5, 1: 500, 2: 6, 3: 490}
    tasks = [asyncio.create_task(batcher.submit(i, tokens=n)) for i, n in lengths.items()]
    await asyncio.sleep(0.05)
    hold.set()
    await asyncio.gather(*tasks)
    assert sorted(sorted(b) for b in run.batches) == [[0, 2], [1, 3]]
    await batcher.close()


async def test_expired_items_never_reach_the_model() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=1, max_queue_delay_ms=0)
    first = asyncio.create_task(batcher.submit(1, tokens=1))
    await asyncio.sleep(0.01)  # the first batch is now running (held)
    expired = asyncio.create_task(batcher.submit(2, tokens=1, deadline=time.monotonic() + 0.01))
    await asyncio.sleep(0.05)
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
    first = asyncio.create_task(batcher.submit(1, tokens=1))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(batcher.submit(2, tokens=1))
    kept = asyncio.create_task(batcher.submit(3, tokens=1))
    await asyncio.sleep(0.01)
    gone.cancel()
    hold.set()
    assert await first == 2
    assert await kept == 6
    assert [p for b in run.batches for p in b] == [1, 3]
    await batcher.close()


async def test_a_failing_batch_fails_only_its_own_items() -> None:
    run = Recorder(fail_on=13)
    batcher = _batcher(run, max_batch_size=2, max_queue_delay_ms=20)
    results = await asyncio.gather(
        *(batcher.submit(i, tokens=t) for i, t in ((13, 1), (14, 1), (20, 100), (21, 100))),
        return_exceptions=True,
    )
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], RuntimeError)
    assert results[2:] == [40, 42]
    assert await batcher.submit(5, tokens=1) == 10  # still serving
    await batcher.close()


async def test_full_queue_is_refused_at_once() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=1, max_queue_size=2, max_queue_delay_ms=0)
    running = asyncio.create_task(batcher.submit(0, tokens=1))
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(batcher.submit(i, tokens=1)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="max_queue_size 2"):
        await batcher.submit(3, tokens=1)
    hold.set()
    assert await asyncio.gather(running, *queued) == [0, 2, 4]
    await batcher.close()


async def test_close_drains_the_queue() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=2, max_queue_delay_ms=1000)
    tasks = [asyncio.create_task(batcher.submit(i, tokens=1)) for i in range(3)]
    await asyncio.sleep(0)
    await batcher.close()
    assert [t.result() for t in tasks] == [0, 2, 4]


async def test_a_lone_item_on_an_idle_batcher_does_not_wait_for_company() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_ms=30_000)
    started = time.monotonic()
    assert await batcher.submit(3, tokens=1) == 6
    assert time.monotonic() - started < 10  # far below the 30 s delay
    assert run.batches == [[3]]
    await batcher.close()


async def test_items_that_arrive_while_a_batch_runs_wait_for_company() -> None:
    hold = asyncio.Event()
    run = Recorder(hold=hold)
    batcher = _batcher(run, max_batch_size=3, max_queue_delay_ms=30_000)
    first = asyncio.ensure_future(batcher.submit(1, tokens=1))
    await asyncio.sleep(0.05)  # the first batch runs (held)
    second = asyncio.ensure_future(batcher.submit(2, tokens=1))
    await asyncio.sleep(0.05)
    hold.set()
    assert await first == 2
    await asyncio.sleep(0.1)
    assert not second.done(), "an item that arrived with company in flight should wait for more"
    third = [asyncio.ensure_future(batcher.submit(i, tokens=1)) for i in (3, 4)]
    assert await asyncio.gather(second, *third) == [4, 6, 8]
    assert run.batches == [[1], [2, 3, 4]]
    await batcher.close()


async def test_padding_ratio_keeps_far_lengths_apart() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_ms=50, max_padding_ratio=1.5)
    results = await asyncio.gather(
        batcher.submit(1, tokens=10), batcher.submit(2, tokens=12), batcher.submit(3, tokens=100)
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
