"""The translation task against transformers' generate(), through the decoding engine and ONNX Runtime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from gateway.backends.onnxruntime import OrtSettings
from gateway.batcher import BatcherSettings
from gateway.errors import InvalidInput
from gateway.runtime import load_model
from gateway.samples import probe_sentences
from gateway.tasks.translation import (
    DecodingOptions,
    SamplingOptions,
    TranslateInput,
    Translation,
    TranslationModel,
)

ENGLISH = [s.text for s in probe_sentences(per_language=2) if s.lang == "eng_Latn"]
GERMAN = [s.text for s in probe_sentences(per_language=2) if s.lang == "deu_Latn"]


@pytest.fixture(scope="module")
async def translator(varied_nllb: tuple[Path, Path]) -> AsyncIterator[TranslationModel]:
    settings = BatcherSettings(max_queue_delay_ms=2)
    model = TranslationModel(load_model("nllb", varied_nllb[1], OrtSettings(), variant="fp32"), settings)
    await model.start()
    yield model
    await model.close()


def _generate(
    checkpoint: Path, source: str, texts: list[str], target: str, new_tokens: int, **kwargs: object
) -> list[list[int]]:
    """generate() with the forced target-language token, then at most `new_tokens` more; the prefix and the
    closing </s> (or padding) removed."""
    tok = AutoTokenizer.from_pretrained(checkpoint, src_lang=source)
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint, use_safetensors=True).eval()
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch,
            forced_bos_token_id=tok.convert_tokens_to_ids(target),
            max_new_tokens=new_tokens + 1,
            **kwargs,
        )
    rows = []
    for row in out.tolist():
        body = row[2:]
        while body and body[-1] in (tok.pad_token_id, tok.eos_token_id):
            body = body[:-1]
        rows.append(body)
    return rows


@pytest.mark.parametrize(
    ("beams", "num_return", "length_penalty", "early_stopping"),
    [(1, 1, 1.0, False), (4, 1, 1.0, False), (4, 2, 0.6, True), (4, 3, 1.4, False), (2, 2, 1.0, True)],
)
async def test_matches_generate(
    translator: TranslationModel,
    varied_nllb: tuple[Path, Path],
    beams: int,
    num_return: int,
    length_penalty: float,
    early_stopping: bool,
) -> None:
    outputs = []
    for source, texts in (("eng_Latn", ENGLISH), ("deu_Latn", GERMAN)):
        for target, new_tokens in (("fra_Latn", 10), ("jpn_Jpan", 23)):
            options = DecodingOptions(
                beam_size=beams, max_new_tokens=new_tokens, num_return=num_return,
                length_penalty=length_penalty, early_stopping=early_stopping,
            )  # fmt: skip
            reply = await translator.translate(TranslateInput(texts, source, target, options))
            got = [h.token_ids for t in reply.translations for h in t.hypotheses]
            extra = {"num_beams": beams, "num_return_sequences": num_return, "do_sample": False}
            if beams > 1:
                extra |= {"length_penalty": length_penalty, "early_stopping": early_stopping}
            assert got == _generate(varied_nllb[0], source, texts, target, new_tokens, **extra)
            outputs.extend(map(tuple, got))
            assert all(len(h.token_ids) <= new_tokens for t in reply.translations for h in t.hypotheses)
    assert len(set(outputs)) >= len(outputs) // 2, "outputs barely differ: the comparison could not fail"


async def test_targets_batch_together_and_replies_equal_solo_ones(translator: TranslationModel) -> None:
    requests = [
        TranslateInput([text], "eng_Latn", target, DecodingOptions(max_new_tokens=8))
        for text in ENGLISH
        for target in ("fra_Latn", "deu_Latn", "zho_Hans")
    ]
    together = await asyncio.gather(*(translator.translate(r) for r in requests))
    for request, reply in zip(requests, together, strict=True):
        alone = await translator.translate(request)
        _same(reply.translations, alone.translations)


def _same(got: list[Translation], want: list[Translation]) -> None:
    """The same tokens; scores equal up to rounding (rows padded to other widths sum in another order)."""
    assert [[h.token_ids for h in t.hypotheses] for t in got] == [
        [h.token_ids for h in t.hypotheses] for t in want
    ]
    for g, w in zip(got, want, strict=True):
        assert [h.score for h in g.hypotheses] == pytest.approx([h.score for h in w.hypotheses], rel=1e-5)
        for gh, wh in zip(g.hypotheses, w.hypotheses, strict=True):
            assert gh.token_logprobs == pytest.approx(wh.token_logprobs, abs=1e-5)


async def test_sampling_is_seeded(translator: TranslationModel) -> None:
    def request(seed: int) -> TranslateInput:
        sampling = SamplingOptions(temperature=1.3, top_k=40, top_p=0.95, seed=seed)
        return TranslateInput(
            ENGLISH, "en", "fr", DecodingOptions(max_new_tokens=12, sampling=sampling, num_return=3)
        )

    first, again, other = [await translator.translate(request(seed)) for seed in (7, 7, 8)]
    assert first.translations == again.translations
    assert first.translations != other.translations
    hypotheses = first.translations[0].hypotheses
    assert len(hypotheses) == 3
    assert len({tuple(h.token_ids) for h in hypotheses}) > 1


async def test_scores_and_usage(translator: TranslationModel) -> None:
    reply = await translator.translate(
        TranslateInput(ENGLISH[:1], "en", "de", DecodingOptions(max_new_tokens=5, return_scores=True))
    )
    hypothesis = reply.translations[0].hypotheses[0]
    assert len(hypothesis.token_logprobs) == len(hypothesis.token_ids)
    assert all(lp <= 0 for lp in hypothesis.token_logprobs)
    assert reply.source_lang == "eng_Latn"
    assert reply.target_lang == "deu_Latn"
    assert reply.usage.output_tokens == len(hypothesis.token_ids)


async def test_long_sources_are_truncated_and_flagged(translator: TranslationModel) -> None:
    long_text = " ".join(ENGLISH * 60)
    reply = await translator.translate(
        TranslateInput([long_text, ENGLISH[0]], "en", "fr", DecodingOptions(max_new_tokens=3))
    )
    assert [t.truncated for t in reply.translations] == [True, False]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (DecodingOptions(beam_size=17), "beam_size: 17 is outside 1..16"),
        (DecodingOptions(beam_size=2, num_return=3), "num_return: 3 must be between 1 and beam_size"),
        (DecodingOptions(max_new_tokens=100000), "max_new_tokens: 100000 exceeds this model's limit"),
        (DecodingOptions(sampling=SamplingOptions(temperature=0)), "temperature: 0 must be a number > 0"),
        (
            DecodingOptions(sampling=SamplingOptions(temperature=float("nan"))),
            "temperature: nan must be a number > 0",
        ),
        (
            DecodingOptions(sampling=SamplingOptions(temperature=float("inf"))),
            "temperature: inf must be a number > 0",
        ),
        (DecodingOptions(sampling=SamplingOptions(top_p=float("nan"))), "top_p: nan must be in"),
        (DecodingOptions(beam_size=4, length_penalty=float("-inf")), "length_penalty: -inf must be"),
        (DecodingOptions(beam_size=4, length_penalty=-1000), "length_penalty: -1000 must be"),
        (DecodingOptions(beam_size=4, length_penalty=3e38), "length_penalty: 3e[+]38 must be"),
        (DecodingOptions(num_return=20000, sampling=SamplingOptions()), "num_return: 20000 samples"),
        (DecodingOptions(num_return=2**32 - 1, sampling=SamplingOptions()), "is outside 1..16"),
        (DecodingOptions(sampling=SamplingOptions(top_p=1.5)), r"top_p: 1.5 must be in \(0, 1\]"),
        (DecodingOptions(beam_size=2, sampling=SamplingOptions()), "cannot be combined with beam_size"),
    ],
)
async def test_bad_options_name_the_field(
    translator: TranslationModel, options: DecodingOptions, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        await translator.translate(TranslateInput(["Hello"], "en", "fr", options))


async def test_bad_languages(translator: TranslationModel) -> None:
    with pytest.raises(InvalidInput, match="source_lang: unknown language code 'xx'"):
        await translator.translate(TranslateInput(["Hello"], "xx", "fr"))
    with pytest.raises(InvalidInput, match="did you mean fra_Latn"):
        await translator.translate(TranslateInput(["Hello"], "en", "fra_Latm"))


async def test_the_engine_runs_its_parts_before_it_takes_work(varied_nllb: tuple[Path, Path]) -> None:
    from gateway.decoding.engine import StepStats
    from gateway.tasks.base import WARM_UP_BATCHES
    from gateway.tasks.translation import WARM_UP_TOKENS

    loaded = load_model("nllb", varied_nllb[1], OrtSettings(), variant="fp32")
    rows: dict[str, list[int]] = {"encoder": [], "decoder_step": []}
    for name, seen in rows.items():
        part = loaded.parts[name]
        original = part.run_sync

        def counted(
            inputs: dict[str, Any], outputs: Any = None, run: Any = original, seen: Any = seen
        ) -> Any:
            seen.append(len(next(iter(inputs.values()))))
            return run(inputs, outputs)

        part.run_sync = counted  # type: ignore[method-assign]
    steps: list[StepStats] = []
    model = TranslationModel(loaded, BatcherSettings(), engine_observer=steps.append)
    assert model.engine is not None
    assert not rows["encoder"]
    await model.start()
    try:
        assert rows["encoder"] == list(WARM_UP_BATCHES), "one text, then a batch, before the first request"
        assert len(rows["decoder_step"]) >= len(WARM_UP_BATCHES), "each warm-up run takes decoder steps"
        # a step for the forced target-language token, then at most WARM_UP_TOKENS
        assert len(rows["decoder_step"]) <= len(WARM_UP_BATCHES) * (1 + WARM_UP_TOKENS)
        assert not steps, "warm-up steps are not requests: the metrics do not see them"
        assert model.engine._thread is not None, "it takes work after the warm-up"
        reply = await model.translate(TranslateInput(ENGLISH[:1], "eng_Latn", "deu_Latn"))
        assert reply.translations[0].hypotheses, "and then it serves"
        assert steps, "requests' steps reach the observer"
    finally:
        await model.close()


async def test_the_cache_on_the_device_translates_as_the_one_in_host_memory(
    translator: TranslationModel, varied_nllb: tuple[Path, Path]
) -> None:
    """`kv_cache: ortvalue` (here on the CPU's ONNX Runtime values): warm-up builds its graphs, and
    concurrent requests of every decoding mode get what the numpy cache gives them."""
    from gateway.decoding.resident import GRAPHS, ResidentBatch

    loaded = load_model("nllb", varied_nllb[1], OrtSettings(), variant="fp32")
    model = TranslationModel(loaded, BatcherSettings(max_queue_delay_ms=2), kv_cache="ortvalue")
    assert model.engine is not None
    batch = model.engine.batch
    assert isinstance(batch, ResidentBatch)
    await model.start()
    try:
        assert set(batch.ops._sessions) == set(GRAPHS), "warm-up built every cache graph"
        sampling = SamplingOptions(temperature=0.9, top_k=30, seed=3)
        modes = [
            DecodingOptions(max_new_tokens=9),
            DecodingOptions(beam_size=3, num_return=2, max_new_tokens=7),
            DecodingOptions(num_return=2, max_new_tokens=11, sampling=sampling),
        ]
        requests = [
            TranslateInput([text], "eng_Latn", target, mode)
            for text in ENGLISH
            for target, mode in zip(("fra_Latn", "deu_Latn", "zho_Hans"), modes, strict=True)
        ]
        resident = await asyncio.gather(*(model.translate(r) for r in requests))
        host = await asyncio.gather(*(translator.translate(r) for r in requests))
        for got, want in zip(resident, host, strict=True):
            _same(got.translations, want.translations)
    finally:
        await model.close()
