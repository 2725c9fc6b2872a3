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
    load_tokenizer,
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


def _cache(root: Path, repo: str, files: Path) -> None:
    revision = "1" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(files / name, snapshot / name)


@pytest.mark.parametrize("cached_as", ["FacebookAI/xlm-roberta-base", "xlm-roberta-base"])
def test_a_sat_checkpoint_without_a_tokenizer_takes_xlmr_from_the_cache(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached_as: str
) -> None:
    import huggingface_hub.constants

    checkpoint = tmp_path / "sat-bare"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(demo_dir / "sat-demo" / name, checkpoint / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(InvalidInput, match="xlm-roberta-base' is neither a directory nor in the"):
        load_tokenizer(open_checkpoint(checkpoint))
    _cache(tmp_path / "hub", cached_as, demo_dir / "sat-demo")
    tokenizer = load_tokenizer(open_checkpoint(checkpoint))
    assert (
        tokenizer("Hello there.")["input_ids"]
        == load_tokenizer(open_checkpoint(demo_dir / "sat-demo"))("Hello there.")["input_ids"]
    )
    plain = tmp_path / "plain"
    shutil.copytree(demo_dir / "distilbert-demo", plain)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (plain / name).unlink(missing_ok=True)
    with pytest.raises(InvalidInput, match="has no tokenizer files; pass --tokenizer DIR"):
        load_tokenizer(open_checkpoint(plain))
    assert load_tokenizer(open_checkpoint(plain), tokenizer=demo_dir / "distilbert-demo").vocab_size > 0
