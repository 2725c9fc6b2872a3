"""Export output: files, manifest, accuracy reports, and bound enforcement."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.errors import ExportError, InvalidInput
from gateway.export.accuracy import Bounds
from gateway.export.exporter import ExportOptions, export_model, sat_threshold
from gateway.manifest import Manifest, Task

Exported = Callable[[Task], tuple[Path, Manifest]]
EXPECTED_METRICS: dict[str, set[str]] = {
    "token-classification": {"label_agreement", "max_logit_error"},
    "embedding": {"min_cosine", "mean_cosine"},
    "fill-mask": {"top1_agreement", "max_probability_error"},
    "translation": {"token_agreement", "max_logprob_error"},
}


@pytest.mark.parametrize("task", list(EXPECTED_METRICS))
def test_manifest_describes_every_variant(exported: Exported, task: Task) -> None:
    out, manifest = exported(task)
    assert Manifest.read(out) == manifest
    assert manifest.task == task
    assert manifest.source.random_weights
    assert len(manifest.source.sha256) == 64
    assert (out / "tokenizer.json").is_file()
    assert set(manifest.variants) == {"fp32", "int8", "fp16"}
    for name, variant in manifest.variants.items():
        for part in variant.parts.values():
            assert (out / part.file).is_file()
            assert part.size_bytes > 0
            assert part.inputs
            assert part.outputs
        report = variant.accuracy
        assert report is not None
        assert EXPECTED_METRICS[task] <= set(report.metrics), (name, report.metrics)
        assert report.bounds == {}  # demo checkpoint: figures recorded, no bound applied
    fp32 = manifest.variants["fp32"].accuracy
    assert fp32 is not None
    error = next(v for k, v in fp32.metrics.items() if k.startswith("max_"))
    assert error < 1e-4
    assert manifest.variants["int8"].details["weights"] == "int8 per-channel"
    assert manifest.variants["fp16"].device == "cuda"


def test_translation_manifest_lists_languages(exported: Exported) -> None:
    _out, manifest = exported("translation")
    info = manifest.translation
    assert info is not None
    assert len(info.languages) == 202
    assert info.language_token_ids["eng_Latn"] != info.language_token_ids["fra_Latn"]
    assert set(manifest.variants["fp32"].parts) == {"encoder", "cross_kv", "decoder_step"}
    names = {t.name for t in manifest.variants["fp32"].parts["decoder_step"].inputs}
    assert {"positions", "self_attention_mask", "encoder_attention_mask"} <= names
    assert {f"past.{info.num_layers - 1}.key", f"cross.{info.num_layers - 1}.value"} <= names


def test_token_classification_manifest_knows_sat(exported: Exported) -> None:
    _, manifest = exported("token-classification")
    info = manifest.token_classification
    assert info is not None
    assert info.sat
    assert info.default_threshold == 0.25  # the demo mirrors an `-sm` model
    assert info.labels == ["LABEL_0"]


@pytest.mark.parametrize(
    ("name", "threshold"),
    [
        ("segment-any-text/sat-12l-sm", 0.25),
        ("/models/sat-3l-sm/", 0.25),
        ("sat-1l-sm-ft", 0.25),  # "sm" anywhere in the name, as wtpsplit
        ("segment-any-text/sat-12l", 0.025),
        ("/home/sm/checkpoints/sat-3l", 0.025),  # the name only, not the folders above it
        ("segment-any-text/sat-12l-no-limited-lookahead", 0.01),
    ],
)
def test_sat_thresholds_follow_wtpsplit(name: str, threshold: float) -> None:
    assert sat_threshold(name) == threshold


def test_bounds_are_enforced_with_a_message(demo_dir: Path, tmp_path: Path) -> None:
    options = ExportOptions(
        task="embedding", variants=("fp32",), bounds=Bounds(min_cosine=1.5), enforce_bounds=True
    )
    with pytest.raises(ExportError, match=r"fp32: min_cosine=.* \(bound 1.5\)"):
        export_model(demo_dir / "distilbert-demo", tmp_path / "out", options)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(InvalidInput, match="--variants"):
        ExportOptions(task="embedding", variants=("int4",))  # type: ignore[arg-type]


@pytest.mark.parametrize("task", ["token-classification", "embedding", "fill-mask"])
def test_fp16_encoders_get_fused_attention(exported: Exported, task: Task) -> None:
    """The fusions the GPU speed depends on (attention, embedding LayerNorm) happen on our exported graphs."""
    _, manifest = exported(task)
    details = manifest.variants["fp16"].details
    assert int(details.get("fused_Attention", 0)) > 0, details
    assert int(details.get("fused_SkipLayerNormalization", 0)) > 0, details


def test_variant_details_keep_every_part() -> None:
    """A detail all parts share is kept once; one that differs is kept per part (the last part's value
    used to overwrite the others')."""
    from gateway.export.exporter import _merged

    details = {
        "encoder": {"method": "dynamic", "nodes": 3},
        "decoder_step": {"method": "dynamic", "nodes": 5},
    }
    assert _merged(details) == {"method": "dynamic", "encoder.nodes": 3, "decoder_step.nodes": 5}
    assert _merged({"model": {"method": "dynamic"}}) == {"method": "dynamic"}
