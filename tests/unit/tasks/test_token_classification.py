"""Classify and Segment through the batcher and ONNX Runtime, against PyTorch and a reference SaT."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForTokenClassification

from gateway.backends.onnxruntime import OrtSettings
from gateway.batcher import BatcherSettings
from gateway.errors import InvalidInput
from gateway.export.demo import shipped_tokenizer, xlmr_fast
from gateway.export.exporter import ExportOptions, export_model
from gateway.export.loaders import load_token_classifier, open_checkpoint
from gateway.manifest import Manifest, Task
from gateway.runtime import load_model
from gateway.samples import sample_sentences
from gateway.tasks.token_classification import (
    ClassifyInput,
    SegmentInput,
    TokenClassificationModel,
    _entity_spans,
    _tags,
    split_points,
)

Exported = Callable[[Task], tuple[Path, Manifest]]
SETTINGS = BatcherSettings(max_batch_size=8, max_queue_delay_ms=2)


@pytest.fixture(scope="module")
async def sat(exported: Exported) -> AsyncIterator[TokenClassificationModel]:
    out, _ = exported("token-classification")
    model = TokenClassificationModel(load_model("sat", out, OrtSettings(), variant="fp32"), SETTINGS)
    await model.start()
    yield model
    await model.close()


def _paragraph(lang: str, count: int) -> str:
    return " ".join(s.text for s in sample_sentences() if s.lang == lang)[: count * 400]


# -------------------------------------------------------------------------------------- reference SaT


def reference_segment(
    directory: Path, text: str, threshold: float, stride: int
) -> tuple[list[str], np.ndarray]:
    """SaT as described, slowly: XLM-R tokens without specials, windows of <= 510 tokens with <s>/</s>,
    averaged logits, sigmoid, probability on each token's last character, split after characters above the
    threshold and at newlines, trailing whitespace kept with its sentence."""
    tok = AutoTokenizer.from_pretrained(directory)
    model = load_token_classifier(open_checkpoint(directory))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    total, counts = np.zeros(len(ids)), np.zeros(len(ids))
    start = 0
    while True:
        end = min(start + 510, len(ids))
        first = max(end - 510, 0) if end == len(ids) else start
        window = torch.tensor([[tok.cls_token_id, *ids[first:end], tok.sep_token_id]])
        with torch.no_grad():
            logits = model(window, torch.ones_like(window))[0, 1:-1, 0].numpy()
        total[first:end] += logits
        counts[first:end] += 1
        if end == len(ids):
            break
        start += stride
    probs = 1 / (1 + np.exp(-(total / counts)))
    char_probs = np.zeros(len(text))
    for (a, b), p in zip(offsets, probs, strict=True):
        if b > a:
            char_probs[b - 1] = p
    sentences, current = [], ""
    index = 0
    while index < len(text):
        current += text[index]
        if char_probs[index] > threshold or text[index] == "\n":
            while index + 1 < len(text) and text[index + 1].isspace():
                index += 1
                current += text[index]
            sentences.append(current)
            current = ""
        index += 1
    if current:
        sentences.append(current)
    return sentences, char_probs


@pytest.mark.parametrize(
    ("lang", "stride"), [("eng_Latn", 64), ("rus_Cyrl", 100), ("zho_Hans", 64), ("amh_Ethi", 37)]
)
async def test_segment_matches_the_reference(
    sat: TokenClassificationModel, demo_dir: Path, lang: str, stride: int
) -> None:
    text = _paragraph(lang, 6) + "\nA line of its own\n" + _paragraph("deu_Latn", 3)
    _, probs = reference_segment(demo_dir / "sat-demo", text, 0.5, stride)
    threshold = float(np.quantile(probs[probs > 0], 0.8))  # random weights: pick a cut that splits often
    expected, _ = reference_segment(demo_dir / "sat-demo", text, threshold, stride)
    result = await sat.segment(
        SegmentInput([text], threshold=threshold, stride=stride, return_probabilities=True)
    )
    got = result.results[0]
    assert [s.text for s in got.sentences] == expected
    assert len(expected) > 3
    assert "".join(s.text for s in got.sentences) == text
    assert all(text[s.start : s.end] == s.text for s in got.sentences)
    np.testing.assert_allclose(got.probabilities or [], probs, atol=1e-4)
    assert result.usage.input_tokens > 512  # several windows


def _clear_threshold(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """A threshold around the 80th percentile of the probabilities, in the widest gap between them there.
    wtpsplit sums window logits in float16, so its probabilities differ from ours in the 5th digit; a gap
    in both sets wider than that difference has each character's two probabilities on the same side."""
    mine, reference = np.concatenate(ours), np.concatenate(theirs)
    error = float(np.abs(mine - reference).max())
    values = np.unique(np.concatenate([mine, reference]))
    values = values[(values > np.quantile(values, 0.7)) & (values < np.quantile(values, 0.9))]
    gap = int(np.argmax(np.diff(values)))
    assert values[gap + 1] - values[gap] > 2 * error, "no clear threshold: pick other texts"
    return float(values[gap] + values[gap + 1]) / 2


