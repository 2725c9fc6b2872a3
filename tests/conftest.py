"""Session fixtures: the tiny demo checkpoints and their exports, built once per test run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.manifest import Manifest, Task

EXPORT_VARIANTS = ("fp32", "int8", "fp16")
# The suite's servers (in-process and `pgw serve` processes) serve no HTTP unless a test gives them a port:
# many run at once, and HTTP's default port is one.
os.environ["PGW_HTTP_PORT"] = "0"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gateway.export.demo import build_demo_models

    root = tmp_path_factory.mktemp("demo")
    build_demo_models(root, size="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def exported(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Task], tuple[Path, Manifest]]:
    """task -> (export directory, manifest), each exported once with fp32, int8 and fp16."""
    from gateway.export.demo import demo_for
    from gateway.export.exporter import ExportOptions, export_model

    cache: dict[str, tuple[Path, Manifest]] = {}

    def get(task: Task) -> tuple[Path, Manifest]:
        if task not in cache:
            out = tmp_path_factory.mktemp("export") / task
            manifest = export_model(
                demo_dir / demo_for(task).checkpoint, out, ExportOptions(task=task, variants=EXPORT_VARIANTS)
            )
            cache[task] = (out, manifest)
        return cache[task]

    return get


@pytest.fixture(scope="session")
def varied_nllb(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo NLLB architecture with larger random weights: greedy and beam outputs then depend on the
    input (the demo model repeats one token whatever it reads), so a comparison with generate() can fail."""
    import torch
    from transformers import AutoTokenizer, M2M100Config, M2M100ForConditionalGeneration

    from gateway.export.exporter import ExportOptions, export_model

    checkpoint = tmp_path_factory.mktemp("varied") / "nllb"
    config = M2M100Config.from_pretrained(demo_dir / "nllb-demo")
    config.update({"init_std": 1.0, "scale_embedding": False})
    torch.manual_seed(1)
    M2M100ForConditionalGeneration(config).eval().save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(demo_dir / "nllb-demo").save_pretrained(checkpoint)
    out = checkpoint.parent / "onnx"
    export_model(checkpoint, out, ExportOptions(task="translation", variants=("fp32",), enforce_bounds=False))
    return checkpoint, out
