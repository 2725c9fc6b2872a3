"""Settings: YAML file < PGW_ environment < flags, validated and frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import ServerConfig
from gateway.errors import InvalidInput


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "gateway.yaml"
    file.write_text(
        "port: 6000\nmetrics_port: 7000\nbatching: {max_batch_size: 8}\nmodels: [{name: a, path: /x}]\n"
    )
    monkeypatch.setenv("PGW_METRICS_PORT", "7100")
    config = ServerConfig.load(file, port=None, device="cuda")
    assert config.port == 6000  # file (the flag was not given)
    assert config.metrics_port == 7100  # environment over file
    assert config.device == "cuda"  # flag
    assert config.batching.max_batch_size == 8
    assert config.models[0].name == "a"
    assert ServerConfig.load(file, port=6500).port == 6500
    with pytest.raises(ValidationError):
        config.port = 1  # type: ignore[misc]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        ServerConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batching: {max_batch_size: 0}\n")
    with pytest.raises(InvalidInput, match=r"batching.max_batch_size: Input should be greater"):
        ServerConfig.load(bad)
    bad.write_text("batching: {kv_cache: gpu}\n")
    with pytest.raises(
        InvalidInput, match=r"batching.kv_cache: Input should be 'auto', 'numpy' or 'ortvalue'"
    ):
        ServerConfig.load(bad)
    bad.write_text("tls: {cert: /nonexistent.pem, key: /nonexistent.key}\n")
    with pytest.raises(InvalidInput, match=r"tls.cert: .*/nonexistent.pem is not a file"):
        ServerConfig.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(InvalidInput, match="mapping"):
        ServerConfig.load(bad)
    bad.write_text("port: [\n")
    with pytest.raises(InvalidInput, match="mapping of settings: while parsing"):
        ServerConfig.load(bad)


def test_each_load_reads_its_own_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is no class-level state: loads of different files do not see each other's settings."""
    monkeypatch.delenv("PGW_PORT", raising=False)
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("port: 1111\nbatching: {max_batch_size: 3}\n")
    second.write_text("port: 2222\n")
    a, b, plain = ServerConfig.load(first), ServerConfig.load(second), ServerConfig.load()
    assert (a.port, a.batching.max_batch_size) == (1111, 3)
    assert (b.port, b.batching.max_batch_size) == (2222, ServerConfig.load().batching.max_batch_size)
    assert plain.port == 50051
    assert isinstance(a, ServerConfig)
    assert a.model_copy(update={"port": 0}).port == 0


def test_the_cache_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ServerConfig.load().demo_dir == tmp_path / "xdg" / "polyglot-gateway" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ServerConfig.load().demo_dir == tmp_path / "home" / ".cache" / "polyglot-gateway" / "demo"


def test_the_padding_limit_defaults_by_where_the_model_runs() -> None:
    from gateway.config import CPU_PADDING_RATIO, BatchingConfig

    assert BatchingConfig().settings().max_padding_ratio == CPU_PADDING_RATIO == 1.2
    assert BatchingConfig().settings(device="cuda").max_padding_ratio == 1.5
    assert BatchingConfig().settings(remote=True).max_padding_ratio == 1.5  # Triton
    assert BatchingConfig(max_padding_ratio=0).settings().max_padding_ratio == 0  # asked for: kept
    assert BatchingConfig(max_padding_ratio=2).settings(device="cuda").max_padding_ratio == 2
