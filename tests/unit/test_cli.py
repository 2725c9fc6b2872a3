"""The `pgw` command line, and the import boundary that keeps torch off the serving path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_demo_then_export_translation(tmp_path: Path) -> None:
    models, out = tmp_path / "m", tmp_path / "o"
    result = runner.invoke(app, ["models", "demo", str(models), "--only", "nllb-demo"])
    assert result.exit_code == 0, result.output
    assert (models / "nllb-demo" / "config.json").is_file()
    result = runner.invoke(
        app,
        [
            "export", str(models / "nllb-demo"), str(out), "--task", "translation", "--variants", "fp32,int8",
            "--triton", str(tmp_path / "repo"), "--triton-name", "nllb",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    for variant in ("fp32", "int8"):
        metrics = manifest["variants"][variant]["accuracy"]["metrics"]
        assert {"token_agreement", "max_logprob_error"} <= set(metrics)
        config = (tmp_path / "repo" / f"nllb-{variant}" / "config.pbtxt").read_text()
        assert f'name: "nllb-{variant}"' in config
        assert 'backend: "python"' in config


def test_export_rejects_an_unknown_task(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "o"), "--task", "summarize"])
    assert result.exit_code == 2
    assert "--task must be one of" in result.output


def test_export_of_a_missing_model_says_where_it_looked(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["export", "no-such-org/no-such-model", str(tmp_path / "o"), "--task", "embedding"]
    )
    assert result.exit_code == 1
    assert "Hugging Face cache" in result.output


def test_serving_modules_import_no_torch() -> None:
    code = (
        "import sys, gateway.cli, gateway.manifest, gateway.languages, gateway.samples, gateway.errors;"
        "from gateway.pb.polyglot.v1 import polyglot_pb2_grpc;"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "99999"], "port: Input should be less than or equal to 65535"),
        (["serve", "--device", "gpu"], "device: Input should be 'cpu' or 'cuda'"),
        (["classify", "x", "--format", "iob", "--server", "127.0.0.1:9"], "format must be one of"),
        (["serve", "--model", "x"], "--model takes NAME=EXPORT_DIR[:VARIANT]"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [result.output.strip()], "more than one line"
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_config_typo_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("batching:\n  max_batch_sise: 3\n")
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "batching.max_batch_sise: Extra inputs are not permitted" in result.output


def test_version() -> None:
    from gateway import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"pgw {__version__}\n"
