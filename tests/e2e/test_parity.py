"""Each rpc over loopback against its PyTorch reference, computed in the same test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from gateway.export.loaders import load_token_classifier, open_checkpoint
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.samples import probe_sentences

Stub = polyglot_pb2_grpc.PolyglotStub
SOURCES = [s.text for s in probe_sentences() if s.lang == "eng_Latn"] + [
    s.text for s in probe_sentences() if s.lang == "deu_Latn"
]


def _reference_generate(
    demo_dir: Path, source: str, texts: list[str], target: str, new_tokens: int, beams: int
) -> list[list[int]]:
    """transformers generate(): the forced target-language token, then `new_tokens` more at most."""
    tok = AutoTokenizer.from_pretrained(demo_dir / "nllb-demo", src_lang=source)
    model = AutoModelForSeq2SeqLM.from_pretrained(demo_dir / "nllb-demo", use_safetensors=True).eval()
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch,
            forced_bos_token_id=tok.convert_tokens_to_ids(target),
            max_new_tokens=new_tokens + 1,
            num_beams=beams,
            do_sample=False,
        )
    rows = []
    for row in out.tolist():
        body = row[2:]  # decoder start and the forced language token
        while body and body[-1] in (tok.pad_token_id, tok.eos_token_id):
            body = body[:-1]
        rows.append(body)
    return rows


async def test_translate_greedy_and_beam_match_generate(stub: Stub, demo_dir: Path) -> None:
    compared = []
    for source, texts in (("eng_Latn", SOURCES[:2]), ("deu_Latn", SOURCES[2:4])):
        for beams in (1, 4):
            for target, new_tokens in (("fra_Latn", 12), ("zho_Hans", 7)):
                options = pb.TranslateOptions(beam_size=beams, max_new_tokens=new_tokens)
                reply = await stub.Translate(
                    pb.TranslateRequest(texts=texts, source_lang=source, target_lang=target, options=options)
                )
                got = [list(t.hypotheses[0].token_ids) for t in reply.translations]
                expected = _reference_generate(demo_dir, source, texts, target, new_tokens, beams)
                assert got == expected, (source, beams, target)
                compared.extend(map(tuple, got))
    assert len(set(compared)) > 1, "the compared outputs are all the same: the test could not fail"


async def test_classify_logits_match_pytorch(stub: Stub, demo_dir: Path) -> None:
    texts = [s.text for s in probe_sentences()][:6]
    reply = await stub.Classify(pb.ClassifyRequest(texts=texts, return_scores=pb.SCORE_KIND_LOGITS))
    model = load_token_classifier(open_checkpoint(demo_dir / "sat-demo"))
    tok = AutoTokenizer.from_pretrained(demo_dir / "sat-demo")
    for text, result in zip(texts, reply.results, strict=True):
        batch = tok(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"])[0, 1:-1].numpy()
        got = np.array([list(t.scores) for t in result.tokens], dtype=np.float32)
        np.testing.assert_allclose(got, logits, atol=1e-4)
        starts = [t.start for t in result.tokens]
        assert starts == sorted(starts)
        for token in result.tokens:
            assert token.token == text[token.start : token.end]
            assert 0 <= token.start < token.end <= len(text)


async def test_segment_matches_the_reference_sat(stub: Stub, demo_dir: Path) -> None:
    from tests.unit.tasks.test_token_classification import reference_segment

    text = " ".join(s.text for s in probe_sentences()) * 3  # several overlapping windows
    _, probs = reference_segment(demo_dir / "sat-demo", text, 0.5, 64)
    threshold = float(np.quantile(probs[probs > 0], 0.8))
    expected, _ = reference_segment(demo_dir / "sat-demo", text, threshold, 64)
    reply = await stub.Segment(pb.SegmentRequest(texts=[text], threshold=threshold))
    assert [s.text for s in reply.results[0].sentences] == expected
    assert len(expected) > 5
    assert reply.threshold == pytest.approx(threshold)
