"""What every task shares: request limits, and admission by in-flight count and by deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.batcher import BatcherSettings
from gateway.errors import InvalidInput, Overloaded, shown
from gateway.manifest import Manifest, Task
from gateway.tasks.base import BatchedTask, TextLimits, Throughput


def _task(limits: TextLimits) -> BatchedTask[Any, Any]:
    model = SimpleNamespace(name="m")
    return BatchedTask(model, BatcherSettings(), None, limits)  # type: ignore[arg-type]


def _enter(task: BatchedTask[Any, Any], rows: int, deadline: float | None) -> None:
    with task.admitted(rows, deadline):
        pass


def test_limits_name_the_text_and_the_limit() -> None:
    limits = TextLimits(max_texts=3, max_chars=10, max_request_chars=15)
    with pytest.raises(InvalidInput, match="at least one text"):
        limits.check([])
    with pytest.raises(InvalidInput, match="4 texts exceed the limit of 3"):
        limits.check(["a"] * 4)
    with pytest.raises(InvalidInput, match=r"texts\[1\]: 11 characters exceed the limit of 10"):
        limits.check(["a", "b" * 11])
    limits.check(["", " \n\t"])  # empty texts are texts: each task answers them
    with pytest.raises(InvalidInput, match="16 characters in all exceed the limit of 15"):
        limits.check(["a" * 8, "b" * 8])


def test_the_in_flight_limit_refuses_at_once() -> None:
    task = _task(TextLimits(max_in_flight=2))
    with (
        task.admitted(1, None),
        task.admitted(1, None),
        pytest.raises(Overloaded, match=r"serving 2 requests \(max_in_flight 2\)"),
    ):
        _enter(task, 1, None)
    with task.admitted(1, None):
        assert task.in_flight == 1
    assert task.in_flight == task.rows_in_flight == 0


def test_a_deadline_the_work_in_flight_cannot_meet_is_refused() -> None:
    task = _task(TextLimits())
    # 100 rows finished in 1 s of busy time: 100 rows a second
    task.throughput._finished.extend([(0.0, 50), (1.0, 50)])
    task.throughput._busy = 1.0
    assert task.throughput.per_second() == pytest.approx(100, rel=0.05)
    with task.admitted(300, None):  # 3 s of work in flight
        with pytest.raises(Overloaded, match="cannot answer within the deadline"):
            _enter(task, 10, time.monotonic() + 1)
        with task.admitted(10, time.monotonic() + 10):  # enough time
            pass
        with task.admitted(10, None):  # no deadline: nothing to miss
            pass


def test_throughput_counts_busy_time_only() -> None:
    meter = Throughput()
    assert meter.per_second() is None  # nothing known yet: nobody is refused on a guess
    meter.begin()
    meter.end(rows=20, finished=True)
    before = meter.per_second()
    assert before is not None
    time.sleep(0.05)  # idle: must not lower the rate
    assert meter.per_second() == pytest.approx(before)
    meter.begin()
    meter.end(rows=20, finished=False)  # failed: busy time without rows
    assert meter._active == 0


def test_shown_cuts_long_values() -> None:
    assert shown("eng_Latn") == "'eng_Latn'"
    long = shown("x" * 20000)
    assert len(long) < 130
    assert long.endswith("…, 20000 characters")


@pytest.mark.parametrize("task", ["embedding", "token-classification", "fill-mask"])
async def test_an_encoder_runs_its_session_before_it_takes_work(
    exported: Callable[[Task], tuple[Path, Manifest]], task: Task
) -> None:
    from gateway.backends.onnxruntime import OrtSettings
    from gateway.batcher import BatchStats
    from gateway.runtime import load_model
    from gateway.tasks.embedding import EmbeddingModel
    from gateway.tasks.fill_mask import FillMaskModel
    from gateway.tasks.token_classification import TokenClassificationModel

    loaded = load_model("m", exported(task)[0], OrtSettings(), variant="fp32")
    runs: list[int] = []
    backend = loaded.backend
    original = backend.run_sync

    def counted(inputs: dict[str, Any], outputs: Any = None) -> Any:
        runs.append(len(inputs["input_ids"]))
        return original(inputs, outputs)

    backend.run_sync = counted  # type: ignore[method-assign]
    batches: list[BatchStats] = []
    kind = {"embedding": EmbeddingModel, "fill-mask": FillMaskModel}.get(task, TokenClassificationModel)
    model: BatchedTask[Any, Any] = kind(loaded, BatcherSettings(), batches.append)
    assert not runs
    await model.start()
    try:
        assert runs == [1, 8], "one text and a batch, before the first request"
        assert model.batcher._task is not None, "it takes work after the warm-up"
        assert not batches, "warm-up is no batch of the batcher"
    finally:
        await model.close()
