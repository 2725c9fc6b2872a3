"""`pgw bench`: its inputs and load generator, and the whole `--quick` suite against the demo models."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from bench import baselines
from bench.load import closed_loop, open_loop
from bench.profiles import MODELS, PROFILES
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
    work = _work(tmp_path, exported, demo_dir, tuple(MODELS))
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
    assert {c["reference"] for c in results["comparisons"]} == {"pytorch-fp32"}
    assert all(c["speedup_vs_reference"] > 0 for c in results["comparisons"])
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
    from gateway.triton.process import TritonServerError, locate

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


def _work(tmp_path: Path, exported: Exported, demo_dir: Path, names: tuple[str, ...]) -> Path:
    """A bench work layout over the session's exports and demo checkpoints."""
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    (work / "exports").mkdir()
    for name in names:
        source, task = MODELS[name].checkpoint, MODELS[name].task
        (work / "exports" / name).symlink_to(exported(task)[0])
        if not (work / "checkpoints" / source).exists():
            (work / "checkpoints" / source).symlink_to(demo_dir / source)
    return work


def test_the_gpu_profile_runs_end_to_end_on_the_cpu(
    exported: Exported, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--device cuda` with the device swapped for the CPU: its shapes, fp16 variants, batching and
    baselines (PyTorch fp16, generate with a static cache), compared with PyTorch fp16. What only a GPU
    can show, its speed, is measured with the device tool."""
    monkeypatch.setitem(PROFILES, "cuda", dataclasses.replace(PROFILES["cuda"], device="cpu"))
    work = _work(tmp_path, exported, demo_dir, ("distilbert-demo", "nllb-demo"))
    out = tmp_path / "results"
    args = ["bench", "--quick", "--device", "cuda", "--work", str(work), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--model", "distilbert-demo", "--model", "nllb-demo"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["settings"]["device"] == "cuda"
    assert {r["variant"] for r in results["runs"]} == {"fp16", "fp32"}
    assert all(r["ok"] > 0 and not r["errors"] for r in results["runs"])
    shapes = {(s["model"], s["scenario"], s["engine"]) for s in results["shapes"]}
    assert ("distilbert-demo", "256x128", "pytorch-fp16") in shapes
    assert ("distilbert-demo", "256x128", "onnxruntime-fp16") in shapes
    assert ("nllb-demo", "1x48->48", "pytorch-fp16-static") in shapes
    assert not any(engine.startswith(("ctranslate2", "pytorch-int8")) for _, _, engine in shapes)
    saturated = [r for r in results["runs"] if r["scenario"] == "256x128"]
    assert saturated
    assert all(r["server_batch_size"] == 256 for r in saturated)  # one batch per request
    new_tokens = {a["engine"]: a["new_tokens"] for a in results["agreement"] if a["scenario"] == "8x48->48"}
    assert new_tokens["gateway-fp16"] == new_tokens["pytorch-fp16-static"] == [48] * 8
    assert {c["reference"] for c in results["comparisons"]} == {"pytorch-fp16"}
    assert all(c["speedup_vs_reference"] > 0 for c in results["comparisons"])
    assert "x pytorch-fp16" in (out / "report.md").read_text()


def test_pytorch_baselines_agree_across_precisions_and_caches(demo_dir: Path) -> None:
    checkpoint = demo_dir / "nllb-demo"
    batch = [[5, *range(100, 140), 2], [5, *range(300, 320), 2]]
    dynamic = baselines.TorchTranslator(checkpoint).run(batch, 7, 12, 1)
    static = baselines.TorchTranslator(checkpoint, static_cache=True).run(batch, 7, 12, 1)
    assert static == dynamic  # the same greedy tokens, whatever the cache
    assert [len(row) for row in dynamic] == [12, 12]
    encoder = demo_dir / "distilbert-demo"
    texts = [[101, *range(1000, 1030), 102]]
    full = baselines.TorchEncoder(encoder, "embedding", 0).run(texts)
    half = baselines.TorchEncoder(encoder, "embedding", 0, "fp16").run(texts)
    assert float((full * half).sum()) > 0.99  # unit vectors: cosine similarity
    with pytest.raises(ValueError, match="CPU only"):
        baselines.TorchEncoder(encoder, "embedding", 0, "int8", device="cuda")


def test_cuda_without_a_cuda_onnxruntime_is_refused_up_front(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")  # the GPU machine; CI's has not
    result = CliRunner().invoke(app, ["bench", "--device", "cuda", "--work", str(tmp_path), "--quick"])
    assert result.exit_code == 1
    assert "CUDAExecutionProvider" in result.output
