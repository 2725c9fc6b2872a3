"""API keys: key file format, constant-time checks of the bearer header, reloads that keep the old keys on a
bad file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.auth import ApiKeys
from gateway.errors import InvalidInput


def test_no_key_lets_every_request_through() -> None:
    keys = ApiKeys()
    assert not keys.enabled
    assert keys.allows(None)


def test_the_bearer_header_must_carry_a_key(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text("# comment\n  alpha  \n\nbeta\n", encoding="utf-8")
    keys = ApiKeys("from-env", file)
    assert len(keys) == 3
    for good in ("Bearer from-env", "Bearer alpha", "Bearer beta", b"Bearer beta"):
        assert keys.allows(good), good
    for bad in (
        None,
        "",
        "alpha",
        "Bearer",
        "Bearer ",
        "Bearer alph",
        "Bearer alphaa",
        "Basic alpha",
        "bearer alpha",
    ):
        assert not keys.allows(bad), bad


def test_reload_reads_the_file_again_and_keeps_old_keys_on_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "keys"
    file.write_text("old\n", encoding="utf-8")
    keys = ApiKeys(None, file)
    file.write_text("new\n", encoding="utf-8")
    keys.reload()
    assert keys.allows("Bearer new")
    assert not keys.allows("Bearer old")
    caplog.set_level(logging.ERROR)
    file.write_text("# nothing\n", encoding="utf-8")
    keys.reload()
    file.unlink()
    keys.reload()
    assert keys.allows("Bearer new"), "a bad reload must not lock everyone out"
    assert len([r for r in caplog.records if "not reloaded" in r.getMessage()]) == 2
    assert "new" not in caplog.text


def test_a_key_file_without_keys_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text("\n# only comments\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="holds no key"):
        ApiKeys(None, file)
    with pytest.raises(InvalidInput, match="cannot read it"):
        ApiKeys(None, tmp_path / "missing")
