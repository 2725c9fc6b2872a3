"""The batch's cache against each row decoded alone: rows joining and leaving at different steps, beams
reordering, slots moved and resized (from two slots, so that every step of it happens)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.decoding.batch import Batch, StepParts
from gateway.manifest import Manifest, Task

Exported = Callable[[Task], tuple[Path, Manifest]]


@pytest.fixture(scope="module")
def parts(exported: Exported) -> tuple[StepParts, int]:
    out, manifest = exported("translation")
    executor = ThreadPoolExecutor(1)
    backends = {
        n: OnnxRuntimeBackend(out / p.file, OrtSettings(), executor)
        for n, p in manifest.variants["fp32"].parts.items()
    }
    return StepParts.of(backends), manifest.special_tokens.pad_id


def _alone(parts: StepParts, pad: int, source: list[int], tokens: list[int]) -> list[np.ndarray]:
    batch = Batch(parts, pad)
    batch.join(*batch.encode([source]), [1])
    return [batch.step(np.array([t]), np.array([p])).copy()[0] for p, t in enumerate(tokens)]


def test_rows_that_join_leave_and_reorder_read_what_they_read_alone(
    parts: tuple[StepParts, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    step_parts, pad = parts
    monkeypatch.setattr(Batch, "INITIAL_SLOTS", 2)
    rng = np.random.default_rng(0)
    texts = 6
    sources = [rng.integers(5, 300, size=int(rng.integers(3, 12))).tolist() for _ in range(texts)]
    lengths = [30, 12, 40, 7, 25, 33]
    joins = [0, 0, 3, 9, 10, 21]
    sequences = [rng.integers(5, 300, size=n).tolist() for n in lengths]
    expected = [_alone(step_parts, pad, s, q) for s, q in zip(sources, sequences, strict=True)]

    batch = Batch(step_parts, pad)
    where: dict[int, list[int]] = {}  # text -> its rows (texts 2 and 4 as two copies, like beams)
    fed = [0] * texts
    span = capacity = 0  # the most slots in use at once, and the largest slot capacity
    for step in range(80):
        joining = [t for t in range(texts) if joins[t] == step]
        if joining:
            copies = [2 if t in (2, 4) else 1 for t in joining]
            for t, rows in zip(
                joining, batch.join(*batch.encode([sources[t] for t in joining]), copies), strict=True
            ):
                where[t] = rows
        if not where:
            break
        tokens = np.zeros(batch.rows, dtype=np.int64)
        positions = np.zeros(batch.rows, dtype=np.int64)
        for t, rows in where.items():
            tokens[rows], positions[rows] = sequences[t][fed[t]], fed[t]
        logprobs = batch.step(tokens, positions)
        span = max(span, *(fed[t] + 1 for t in where))  # the oldest row's slots
        capacity = max(capacity, batch.slot_capacity)
        for t, rows in where.items():
            for row in rows:
                np.testing.assert_allclose(
                    logprobs[row], expected[t][fed[t]], atol=1e-4, err_msg=f"{step}/{t}"
                )
            fed[t] += 1
        for t in (2, 4):  # swap the copies: both hold the same state, so reading must not change
            if t in where:
                batch.reorder(where[t], [1, 0])
        done = [t for t in where if fed[t] == lengths[t]]
        leaving = [row for t in done for row in where.pop(t)]
        moved = batch.remove(leaving)
        where = {t: [moved.get(r, r) for r in rows] for t, rows in where.items()}
    assert fed == lengths
    assert batch.rows == 0
    assert capacity <= span + span // 2, f"{capacity} slots for at most {span} in use"  # not doubled
