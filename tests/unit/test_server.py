"""Wiring the configured models into a registry (`gateway.server.build_registry`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import BatchingConfig, ModelConfig, ServerConfig
from gateway.manifest import Manifest, Task
from gateway.metrics import Metrics
from gateway.server import build_registry

SPINNING = "session.intra_op.allow_spinning"


def _spins(part: Any) -> bool:
    """Whether ONNX Runtime's threads of this session spin between runs."""
    entry = part.session.get_session_options().get_session_config_entry(SPINNING)
    assert entry in ("0", "1"), "the backend sets it either way"
    return bool(entry == "1")


@pytest.mark.parametrize(
    ("models", "spinning"),
    [
        pytest.param(["embedding"], {"a": True}, id="alone: it spins"),
        pytest.param(["embedding", "fill-mask"], {"a": False, "b": False}, id="two share the cores"),
        pytest.param(["embedding", "fill-mask", {"spinning": True}], {"a": False, "b": True}, id="asked for"),
        pytest.param(["embedding", {"spinning": False}], {"a": False}, id="turned off"),
    ],
)
def test_an_encoder_spins_only_when_it_has_the_cores_to_itself(
    exported: Callable[[Task], tuple[Path, Manifest]], models: list[Any], spinning: dict[str, bool]
) -> None:
    configs: list[ModelConfig] = []
    for entry in models:
        if isinstance(entry, dict):  # settings of the model before it
            configs[-1] = configs[-1].model_copy(update=entry)
        else:
            configs.append(ModelConfig(name="ab"[len(configs)], path=exported(entry)[0], variant="fp32"))
    registry = build_registry(ServerConfig(models=tuple(configs)), Metrics())
    got = {served.name: _spins(served.model.model.backend) for served in registry.all()}
    assert got == spinning


def test_translation_spins_its_decoder_step_only(varied_nllb: tuple[Path, Path]) -> None:
    config = ServerConfig(models=(ModelConfig(name="t", path=varied_nllb[1], variant="fp32", spinning=True),))
    (served,) = build_registry(config, Metrics()).all()
    parts = served.model.model.parts
    assert {name: _spins(part) for name, part in parts.items()} == {
        name: name == "decoder_step" for name in parts
    }


@pytest.mark.parametrize(
    ("kv_cache", "kind"), [(None, "Batch"), ("numpy", "Batch"), ("ortvalue", "ResidentBatch")]
)
def test_the_translation_cache_follows_the_config(
    varied_nllb: tuple[Path, Path], kv_cache: str | None, kind: str
) -> None:
    """`batching.kv_cache` reaches the engine; auto (the default) keeps a CPU model's cache in numpy."""
    batching = BatchingConfig() if kv_cache is None else BatchingConfig(kv_cache=kv_cache)  # type: ignore[arg-type]
    config = ServerConfig(
        models=(ModelConfig(name="t", path=varied_nllb[1], variant="fp32", batching=batching),)
    )
    (served,) = build_registry(config, Metrics()).all()
    assert type(served.model.engine.batch).__name__ == kind
