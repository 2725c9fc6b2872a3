"""DetectLanguage and Translate with source_lang "auto", over gRPC on the demo server (the identifier has
real weights; the translator is the demo's)."""

from __future__ import annotations

import grpc
import pytest

from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc

Stub = polyglot_pb2_grpc.PolyglotStub
FRENCH, GERMAN = "Le train part de la gare à huit heures.", "Der Zug fährt um acht Uhr vom Bahnhof ab."
BRETON = "Demat, penaos emañ an traoù ganeoc'h hiziv? Me a zo o tont eus Brest."  # no FLORES-200 code


async def test_detect_language(stub: Stub) -> None:
    reply = await stub.DetectLanguage(pb.DetectLanguageRequest(texts=[FRENCH, "", BRETON], top_k=2))
    assert reply.model == "fasttext-lid.176"
    french, empty, breton = reply.results
    assert (french.best.language, french.best.iso_code) == ("fra_Latn", "fr")
    assert french.best.probability > 0.5
    assert len(french.candidates) == 2
    assert french.candidates[0] == french.best
    assert not empty.HasField("best")
    assert list(empty.candidates) == []
    assert (breton.best.language, breton.best.iso_code) == ("", "br")  # no FLORES-200 code: reported by ISO
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.DetectLanguage(pb.DetectLanguageRequest(texts=["x"], top_k=11))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k: 11 is outside 1..10" in (refused.value.details() or "")


async def test_translate_auto_detects_each_text(stub: Stub) -> None:
    options = pb.TranslateOptions(max_new_tokens=4)
    auto = await stub.Translate(
        pb.TranslateRequest(
            texts=[FRENCH, "", GERMAN], source_lang="auto", target_lang="eng_Latn", options=options
        )
    )
    assert auto.source_lang == "auto"
    assert [t.source_lang for t in auto.translations] == ["fra_Latn", "", "deu_Latn"]
    assert auto.translations[0].source_lang_probability > 0.5
    assert auto.translations[1].source_lang_probability == 0
    for index, lang in ((0, "fra_Latn"), (2, "deu_Latn")):
        given = await stub.Translate(
            pb.TranslateRequest(
                texts=[auto_text(index)], source_lang=lang, target_lang="eng_Latn", options=options
            )
        )
        assert given.translations[0].source_lang == lang
        assert given.translations[0].source_lang_probability == 1
        assert list(given.translations[0].hypotheses[0].token_ids) == list(
            auto.translations[index].hypotheses[0].token_ids
        )
    empty_source = await stub.Translate(
        pb.TranslateRequest(texts=[GERMAN], source_lang="", target_lang="eng_Latn", options=options)
    )
    assert empty_source.translations[0].source_lang == "deu_Latn"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Translate(
            pb.TranslateRequest(texts=[FRENCH, BRETON], source_lang="auto", target_lang="eng_Latn")
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1]: its language was detected as br" in (refused.value.details() or "")


def auto_text(index: int) -> str:
    return [FRENCH, "", GERMAN][index]
