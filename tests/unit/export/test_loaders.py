"""Checkpoint loading: SaT's wtpsplit format through transformers' own classes, safetensors only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForTokenClassification

from gateway.errors import InvalidInput
from gateway.export.loaders import (
    LookaheadTokenClassifier,
    load_encoder,
    load_token_classifier,
    open_checkpoint,
    resolve_checkpoint,
)


def _reference_classifier(directory: Path, **overrides: object) -> XLMRobertaForTokenClassification:
    """An XLMRobertaForTokenClassification built by hand from the SaT config and its raw weights."""
    config = json.loads((directory / "config.json").read_text())
    for key in ("model_type", "architectures", "lookahead", "lookahead_split_layers", "mixture_name"):
        config.pop(key, None)
    model = XLMRobertaForTokenClassification(XLMRobertaConfig(**config, **overrides))
    missing, unexpected = model.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
    assert not unexpected
    assert all("position_ids" in key for key in missing)
    return model.eval()


def _batch(directory: Path) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(directory)
    texts = ["The market opens at nine. Then it rains.", "Привет. Как дела?"]
    return dict(tok(texts, padding=True, return_tensors="pt"))


def test_sat_checkpoint_loads_and_matches_xlmr_token_classifier(demo_dir: Path) -> None:
    directory = demo_dir / "sat-demo"
    ours = load_token_classifier(open_checkpoint(directory))
    reference = _reference_classifier(directory, attn_implementation="eager")
    batch = _batch(directory)
    with torch.no_grad():
        got = ours(batch["input_ids"], batch["attention_mask"])
        expected = reference(**batch).logits
    assert got.shape == (2, batch["input_ids"].shape[1], 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sat_lookahead_limits_attention_to_the_right(demo_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sat-lookahead"
    shutil.copytree(demo_dir / "sat-demo", directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    layers = config["num_hidden_layers"]
    config["lookahead"] = 2 * layers  # 2 tokens to the right per layer
    config_path.write_text(json.dumps(config))
    ours = load_token_classifier(open_checkpoint(directory))
    assert isinstance(ours, LookaheadTokenClassifier)

    batch = _batch(directory)
    length = batch["input_ids"].shape[1]
    reference = _reference_classifier(directory, attn_implementation="eager")
    # transformers applies a [batch, from, to] mask as given: padding and the 2-token lookahead window.
    window = torch.ones(length, length).tril(2)
    mask3d = batch["attention_mask"][:, None, :] * window[None]
    with torch.no_grad():
        got = ours(batch["input_ids"], batch["attention_mask"])
        expected = reference(input_ids=batch["input_ids"], attention_mask=mask3d).logits
        unlimited = reference(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[real], unlimited[real], atol=1e-4)


def test_lookahead_must_divide_across_layers(demo_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sat-bad"
    shutil.copytree(demo_dir / "sat-demo", directory)
    config = json.loads((directory / "config.json").read_text())
    config["lookahead"] = config["num_hidden_layers"] * 2 + 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInput, match="divisible"):
        load_token_classifier(open_checkpoint(directory))


def test_pickled_weights_are_refused(demo_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(demo_dir / "distilbert-demo" / "config.json", directory / "config.json")
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InvalidInput, match="safetensors"):
        load_encoder(open_checkpoint(directory))


def test_unknown_hub_id_names_the_cache(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="Hugging Face cache"):
        resolve_checkpoint("segment-any-text/sat-12l-sm", cache_dir=tmp_path)


def test_hub_id_resolves_from_the_cache(demo_dir: Path, tmp_path: Path) -> None:
    """A checkpoint laid out as the hub cache stores it loads by its hub id, offline."""
    revision = "0" * 40
    repo = tmp_path / "models--example--sat-demo"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(demo_dir / "sat-demo", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    assert resolve_checkpoint("example/sat-demo", cache_dir=tmp_path) == snapshot
