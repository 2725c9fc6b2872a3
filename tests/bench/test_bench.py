"""`pgw bench`: its inputs and load generator, and the whole `--quick` suite against the demo models."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from bench.load import closed_loop, open_loop
from bench.suite import MODELS
from bench.texts import LANGUAGES, TextMaker
from gateway.cli import app
from gateway.manifest import Manifest, Task

Exported = Callable[[Task], tuple[Path, Manifest]]


def test_texts_have_the_exact_token_count(exported: Exported) -> None:
    directory, manifest = exported("translation")
    maker = TextMaker(directory / manifest.tokenizer_file)
    texts = maker.texts(8, 30)
    assert len({t.lang for t in texts}) == min(8, len(LANGUAGES))  # languages in turn
    assert len({t.text for t in texts}) == 8
    for text in texts:
        assert text.tokens == 30
        assert len(maker.tokenizer.encode(text.text, add_special_tokens=False).ids) == 30


async def test_closed_loop_keeps_n_requests_in_flight_and_counts_errors() -> None:
    in_flight = 0
    peak = 0

    async def call(index: int) -> tuple[int, int]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if index % 5 == 4:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        return 2, 20

    result = await closed_loop(call, concurrency=3, requests=30)
    summary = result.summary()
    assert peak == 3
    assert summary["requests"] == 30
    assert summary["ok"] == 24
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": 6}
    assert summary["texts_per_s"] == pytest.approx(48 / result.seconds)
    assert summary["p50_ms"] >= 10


async def test_open_loop_offers_the_asked_rate() -> None:
    async def call(index: int) -> tuple[int, int]:
        return 1, 1

    result = await open_loop(call, rate=200, seconds=1.0, seed=1)
    assert 140 <= len(result.samples) <= 260  # Poisson: 200 +- 4 standard deviations


def test_quick_bench_runs_every_part(exported: Exported, demo_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    (work / "exports").mkdir()
    for name, (source, task) in MODELS.items():
        (work / "exports" / name).symlink_to(exported(task)[0])
        if not (work / "checkpoints" / source).exists():
            (work / "checkpoints" / source).symlink_to(demo_dir / source)
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["bench", "--quick", "--work", str(work), "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    for name in MODELS:
        for variant in ("fp32", "int8"):
            runs = [r for r in results["runs"] if r["model"] == name and r["variant"] == variant]
            assert {(r["mode"], r["level"]) for r in runs if r["scenario"] == "mixed"} >= {
                ("closed", 1),
                ("closed", 4),
            }
            assert all(r["ok"] > 0 and not r["errors"] for r in runs), runs
            assert all(r["server_inference_ms"] > 0 for r in runs)
        engines = {s["engine"] for s in results["shapes"] if s["model"] == name}
        assert {"pytorch-fp32", "pytorch-int8", "onnxruntime-fp32", "onnxruntime-int8"} <= engines
        assert (out / f"{name}-latency-throughput.png").read_bytes()[:4] == b"\x89PNG"
    translation = {s["engine"] for s in results["shapes"] if s["task"] == "translation"}
    assert {"ctranslate2-int8", "ctranslate2-fp32"} <= translation
    compared = {(c["model"], c["scenario"], c["variant"]) for c in results["comparisons"]}
    assert ("distilbert-demo", "32x128", "int8") in compared
    assert ("nllb-demo", "8x32->32", "int8") in compared
    assert all(c["speedup_vs_pytorch_fp32"] > 0 for c in results["comparisons"])
    agreement = {
        a["engine"]: a["token_agreement"] for a in results["agreement"] if a["scenario"] == "8x32->32"
    }
    assert agreement["pytorch-fp32"] == 1.0
    assert 0 <= agreement["gateway-int8"] <= 1
    report = (out / "report.md").read_text()
    assert "## Gateway against the baselines" in report
    assert "ctranslate2-int8" in report


def test_quick_bench_on_triton(exported: Exported, tmp_path: Path) -> None:
    """The Triton rows: the same runs with the model on a local tritonserver."""
    from gateway.triton.server import TritonServerError, locate

    try:
        locate()
    except TritonServerError:
        if os.environ.get("PGW_REQUIRE_TRITON"):
            raise
        pytest.skip("no tritonserver: pip install --no-deps nvidia-pytriton")
    work = tmp_path / "work"
    (work / "exports").mkdir(parents=True)
    (work / "exports" / "distilbert-demo").symlink_to(exported("embedding")[0])
    out = tmp_path / "results"
    args = ["bench", "--quick", "--work", str(work), "--out", str(out), "--model", "distilbert-demo"]
    result = CliRunner().invoke(app, [*args, "--variants", "int8", "--triton", "--no-baselines"])
    assert result.exit_code == 0, result.output
    runs = json.loads((out / "results.json").read_text())["runs"]
    on_triton = [r for r in runs if r["backend"] == "triton"]
    assert {r["scenario"] for r in on_triton} == {"1x32", "32x128", "mixed"}
    assert all(r["ok"] > 0 and not r["errors"] for r in on_triton), on_triton
    assert "| triton |" in (out / "report.md").read_text()
