"""The batch's cache against each row decoded alone: rows joining and leaving at different steps, beams
reordering, slots moved and resized (from two slots, so that every step of it happens). Both caches: numpy
(`Batch`) and ONNX Runtime values on the session's device (`ResidentBatch`, here on the CPU)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.backends.onnxruntime import CUDA, OnnxRuntimeBackend, OrtSettings, available_providers
from gateway.decoding.batch import Batch, Cache, StepParts
from gateway.decoding.engine import Engine, EngineSettings, cache_for
from gateway.decoding.resident import ResidentBatch
from gateway.decoding.search import DecodingOptions, GenerationItem
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


@pytest.mark.parametrize("cache", [Batch, ResidentBatch])
def test_rows_that_join_leave_and_reorder_read_what_they_read_alone(
    parts: tuple[StepParts, int], monkeypatch: pytest.MonkeyPatch, cache: Callable[[StepParts, int], Cache]
) -> None:
    step_parts, pad = parts
    monkeypatch.setattr(Batch, "INITIAL_SLOTS", 2)
    monkeypatch.setattr(ResidentBatch, "TRIM_SLOTS", 2)
    rng = np.random.default_rng(0)
    texts = 6
    sources = [rng.integers(5, 300, size=int(rng.integers(3, 12))).tolist() for _ in range(texts)]
    lengths = [30, 12, 40, 7, 25, 33]
    joins = [0, 0, 3, 9, 10, 21]
    sequences = [rng.integers(5, 300, size=n).tolist() for n in lengths]
    expected = [_alone(step_parts, pad, s, q) for s, q in zip(sources, sequences, strict=True)]

    batch = cache(step_parts, pad)
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
        strays = [where[t][1] for t in (2, 4) if t in where and fed[t] == 0]
        tokens[strays] += 1  # a second copy's first token goes astray; the reorder below mends it
        logprobs = batch.step(tokens, positions)
        span = max(span, *(fed[t] + 1 for t in where))  # the oldest row's slots
        capacity = max(capacity, batch.slot_capacity)
        for t, rows in where.items():
            for row in rows:
                if row in strays:
                    continue
                np.testing.assert_allclose(
                    logprobs[row], expected[t][fed[t]], atol=1e-4, err_msg=f"{step}/{t}"
                )
            fed[t] += 1
        for t in (2, 4):
            if t in where:  # first both copies take the first one's state, then they swap
                batch.reorder(where[t], [0, 0] if fed[t] == 1 else [1, 0])
        done = [t for t in where if fed[t] == lengths[t]]
        leaving = [row for t in done for row in where.pop(t)]
        moved = batch.remove(leaving)
        where = {t: [moved.get(r, r) for r in rows] for t, rows in where.items()}
    assert fed == lengths
    assert batch.rows == 0
    assert capacity <= span + span // 2, f"{capacity} slots for at most {span} in use"  # not doubled


SMALL_INPUTS = {  # host arrays the resident cache may bind: token ids, positions, masks, row indices
    "input_ids", "attention_mask", "positions", "self_attention_mask", "encoder_attention_mask",
    "order", "start", "width", "shape", "repeat", "pad_old", "pad_new",
}  # fmt: skip


def _decode_beams(step_parts: StepParts, pad: int, kv_cache: str) -> list[list[int]]:
    """Three texts with beams (reorders), one leaving early (removals), one joining later."""
    engine = Engine("test", step_parts, 2, pad, EngineSettings(kv_cache=kv_cache))  # type: ignore[arg-type]
    options = DecodingOptions(beam_size=3, num_return=2)
    items = [
        GenerationItem([7 + i, 40, 9 * i + 11, 2], (2, 5), limit, options, i)
        for i, limit in enumerate((9, 3))
    ]
    first = engine.submit(items)
    for _ in range(2):
        engine._iteration()
    late = engine.submit([GenerationItem([8, 30, 2], (2, 6), 6, options, 0)])
    engine.run_all()
    return [t for d in first.result().decoded + late.result().decoded for t in d.tokens]


def test_the_resident_cache_stays_on_the_device(
    parts: tuple[StepParts, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key and value goes from graph to graph as an OrtValue where the session runs; the host binds
    only token ids, positions, masks and row indices, and gets back only the log-probabilities."""
    import gateway.backends.onnxruntime as backend
    import gateway.decoding.resident as resident

    step_parts, pad = parts
    seen: list[tuple[str, str, str]] = []  # (kind, name, where)
    real = backend.run_bound

    def spy(session, device, inputs, outputs, host=()):  # type: ignore[no-untyped-def]
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                seen.append(("in", name, value.device_name().lower()))
            else:
                seen.append(("in", name, "host"))
        seen.extend(("out", name, "host") for name in host)
        resident_out, host_out = real(session, device, inputs, outputs, host)
        seen.extend(
            ("out", name, v.device_name().lower()) for name, v in zip(outputs, resident_out, strict=True)
        )
        return resident_out, host_out

    monkeypatch.setattr(backend, "run_bound", spy)
    monkeypatch.setattr(resident, "run_bound", spy)
    got = _decode_beams(step_parts, pad, "ortvalue")
    assert len(got) == 6
    assert any(got)
    assert got == _decode_beams(step_parts, pad, "numpy")
    host = {(kind, name) for kind, name, where in seen if where == "host"}
    assert {name for kind, name in host if kind == "in"} <= SMALL_INPUTS
    assert {name for kind, name in host if kind == "out"} == {"logprobs"}
    kv = [where for _, name, where in seen if name.startswith(("past.", "cross.", "new."))]
    assert kv, "no key or value tensor was bound"
    assert set(kv) == {"cpu"}, "the cache went through numpy"
    assert any(name == "order" for _, name, _ in seen), "no reorder or removal ran on the device"


@pytest.mark.skipif(CUDA not in available_providers(), reason="needs onnxruntime-gpu and a CUDA device")
def test_on_a_gpu_the_resident_cache_decodes_as_the_host_cache(exported: Exported) -> None:
    out, manifest = exported("translation")
    executor = ThreadPoolExecutor(1)
    settings = OrtSettings(device="cuda")
    backends = {
        n: OnnxRuntimeBackend(out / p.file, settings, executor)
        for n, p in manifest.variants["fp32"].parts.items()
    }
    step_parts, pad = StepParts.of(backends), manifest.special_tokens.pad_id
    assert isinstance(cache_for(step_parts, pad), ResidentBatch)  # auto: resident on a GPU
    assert _decode_beams(step_parts, pad, "ortvalue") == _decode_beams(step_parts, pad, "numpy")
