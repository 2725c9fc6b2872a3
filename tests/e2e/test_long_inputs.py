"""Long inputs over gRPC: Embed CHUNK cuts at the server's SaT sentence ends; Classify CHUNK labels every
token of the text."""

from __future__ import annotations

import numpy as np

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.samples import probe_sentences

Stub = polyglot_pb2_grpc.PolyglotStub
LONG = " ".join(s.text for s in probe_sentences()) * 4


async def test_embed_chunk_cuts_at_the_segmenter_s_sentence_ends(stub: Stub) -> None:
    reply = await stub.Embed(
        pb.EmbedRequest(texts=[LONG], long_input=pb.LONG_INPUT_CHUNK, return_chunks=True, normalize=True)
    )
    (embedding,) = reply.embeddings
    assert not embedding.truncated
    assert len(embedding.chunks) > 1
    sentences = (await stub.Segment(pb.SegmentRequest(texts=[LONG]))).results[0].sentences
    ends = {s.start + len(s.text.rstrip()) for s in sentences}
    assert {c.end for c in embedding.chunks[:-1]} <= ends
    assert embedding.chunks[-1].end == len(LONG.rstrip())
    weights = np.array([c.tokens for c in embedding.chunks], dtype=np.float64)
    mean = (np.array([list(c.values) for c in embedding.chunks]) * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(list(embedding.values), mean / np.linalg.norm(mean), atol=1e-5)
    refused = await stub.Embed(pb.EmbedRequest(texts=[LONG], truncate=True))
    assert refused.embeddings[0].truncated


async def test_classify_chunk_labels_every_token(stub: Stub) -> None:
    reply = await stub.Classify(pb.ClassifyRequest(texts=[LONG], long_input=pb.LONG_INPUT_CHUNK))
    tokens = reply.results[0].tokens
    assert not reply.results[0].truncated
    assert tokens[-1].end == len(LONG.rstrip())
    assert all(LONG[t.start : t.end] == t.token for t in tokens)
    cut = await stub.Classify(pb.ClassifyRequest(texts=[LONG]))
    assert cut.results[0].truncated
    assert len(cut.results[0].tokens) < len(tokens)
