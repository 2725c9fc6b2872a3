"""Embed through the batcher and ONNX Runtime, against PyTorch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from gateway.backends.onnxruntime import OrtSettings
from gateway.batcher import BatcherSettings
from gateway.errors import InvalidInput
from gateway.manifest import Manifest, Task
from gateway.runtime import load_model
from gateway.samples import probe_sentences
from gateway.tasks.embedding import EmbeddingModel, EmbedInput

Exported = Callable[[Task], tuple[Path, Manifest]]
TEXTS = [s.text for s in probe_sentences()][:12]
SETTINGS = BatcherSettings(max_batch_size=8, max_queue_delay_ms=2)


@pytest.fixture
async def embedder(exported: Exported) -> AsyncIterator[EmbeddingModel]:
    out, _ = exported("embedding")
    model = EmbeddingModel(load_model("emb", out, OrtSettings(), variant="fp32"), SETTINGS)
    await model.start()
    yield model
    await model.close()


def _torch_mean_pooling(demo_dir: Path, texts: list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(demo_dir / "distilbert-demo")
    encoder = AutoModel.from_pretrained(demo_dir / "distilbert-demo", use_safetensors=True).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


async def test_embed_matches_pytorch_mean_pooling(embedder: EmbeddingModel, demo_dir: Path) -> None:
    result = await embedder.embed(EmbedInput(TEXTS, pooling="mean", normalize=True))
    expected = _torch_mean_pooling(demo_dir, TEXTS)
    got = np.stack([e.values for e in result.embeddings])
    cosine = (got * expected).sum(1) / np.linalg.norm(expected, axis=1)
    assert np.all(cosine > 1 - 1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert result.dimensions == got.shape[1]
    assert result.usage.input_tokens > len(TEXTS)


async def test_embed_batched_equals_alone(embedder: EmbeddingModel) -> None:
    together = await asyncio.gather(*(embedder.embed(EmbedInput([t], pooling="cls")) for t in TEXTS))
    for text, reply in zip(TEXTS, together, strict=True):
        alone = await embedder.embed(EmbedInput([text], pooling="cls"))
        np.testing.assert_allclose(reply.embeddings[0].values, alone.embeddings[0].values, atol=1e-5)


async def test_embed_truncation_is_flagged_or_refused(embedder: EmbeddingModel) -> None:
    long_text = " ".join(TEXTS * 30)
    result = await embedder.embed(EmbedInput([long_text, TEXTS[0]]))
    assert [e.truncated for e in result.embeddings] == [True, False]
    with pytest.raises(InvalidInput, match=r"texts\[0\].*limit of \d+ tokens"):
        await embedder.embed(EmbedInput([long_text], truncate=False))


@pytest.mark.parametrize(
    ("texts", "message"),
    [([], "at least one text"), (["x" * 20001], "20000")],
)
async def test_embed_rejects_bad_input(embedder: EmbeddingModel, texts: list[str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        await embedder.embed(EmbedInput(texts))


def _sentence_ends(text: str) -> list[int]:
    return [index + 1 for index, char in enumerate(text) if char == "."]


@pytest.mark.parametrize("normalize", [False, True])
async def test_embed_chunk_is_the_token_weighted_mean_of_its_chunks(
    embedder: EmbeddingModel, normalize: bool
) -> None:
    """long_input chunk: a text over the limit is cut at sentence ends into chunks that fit, and its vector
    equals the token-weighted mean of embedding each chunk alone (normalized after, when asked)."""
    long_text = " ".join(TEXTS * 12)
    tokenizer = embedder.model.tokenizer

    async def ends(texts: list[str]) -> list[list[int]]:
        return [_sentence_ends(text) for text in texts]

    result = await embedder.embed(
        EmbedInput([long_text, TEXTS[0]], normalize=normalize, long_input="chunk", return_chunks=True), ends
    )
    whole, short = result.embeddings
    assert not whole.truncated
    assert len(whole.chunks) > 2
    room = tokenizer.max_length - 2
    vectors, weights = [], []
    for chunk in whole.chunks:
        piece = long_text[chunk.start : chunk.end]
        assert len(tokenizer.encode_batch([piece], add_special_tokens=False, truncate=False)[0]) <= room
        alone = await embedder.embed(EmbedInput([piece]))
        np.testing.assert_allclose(chunk.values, alone.embeddings[0].values, atol=1e-5)
        vectors.append(alone.embeddings[0].values)
        weights.append(len(tokenizer.encode_batch([piece])[0]))
        assert chunk.tokens == weights[-1]
    assert [c.end for c in whole.chunks[:-1]] == sorted(c.end for c in whole.chunks[:-1])
    assert {c.end for c in whole.chunks[:-1]} <= set(_sentence_ends(long_text))  # cut at sentence ends
    assert whole.chunks[-1].end == len(long_text)
    expected = np.average(np.stack(vectors), axis=0, weights=weights)
    if normalize:
        expected = expected / np.linalg.norm(expected)
    np.testing.assert_allclose(whole.values, expected, atol=1e-5)
    plain = await embedder.embed(EmbedInput([TEXTS[0]], normalize=normalize))
    np.testing.assert_allclose(short.values, plain.embeddings[0].values, atol=1e-5)
    cut = await embedder.embed(EmbedInput([long_text], long_input="chunk", return_chunks=True))  # no SaT
    assert all(
        len(tokenizer.encode_batch([long_text[c.start : c.end]])[0]) <= room + 2
        for c in cut.embeddings[0].chunks
    )
