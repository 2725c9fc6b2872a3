"""FillMask through the batcher and ONNX Runtime, against PyTorch and the tokenizer's decoder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from gateway.backends.onnxruntime import OrtSettings
from gateway.batcher import BatcherSettings
from gateway.errors import InvalidInput
from gateway.manifest import Manifest, Task
from gateway.runtime import load_model
from gateway.samples import probe_sentences
from gateway.tasks.fill_mask import FillMaskInput, FillMaskModel

Exported = Callable[[Task], tuple[Path, Manifest]]
TEXTS = [s.text for s in probe_sentences()][:12]
SETTINGS = BatcherSettings(max_batch_size=8, max_queue_delay_ms=2)


@pytest.fixture
async def filler(exported: Exported) -> AsyncIterator[FillMaskModel]:
    out, _ = exported("fill-mask")
    model = FillMaskModel(load_model("mlm", out, OrtSettings(), variant="fp32"), SETTINGS)
    await model.start()
    yield model
    await model.close()


async def test_fill_mask_matches_pytorch(filler: FillMaskModel, demo_dir: Path) -> None:
    texts = ["The market opens at [MASK] o'clock.", "Le [MASK] est ouvert, le [MASK] aussi."]
    result = await filler.fill_mask(FillMaskInput(texts, top_k=3))
    tok = AutoTokenizer.from_pretrained(demo_dir / "distilbert-demo")
    model = AutoModelForMaskedLM.from_pretrained(demo_dir / "distilbert-demo", use_safetensors=True).eval()
    for text, masks in zip(texts, result.results, strict=True):
        batch = tok(text, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**batch).logits[0], -1)
        positions = (batch["input_ids"][0] == tok.mask_token_id).nonzero()[:, 0].tolist()
        assert len(masks) == len(positions) == text.count("[MASK]")
        for mask, position in zip(masks, positions, strict=True):
            assert text[mask.start : mask.end] == "[MASK]"
            top = torch.topk(probs[position], 3)
            assert [p.token_id for p in mask.predictions] == top.indices.tolist()
            np.testing.assert_allclose([p.score for p in mask.predictions], top.values.numpy(), atol=1e-4)
            for prediction in mask.predictions:
                assert prediction.token == tok.decode([prediction.token_id]).strip()


async def test_fill_mask_sequences_join_pieces_as_the_tokenizer_does(
    filler: FillMaskModel, demo_dir: Path
) -> None:
    """Each `sequence` reads as the tokenizer decodes the text's tokens with the prediction in the mask's
    place: a continuation piece closes up to the word before it, a word keeps the mask's spacing."""
    tok = AutoTokenizer.from_pretrained(demo_dir / "distilbert-demo")
    texts = ["The market opens at [MASK] o'clock.", "Le [MASK] est ouvert,  le [MASK] aussi.", "Berlin[MASK]"]
    result = await filler.fill_mask(FillMaskInput(texts, top_k=filler.max_top_k))
    kinds = set()
    for text, masks in zip(texts, result.results, strict=True):
        ids = tok(text)["input_ids"]
        positions = [i for i, token in enumerate(ids) if token == tok.mask_token_id]
        for mask, position in zip(masks, positions, strict=True):
            for prediction in mask.predictions:
                filled = [*ids[:position], prediction.token_id, *ids[position + 1 :]]
                expected = tok.decode(filled, skip_special_tokens=True)
                got = prediction.sequence
                assert tok.decode(tok(got)["input_ids"], skip_special_tokens=True) == expected, (text, got)
                assert got.endswith(text[mask.end :])
                piece = prediction.token.startswith("##") and position > 1
                kinds.add(piece)
                if piece:
                    assert prediction.token[2:] in got
                    assert "##" not in got
                elif prediction.token not in tok.all_special_tokens and text[mask.start - 1] == " ":
                    assert got == text[: mask.start] + prediction.token + text[mask.end :]
    assert kinds == {True, False}, "no continuation piece, or no word, among the predictions"


async def test_fill_mask_needs_a_mask(filler: FillMaskModel) -> None:
    with pytest.raises(InvalidInput, match=r"texts\[0\] has no mask token.*\[MASK\]"):
        await filler.fill_mask(FillMaskInput(["no mask here"]))
    with pytest.raises(InvalidInput, match="top_k"):
        await filler.fill_mask(FillMaskInput(["a [MASK]"], top_k=0))