async def test_wtpsplit_compat_answers_sat_split(sat: TokenClassificationModel, demo_dir: Path) -> None:
    """The segments of wtpsplit's own `SaT.split` on the same checkpoint, newlines and whitespace
    included: dropped newlines, empty segments, whitespace-only and empty texts, stripping."""
    from wtpsplit import SaT

    directory = str(demo_dir / "sat-demo")
    reference = SaT(directory, tokenizer_name_or_path=directory, hub_prefix=None)
    texts = [
        _paragraph("eng_Latn", 4) + "\n\n" + _paragraph("ukr_Cyrl", 3) + "\nOne line\n  \n",
        "First line\nSecond line\n\n\nAfter three newlines \n",
        _paragraph("jpn_Jpan", 1) + "\n",
        "\n\n",
        "   ",
        " \n x \n",
        "",
    ]
    ours = await sat.segment(SegmentInput(texts, threshold=0.5, return_probabilities=True))
    threshold = _clear_threshold(
        [np.asarray(r.probabilities) for r in ours.results],
        [
            np.asarray(p).reshape(-1)[: len(t)] if t.strip() else np.zeros(len(t))  # blank: one -inf logit
            for t, p in zip(texts, reference.predict_proba(texts, stride=64), strict=True)  # split's stride
        ],
    )
    for strip in (False, True):
        expected = list(reference.split(texts, threshold=threshold, strip_whitespace=strip))
        result = await sat.segment(
            SegmentInput(texts, threshold=threshold, wtpsplit_compat=True, strip_whitespace=strip)
        )
        for text, want, got in zip(texts, expected, result.results, strict=True):
            assert [s.text for s in got.sentences] == want, repr(text[:40])
            assert all(text[s.start : s.end] == s.text for s in got.sentences)
        assert len(expected[0]) > 10
    assert "" in list(reference.split(texts[:2], threshold=threshold))[1]  # empty segments were compared


async def test_segment_max_length(sat: TokenClassificationModel) -> None:
    text = _paragraph("fra_Latn", 5)
    result = await sat.segment(SegmentInput([text], threshold=0.999, max_length=40))
    sentences = result.results[0].sentences
    assert all(len(s.text) <= 40 for s in sentences)
    assert "".join(s.text for s in sentences) == text


