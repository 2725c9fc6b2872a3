"""Demo checkpoints: the published layouts and tokenizer types, built deterministically."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer, DistilBertForMaskedLM, NllbTokenizerFast

from gateway.export.demo import TRAINERS, build_sat_demo, read_demo_info, shipped_tokenizer
from gateway.languages import flores200_codes
from gateway.samples import probe_sentences, sample_sentences


def test_flores200_list_has_202_distinct_codes() -> None:
    codes = flores200_codes()
    assert len(codes) == 202
    assert len(set(codes)) == 202
    assert {"eng_Latn", "fra_Latn", "zho_Hans", "amh_Ethi", "arb_Arab"} <= set(codes)
    assert all(len(c) == 8 and c[3] == "_" for c in codes)


def test_sample_text_covers_the_scripts() -> None:
    sentences = sample_sentences()
    assert len(sentences) >= 300
    assert all(s.lang in flores200_codes() for s in sentences)
    scripts = {unicodedata.name(ch, "").split(" ")[0] for s in sentences for ch in s.text if ch.isalpha()}
    for script in ("LATIN", "CYRILLIC", "ARABIC", "DEVANAGARI", "CJK", "ETHIOPIC"):
        assert script in scripts, script
    assert len(probe_sentences()) == 2 * len({s.lang for s in sentences})


def test_sat_demo_is_saved_like_wtpsplit(demo_dir: Path) -> None:
    config = json.loads((demo_dir / "sat-demo" / "config.json").read_text())
    assert config["model_type"] == "xlm-token"
    assert config["architectures"] == ["SubwordXLMForTokenClassification"]
    assert "lookahead" in config
    assert len(config["id2label"]) == 1
    assert list((demo_dir / "sat-demo").glob("*.safetensors"))
    info = read_demo_info(demo_dir / "sat-demo")
    assert info is not None
    assert info.random_weights
    assert info.mirrors == "segment-any-text/sat-12l-sm"


def test_sat_demo_tokenizer_is_xlmr_style(demo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(demo_dir / "sat-demo")
    assert type(tok).__name__ == "XLMRobertaTokenizerFast"
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    assert tok.mask_token == "<mask>"
    assert tok.mask_token_id == len(tok) - 1
    pieces = tok.tokenize("Hello world")
    assert pieces[0].startswith("▁")
    encoded = tok("Hello world")["input_ids"]
    assert encoded[0] == 0
    assert encoded[-1] == 2


def test_distilbert_demo_is_cased_with_a_masked_lm_head(demo_dir: Path) -> None:
    directory = demo_dir / "distilbert-demo"
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["DistilBertForMaskedLM"]
    model = DistilBertForMaskedLM.from_pretrained(directory, use_safetensors=True)
    assert model.vocab_projector.out_features == config["vocab_size"]
    tok = AutoTokenizer.from_pretrained(directory)
    assert type(tok).__name__ == "DistilBertTokenizerFast"
    assert tok.tokenize("Paris") != tok.tokenize("paris")  # cased
    assert tok("x")["input_ids"][0] == tok.cls_token_id
    assert tok.mask_token == "[MASK]"


def test_nllb_demo_tokenizer_wraps_source_like_the_real_one(demo_dir: Path) -> None:
    tok = NllbTokenizerFast.from_pretrained(demo_dir / "nllb-demo", src_lang="fra_Latn", tgt_lang="deu_Latn")
    vocab = tok.get_vocab()
    assert all(code in vocab for code in flores200_codes())
    ids = tok("Bonjour le monde.")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("fra_Latn")
    assert ids[-1] == tok.eos_token_id
    assert tok.eos_token == "</s>"
    target = tok(text_target="Hallo Welt.")["input_ids"]
    assert target[0] == tok.convert_tokens_to_ids("deu_Latn")
    assert target[-1] == tok.eos_token_id
    # Each language code is one token, never split into pieces.
    assert tok.tokenize("zul_Latn") == ["zul_Latn"]


def _weights_hash(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_demo_builds_are_deterministic(tmp_path: Path) -> None:
    first = build_sat_demo(tmp_path / "a", "tiny", seed=3)
    second = build_sat_demo(tmp_path / "b", "tiny", seed=3)
    other = build_sat_demo(tmp_path / "c", "tiny", seed=4)
    assert _weights_hash(first) == _weights_hash(second)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    assert _weights_hash(first) != _weights_hash(other)


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_training_on_the_sample_text_reproduces_the_shipped_layout(kind: str) -> None:
    """The shipped tokenizers are what training on the sample text makes (up to tie order)."""
    shipped = shipped_tokenizer(kind)
    trained = TRAINERS[kind]([s.text for s in sample_sentences()], 3000)
    assert type(trained.model) is type(shipped.model)
    size = shipped.get_vocab_size()
    assert abs(trained.get_vocab_size() - size) <= size // 20
    for token in ("<s>", "<pad>", "</s>", "<unk>", "<mask>", "[CLS]", "[SEP]", "[MASK]", "eng_Latn"):
        assert trained.token_to_id(token) == shipped.token_to_id(token), token
    text = sample_sentences()[0].text
    assert len(trained.encode(text).ids) == pytest.approx(len(shipped.encode(text).ids), rel=0.5)
