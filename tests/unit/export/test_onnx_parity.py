"""fp32 ONNX against PyTorch within 1e-4, computed here independently of the export wrappers."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer

from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.decoding.batch import Batch, StepParts
from gateway.export.loaders import load_token_classifier, open_checkpoint
from gateway.manifest import Manifest, Task

Exported = Callable[[Task], tuple[Path, Manifest]]
TEXTS = [
    "The train to Lyon leaves at 12:30 from platform 4.",
    "Книга лежит на столе.",
    "السوق مفتوح حتى المساء.",
    "आज मौसम अच्छा है।",
    "今天的会议在三点开始。",
    "ቡና ጣፋጭ ነው።",
]
ATOL = 1e-4


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(directory: Path) -> dict[str, np.ndarray]:
    tok = AutoTokenizer.from_pretrained(directory)
    batch = tok(TEXTS, padding=True, return_tensors="np")
    return {
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64),
    }


def _t(values: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in values.items()}


def test_token_classification_logits(exported: Exported, demo_dir: Path) -> None:
    out, manifest = exported("token-classification")
    inputs = _inputs(out)
    model = load_token_classifier(open_checkpoint(demo_dir / "sat-demo"))
    with torch.no_grad():
        expected = model(**_t(inputs)).numpy()
    (got,) = _session(out / manifest.variants["fp32"].parts["model"].file).run(["logits"], inputs)
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=ATOL)


def test_embedding_pooled_vectors(exported: Exported, demo_dir: Path) -> None:
    out, manifest = exported("embedding")
    inputs = _inputs(out)
    encoder = AutoModel.from_pretrained(demo_dir / "distilbert-demo", use_safetensors=True).eval()
    with torch.no_grad():
        hidden = encoder(**_t(inputs)).last_hidden_state.numpy()
    mask = inputs["attention_mask"][..., None].astype(np.float32)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    cls = hidden[:, 0]
    assert manifest.embedding is not None
    names = manifest.embedding.outputs
    sess = _session(out / manifest.variants["fp32"].parts["model"].file)
    got = dict(zip(names, sess.run(list(names.values()), inputs), strict=True))
    np.testing.assert_allclose(got["mean"], mean, atol=ATOL)
    np.testing.assert_allclose(got["cls"], cls, atol=ATOL)
    np.testing.assert_allclose(
        got["mean_normalized"], mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=ATOL
    )
    np.testing.assert_allclose(
        got["cls_normalized"], cls / np.linalg.norm(cls, axis=1, keepdims=True), atol=ATOL
    )
    assert got["mean"].shape == (len(TEXTS), manifest.embedding.dimensions)


def test_fill_mask_top_k(exported: Exported, demo_dir: Path) -> None:
    out, manifest = exported("fill-mask")
    inputs = _inputs(out)
    tok = AutoTokenizer.from_pretrained(out)
    positions = np.array([[1, 2]] * len(TEXTS), dtype=np.int64)
    inputs["input_ids"][:, 1] = tok.mask_token_id
    model = AutoModelForMaskedLM.from_pretrained(demo_dir / "distilbert-demo", use_safetensors=True).eval()
    with torch.no_grad():
        probs = torch.softmax(model(**_t(inputs)).logits, -1).numpy()
    sess = _session(out / manifest.variants["fp32"].parts["model"].file)
    top_p, top_ids = sess.run(None, inputs | {"positions": positions})
    assert manifest.fill_mask is not None
    assert top_p.shape == (len(TEXTS), 2, manifest.fill_mask.max_top_k)
    for column, position in enumerate(positions[0]):
        expected = probs[:, position]
        np.testing.assert_array_equal(top_ids[:, column, 0], expected.argmax(-1))
        np.testing.assert_allclose(
            top_p[:, column], np.take_along_axis(expected, top_ids[:, column], -1), atol=ATOL
        )
        assert (np.diff(top_p[:, column], axis=-1) <= 0).all()  # best first


def test_decoder_step_logits_with_rows_of_different_lengths(exported: Exported, demo_dir: Path) -> None:
    """The exported decoder step against transformers' forward: three rows fed one token per step, the
    third joining two steps after the others (left-padded in the cache, its own positions), and a row
    leaving in between: every row's log-probabilities equal those of the full forward of its sequence."""
    out, manifest = exported("translation")
    tok = AutoTokenizer.from_pretrained(out, src_lang="eng_Latn")
    sources = [tok(text)["input_ids"] for text in TEXTS[:3]]
    start, target = tok.eos_token_id, tok.convert_tokens_to_ids("fra_Latn")
    rng = np.random.default_rng(0)
    sequences = [[start, target, *rng.integers(4, 200, size=5).tolist()] for _ in sources]
    model = AutoModelForSeq2SeqLM.from_pretrained(demo_dir / "nllb-demo", use_safetensors=True).eval()
    expected = []
    with torch.no_grad():
        for source, sequence in zip(sources, sequences, strict=True):
            logits = model(
                input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([sequence])
            ).logits
            expected.append(torch.log_softmax(logits[0], dim=-1).numpy())
    executor = ThreadPoolExecutor(1)
    parts = {
        name: OnnxRuntimeBackend(out / part.file, OrtSettings(), executor)
        for name, part in manifest.variants["fp32"].parts.items()
    }
    batch = Batch(StepParts.of(parts), tok.pad_token_id)
    where: dict[int, int] = {}  # text -> its row in the batch
    fed = [0, 0, 0]
    for step in range(7):
        joining = [0, 1] if step == 0 else [2] if step == 2 else []
        if joining:
            cross_kv, source_mask = batch.encode([sources[t] for t in joining])
            for t, rows in zip(joining, batch.join(cross_kv, source_mask, [1] * len(joining)), strict=True):
                where[t] = rows[0]
        tokens = np.zeros(batch.rows, dtype=np.int64)
        positions = np.zeros(batch.rows, dtype=np.int64)
        for t, row in where.items():
            tokens[row], positions[row] = sequences[t][fed[t]], fed[t]
        logprobs = batch.step(tokens, positions)
        for t, row in where.items():
            np.testing.assert_allclose(
                logprobs[row], expected[t][fed[t]], atol=ATOL, err_msg=f"step {step}, text {t}"
            )
            fed[t] += 1
        if step == 3:  # text 1 leaves: the last row moves into its place
            moved = batch.remove([where.pop(1)])
            where = {t: moved.get(row, row) for t, row in where.items()}
    assert fed == [7, 4, 5]
    assert batch.slots <= 8


@pytest.mark.parametrize("task", ["token-classification", "embedding", "fill-mask", "translation"])
def test_int8_and_fp16_stay_close_to_fp32(exported: Exported, task: Task) -> None:
    _, manifest = exported(task)
    for name in ("int8", "fp16"):
        report = manifest.variants[name].accuracy
        assert report is not None
        assert report.metrics, report.note
        agreement = next(v for k, v in report.metrics.items() if k.endswith("agreement") or k == "min_cosine")
        assert agreement >= 0.9, (name, report.metrics)