async def test_segment_batches_windows_of_many_texts(sat: TokenClassificationModel) -> None:
    texts = [_paragraph(lang, 2) for lang in ("eng_Latn", "hin_Deva", "kor_Hang")]
    together = await asyncio.gather(*(sat.segment(SegmentInput([t], threshold=0.4)) for t in texts))
    alone = await sat.segment(SegmentInput(texts, threshold=0.4))
    assert [r.results[0] for r in together] == alone.results


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (SegmentInput(["x"], threshold=1.5), "threshold: 1.5 must be between 0 and 1"),
        (SegmentInput(["x"], max_length=-1), "max_length"),
        (SegmentInput(["x"], stride=600), "stride: 600"),
        (SegmentInput(["x"], stride=1), "stride: 1 must be between 32 and 510"),
        (SegmentInput([]), "at least one text"),
        (SegmentInput(["x"], max_length=40, wtpsplit_compat=True), "max_length: wtpsplit_compat"),
    ],
)
async def test_segment_errors(sat: TokenClassificationModel, request_: SegmentInput, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        await sat.segment(request_)


# ------------------------------------------------------------------------------------------- classify


async def test_classify_sat_tokens_and_sentences(sat: TokenClassificationModel, demo_dir: Path) -> None:
    text = _paragraph("eng_Latn", 1)
    result = await sat.classify(ClassifyInput([text], format="bioes", scores="probabilities", threshold=0.5))
    model = load_token_classifier(open_checkpoint(demo_dir / "sat-demo"))
    batch = AutoTokenizer.from_pretrained(demo_dir / "sat-demo")(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])[0, 1:-1, 0].numpy()
    probs = 1 / (1 + np.exp(-logits))
    tokens = result.results[0].tokens
    np.testing.assert_allclose([t.scores[0] for t in tokens], probs, atol=1e-4)
    spans = result.results[0].spans
    assert all(s.label == "SENTENCE" for s in spans)
    assert sum(1 for t in tokens if t.label.startswith(("E-", "S-"))) == len(spans)
    ends = [i for i, p in enumerate(probs) if p > 0.5]
    assert [t.label[0] for i, t in enumerate(tokens) if i in ends] == [
        "S" if t.label[0] == "S" else "E" for i, t in enumerate(tokens) if i in ends
    ]
    labels = await sat.classify(ClassifyInput([text], threshold=0.5))
    assert [t.label for t in labels.results[0].tokens] == ["BOUNDARY" if p > 0.5 else "O" for p in probs]


async def test_classify_truncates_and_flags(sat: TokenClassificationModel) -> None:
    long_text = _paragraph("eng_Latn", 30) * 3
    result = await sat.classify(ClassifyInput([long_text[:19000], "Short."]))
    assert [r.truncated for r in result.results] == [True, False]
    assert len(result.results[0].tokens) == 510


@pytest.fixture(scope="module")
def ner_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny NER-style XLM-R token classifier (B-/I- labels), exported like any checkpoint."""
    root = tmp_path_factory.mktemp("ner")
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    tokenizer = xlmr_fast(shipped_tokenizer("xlmr"))
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        initializer_range=0.02,
    )  # fmt: skip
    torch.manual_seed(0)
    XLMRobertaForTokenClassification(config).eval().save_pretrained(root / "ner")
    tokenizer.save_pretrained(root / "ner")
    export_model(root / "ner", root / "onnx", ExportOptions(task="token-classification", variants=("fp32",)))
    return root / "ner", root / "onnx"


async def test_classify_ner_labels_and_spans(ner_export: tuple[Path, Path]) -> None:
    checkpoint, out = ner_export
    model = TokenClassificationModel(load_model("ner", out, OrtSettings(), variant="fp32"), SETTINGS)
    await model.start()
    try:
        text = "Maria Schmidt flew from Lisbon to Nairobi with Ahmed on Monday."
        labels = await model.classify(ClassifyInput([text], format="labels", scores="logits"))
        bio = await model.classify(ClassifyInput([text], format="bio"))
        with pytest.raises(InvalidInput, match="not a SaT segmentation model"):
            await model.segment(SegmentInput([text]))
    finally:
        await model.close()
    reference = XLMRobertaForTokenClassification.from_pretrained(checkpoint).eval()
    batch = AutoTokenizer.from_pretrained(checkpoint)(text, return_tensors="pt")
    with torch.no_grad():
        logits = reference(**batch).logits[0, 1:-1].numpy()
    tokens = labels.results[0].tokens
    np.testing.assert_allclose([t.scores for t in tokens], logits, atol=1e-4)
    names = [reference.config.id2label[i] for i in logits.argmax(-1)]
    assert [t.label for t in tokens] == names
    assert len(set(names)) > 1
    spans = bio.results[0].spans
    assert [t.label for t in bio.results[0].tokens] == _tags(len(names), _entity_spans(names), "bio")
    for span in spans:
        assert span.text == text[span.start : span.end]
        assert span.label in {"PER", "LOC"}


def test_entity_spans_from_any_scheme() -> None:
    names = ["B-PER", "I-PER", "O", "LOC", "LOC", "B-LOC", "S-ORG", "I-PER"]
    assert _entity_spans(names) == [("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("ORG", 6, 6), ("PER", 7, 7)]
    assert _tags(8, _entity_spans(names), "bioes") == [
        "B-PER", "E-PER", "O", "B-LOC", "E-LOC", "S-LOC", "S-ORG", "S-PER",
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------- split points


def _split_points_slowly(text: str, char_probs: np.ndarray, threshold: float) -> list[int]:
    """The definition: an end after each character above the threshold and each newline, moved past the
    whitespace that follows; duplicates dropped; the text's end last."""
    cuts = sorted(
        {i for i, p in enumerate(char_probs) if p > threshold} | {i for i, c in enumerate(text) if c == "\n"}
    )
    ends: list[int] = []
    for index in cuts:
        end = index + 1
        while end < len(text) and text[end].isspace():
            end += 1
        if not ends or end > ends[-1]:
            ends.append(end)
    if not ends or ends[-1] != len(text):
        ends.append(len(text))
    return ends


