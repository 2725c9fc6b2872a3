"""The ONNX Runtime backend: the IO-binding path GPUs take gives what a plain run gives (checked here on a
CPU session, the only kind CI has)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.manifest import Manifest, Task

Exported = Callable[[Task], tuple[Path, Manifest]]


@pytest.mark.parametrize("task", ["translation", "embedding"])
async def test_io_binding_runs_as_a_plain_run(exported: Exported, task: Task) -> None:
    out, manifest = exported(task)
    part = "encoder" if task == "translation" else "model"
    backend = OnnxRuntimeBackend(
        out / manifest.variants["fp32"].parts[part].file, OrtSettings(), ThreadPoolExecutor(1)
    )
    assert not backend.io_binding  # a CPU session runs plainly
    rng = np.random.default_rng(0)
    inputs = {
        "input_ids": rng.integers(5, 100, size=(3, 7)).astype(np.int64),
        "attention_mask": np.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], dtype=np.int64),
        "unused": np.zeros(1),  # inputs the part does not take are left out, on both paths
    }
    plain = await backend.run(inputs)
    backend.io_binding = True
    bound = await backend.run(inputs)
    some = await backend.run(inputs, [backend.outputs[-1].name])
    assert set(plain) == set(bound) == {spec.name for spec in backend.outputs}
    for name, value in plain.items():
        np.testing.assert_array_equal(bound[name], value)
    assert list(some) == [backend.outputs[-1].name]
    await backend.close()
