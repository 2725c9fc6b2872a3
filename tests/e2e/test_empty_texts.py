"""Empty and whitespace-only texts, over gRPC: answered per RPC as the proto says, never refused, and never
changing the answers for the other texts of the request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.samples import probe_sentences

Stub = polyglot_pb2_grpc.PolyglotStub
TEXT = probe_sentences()[0].text
EMPTY = ["", " ", "\n\t  \u3000"]


async def test_translate_answers_empty_for_empty_texts(stub: Stub) -> None:
    options = pb.TranslateOptions(beam_size=2, num_return=2)
    alone = await stub.Translate(
        pb.TranslateRequest(texts=[TEXT], source_lang="eng_Latn", target_lang="fra_Latn", options=options)
    )
    reply = await stub.Translate(
        pb.TranslateRequest(
            texts=[EMPTY[0], TEXT, *EMPTY[1:]],
            source_lang="eng_Latn",
            target_lang="fra_Latn",
            options=options,
        )
    )
    assert len(reply.translations) == 4
    for index in (0, 2, 3):
        hypotheses = reply.translations[index].hypotheses
        assert [(h.text, list(h.token_ids)) for h in hypotheses] == [("", []), ("", [])]
    assert reply.translations[1] == alone.translations[0]
    assert reply.usage.input_tokens == alone.usage.input_tokens
    assert reply.usage.output_tokens == alone.usage.output_tokens > 0
    only_empty = await stub.Translate(
        pb.TranslateRequest(texts=EMPTY, source_lang="eng_Latn", target_lang="fra_Latn")
    )
    assert [t.hypotheses[0].text for t in only_empty.translations] == ["", "", ""]
    assert only_empty.usage.input_tokens == only_empty.usage.output_tokens == 0


async def test_streamed_tokens_name_their_text_around_empty_ones(stub: Stub) -> None:
    texts = ["", TEXT, " ", probe_sentences()[1].text]
    request = pb.TranslateRequest(texts=texts, source_lang="eng_Latn", target_lang="deu_Latn")
    pieces: dict[int, list[int]] = {}
    last = None
    async for message in stub.TranslateTokens(request):
        if message.HasField("result"):
            last = message.result
        else:
            pieces.setdefault(message.text_index, []).extend(message.token_ids)
    assert last is not None
    assert set(pieces) == {1, 3}
    for index in (1, 3):
        assert pieces[index] == list(last.translations[index].hypotheses[0].token_ids)
    assert last.translations[0].hypotheses[0].text == last.translations[2].hypotheses[0].text == ""


async def test_segment_empty_and_whitespace_texts(stub: Stub) -> None:
    texts = ["", "   ", "\n\n", TEXT]
    default = await stub.Segment(pb.SegmentRequest(texts=texts))
    assert [[s.text for s in r.sentences] for r in default.results[:3]] == [[], ["   "], ["\n\n"]]
    assert "".join(s.text for s in default.results[3].sentences) == TEXT
    stripped = await stub.Segment(pb.SegmentRequest(texts=texts, strip_whitespace=True))
    assert [list(r.sentences) for r in stripped.results[:3]] == [[], [], []]
    assert [s.text for s in stripped.results[3].sentences] == [
        s.text.strip() for s in default.results[3].sentences
    ]
    compat = await stub.Segment(pb.SegmentRequest(texts=texts, wtpsplit_compat=True))
    assert [[s.text for s in r.sentences] for r in compat.results[:3]] == [[], ["   "], ["", "", ""]]
    alone = await stub.Segment(pb.SegmentRequest(texts=[TEXT]))
    assert default.results[3] == alone.results[0]
    assert alone.usage.input_tokens == default.usage.input_tokens  # the empty texts were not run


async def test_embed_empty_texts_embed_the_special_tokens(stub: Stub, demo_dir: Path) -> None:
    reply = await stub.Embed(pb.EmbedRequest(texts=[*EMPTY, TEXT], pooling=pb.POOLING_MEAN))
    tok = AutoTokenizer.from_pretrained(demo_dir / "distilbert-demo")
    encoder = AutoModel.from_pretrained(demo_dir / "distilbert-demo", use_safetensors=True).eval()
    for text, embedding in zip([*EMPTY, TEXT], reply.embeddings, strict=True):
        batch = tok(text, return_tensors="pt")
        with torch.no_grad():
            expected = encoder(**batch).last_hidden_state[0].mean(0).numpy()
        got = np.array(embedding.values, dtype=np.float32)
        assert float(got @ expected / np.linalg.norm(got) / np.linalg.norm(expected)) > 1 - 1e-4
    assert tok("")["input_ids"] == [tok.cls_token_id, tok.sep_token_id]


async def test_classify_empty_texts_have_no_tokens(stub: Stub) -> None:
    reply = await stub.Classify(pb.ClassifyRequest(texts=[*EMPTY, TEXT], format=pb.LABEL_FORMAT_BIOES))
    assert list(reply.results[0].tokens) == list(reply.results[0].spans) == []
    for text, result in zip(EMPTY[1:], reply.results[1:3], strict=True):  # what the tokenizer makes of it
        assert all(t.token.isspace() and text[t.start : t.end] == t.token for t in result.tokens)
    assert len(reply.results[3].tokens) > 3