def test_split_points_match_their_definition() -> None:
    rng = np.random.default_rng(0)
    alphabet = list("ab .\n\t\u3000\u00a0\u2028xyz。!")
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 80))))
        probs = rng.random(len(text)).astype(np.float32)
        assert split_points(text, probs, 0.7) == _split_points_slowly(text, probs, 0.7), repr(text)


def test_split_points_of_a_text_of_newlines() -> None:
    """The input that froze the server: 19,999 newlines (each a cut) and a letter."""
    text = "\n" * 19999 + "x"
    assert split_points(text, np.zeros(len(text), dtype=np.float32), 0.5) == [19999, 20000]


async def test_classify_chunk_labels_a_long_text_whole(sat: TokenClassificationModel, demo_dir: Path) -> None:
    """long_input chunk: every token of a text over the input limit, each with the logits of the window
    (510 content tokens, starts 255 apart) where it has the most context on both sides."""
    text = (_paragraph("eng_Latn", 30) + " ") * 3
    tok = AutoTokenizer.from_pretrained(demo_dir / "sat-demo")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert len(ids) > 1200  # several windows
    model = load_token_classifier(open_checkpoint(demo_dir / "sat-demo"))
    expected = np.zeros((len(ids), 1))
    margin = np.full(len(ids), -1)
    start = 0
    while True:
        end = min(start + 510, len(ids))
        first = max(end - 510, 0) if end == len(ids) else start
        window = torch.tensor([[tok.cls_token_id, *ids[first:end], tok.sep_token_id]])
        with torch.no_grad():
            logits = model(window, torch.ones_like(window))[0, 1:-1].numpy()
        for position in range(first, end):
            room = min(position - first, end - 1 - position)
            if room > margin[position]:
                expected[position], margin[position] = logits[position - first], room
        if end == len(ids):
            break
        start += 255
    result = await sat.classify(ClassifyInput([text, "Short one."], scores="logits", long_input="chunk"))
    whole, short = result.results
    assert not whole.truncated
    assert [(t.start, t.end) for t in whole.tokens] == [tuple(o) for o in offsets]
    np.testing.assert_allclose([t.scores for t in whole.tokens], expected, atol=1e-4)
    assert all(text[t.start : t.end] == t.token for t in whole.tokens)
    cut = await sat.classify(ClassifyInput(["Short one."], scores="logits"))
    assert [t.label for t in short.tokens] == [t.label for t in cut.results[0].tokens]
    np.testing.assert_allclose(
        [t.scores for t in short.tokens], [t.scores for t in cut.results[0].tokens], atol=1e-5
    )
    truncated = await sat.classify(ClassifyInput([text]))
    assert truncated.results[0].truncated
    assert len(truncated.results[0].tokens) == 510 < len(whole.tokens)
