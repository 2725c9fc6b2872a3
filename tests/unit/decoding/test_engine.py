"""The decoding engine, stepped by hand in the test's thread: a request that joins while others decode, or
whose neighbours finish or leave around it, gets exactly what it gets alone (and what generate() gives);
cancelled and expired rows leave at the next step; budgets and static scheduling hold."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.decoding.batch import StepParts
from gateway.decoding.engine import Engine, EngineSettings, StepStats
from gateway.decoding.search import Decoded, DecodingOptions, GenerationItem, SamplingOptions
from gateway.errors import DeadlineExceeded
from gateway.manifest import Manifest
from gateway.samples import probe_sentences

ENGLISH = [s.text for s in probe_sentences(per_language=4) if s.lang == "eng_Latn"]
GERMAN = [s.text for s in probe_sentences(per_language=4) if s.lang == "deu_Latn"]
MODES = {
    "greedy": DecodingOptions(),
    "beam": DecodingOptions(beam_size=4, num_return=2, length_penalty=0.6),
    "beam-early": DecodingOptions(beam_size=3, early_stopping=True),
    "sampling": DecodingOptions(num_return=2, sampling=SamplingOptions(temperature=0.9, top_k=50, seed=5)),
}


class Setup:
    def __init__(self, checkpoint: Path, export: Path) -> None:
        self.checkpoint = checkpoint
        manifest = Manifest.read(export)
        executor = ThreadPoolExecutor(1)
        self.parts = StepParts.of(
            {
                n: OnnxRuntimeBackend(export / p.file, OrtSettings(), executor)
                for n, p in manifest.variants["fp32"].parts.items()
            }
        )
        assert manifest.translation is not None
        self.info = manifest.translation
        self.eos = manifest.special_tokens.eos_id or 2
        self.pad = manifest.special_tokens.pad_id
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def engine(self, **settings: object) -> tuple[Engine, list[StepStats]]:
        """An engine, and the stats of its steps."""
        stats: list[StepStats] = []
        config = EngineSettings(**settings)  # type: ignore[arg-type]
        return Engine("test", self.parts, self.eos, self.pad, config, stats.append), stats

    def item(
        self,
        text: str,
        target: str,
        options: DecodingOptions,
        limit: int = 12,
        source: str = "eng_Latn",
        index: int = 0,
    ) -> GenerationItem:
        self.tokenizer.src_lang = source
        ids = self.tokenizer(text)["input_ids"]
        prefix = (self.info.decoder_start_token_id, self.info.language_token_ids[target])
        return GenerationItem(ids, prefix, limit, options, index)

    def alone(self, item: GenerationItem) -> Decoded:
        engine, _ = self.engine()
        future = engine.submit([item])
        engine.run_all()
        return future.result().decoded[0]


@pytest.fixture(scope="module")
def setup(varied_nllb: tuple[Path, Path]) -> Setup:
    return Setup(*varied_nllb)


def _same(got: Decoded, want: Decoded) -> None:
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def _steps(engine: Engine, count: int) -> None:
    for _ in range(count):
        assert engine._iteration()


KV_CACHES = ["numpy", "ortvalue"]  # host arrays, and values on the session's device (the CPU here)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("mode", list(MODES))
def test_a_request_that_joins_mid_flight_gets_what_it_gets_alone(
    setup: Setup, mode: str, kv_cache: str
) -> None:
    """Four texts of different lengths, targets and modes decode; a fifth joins at step 4; rows finish at
    different steps around it."""
    options = MODES[mode]
    others = [
        setup.item(ENGLISH[0], "fra_Latn", DecodingOptions(), limit=12),
        setup.item(ENGLISH[1][:20], "deu_Latn", MODES["beam"], limit=5),
        setup.item(GERMAN[0], "zho_Hans", MODES["sampling"], limit=9, source="deu_Latn"),
        setup.item(ENGLISH[2], "spa_Latn", DecodingOptions(beam_size=2), limit=12),
    ]
    late = setup.item(GERMAN[1], "eng_Latn", options, limit=10, source="deu_Latn")
    engine, stats = setup.engine(kv_cache=kv_cache)
    first = [engine.submit([item]) for item in others]
    _steps(engine, 4)
    assert engine.rows_in_flight == 1 + 4 + 2 + 2
    joined = engine.submit([late])
    engine.run_all()
    _same(joined.result().decoded[0], setup.alone(late))
    for future, item in zip(first, others, strict=True):
        _same(future.result().decoded[0], setup.alone(item))
    assert max(s.rows for s in stats) >= 9 + late.options.rows - 2  # it shared steps with others


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("mode", ["greedy", "beam", "beam-early"])
def test_the_engine_matches_generate(setup: Setup, mode: str, kv_cache: str) -> None:
    options = MODES[mode]
    texts = ENGLISH[:3]
    items = [setup.item(t, "fra_Latn", options, limit=10, index=i) for i, t in enumerate(texts)]
    engine, _ = setup.engine(kv_cache=kv_cache)
    future = engine.submit(items)
    engine.run_all()
    model = AutoModelForSeq2SeqLM.from_pretrained(setup.checkpoint, use_safetensors=True).eval()
    for item, got in zip(items, future.result().decoded, strict=True):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([item.source]),
                decoder_input_ids=torch.tensor([list(item.prefix)]),
                max_new_tokens=10,
                do_sample=False,
                num_beams=options.beam_size,
                num_return_sequences=options.num_return,
                length_penalty=options.length_penalty,
                early_stopping=options.early_stopping,
            )
        want = [[t for t in row[2:].tolist() if t not in (setup.eos, setup.pad)] for row in out]
        assert got.tokens == want


@pytest.mark.parametrize("kv_cache", KV_CACHES)
def test_a_cancelled_request_leaves_at_the_next_step(setup: Setup, kv_cache: str) -> None:
    items = [setup.item(t, "fra_Latn", MODES["beam"], limit=12) for t in ENGLISH[:3]]
    engine, _ = setup.engine(kv_cache=kv_cache)
    futures = [engine.submit([item]) for item in items]
    _steps(engine, 3)
    assert engine.rows_in_flight == 12
    futures[1].cancel()
    _steps(engine, 1)
    assert engine.rows_in_flight == 8, "the cancelled request's beams are still decoding"
    engine.run_all()
    for i in (0, 2):
        _same(futures[i].result().decoded[0], setup.alone(items[i]))


def test_a_request_past_its_deadline_leaves_and_fails(setup: Setup) -> None:
    engine, _ = setup.engine()
    kept = engine.submit([setup.item(ENGLISH[0], "fra_Latn", DecodingOptions(), limit=12)])
    late = engine.submit(
        [setup.item(ENGLISH[1], "fra_Latn", DecodingOptions(), limit=12)], deadline=time.monotonic() + 3600
    )
    _steps(engine, 2)
    assert engine.rows_in_flight == 2
    engine._texts[1].request.deadline = time.monotonic() - 1  # its deadline has passed
    _steps(engine, 1)
    assert engine.rows_in_flight == 1
    with pytest.raises(DeadlineExceeded):
        late.result()
    engine.run_all()
    assert kept.result().decoded[0].tokens


def test_budgets_bound_the_rows_of_every_step(setup: Setup) -> None:
    assert len(ENGLISH) >= 4
    items = [setup.item(t, "fra_Latn", DecodingOptions(beam_size=2), limit=6) for t in ENGLISH[:4]]
    engine, stats = setup.engine(max_batch_size=4)
    futures = [engine.submit([item]) for item in items]
    engine.run_all()
    assert max(s.rows for s in stats) == 4
    assert sum(s.admitted for s in stats) == 4
    for future, item in zip(futures, items, strict=True):
        _same(future.result().decoded[0], setup.alone(item))


def test_a_text_over_the_budget_decodes_alone(setup: Setup) -> None:
    engine, stats = setup.engine(max_batch_size=2)
    small = engine.submit([setup.item(ENGLISH[0], "fra_Latn", DecodingOptions(), limit=6)])
    big = engine.submit([setup.item(ENGLISH[1], "fra_Latn", DecodingOptions(beam_size=4), limit=6)])
    engine.run_all()
    assert big.result().decoded[0].tokens
    assert small.result().decoded[0].tokens
    assert max(s.rows for s in stats) == 4  # the four beams, on their own


def test_static_scheduling_admits_only_into_an_empty_batch(setup: Setup) -> None:
    items = [setup.item(t, "fra_Latn", DecodingOptions(), limit=8) for t in ENGLISH[:3]]
    engine, stats = setup.engine(scheduling="static")
    first = engine.submit(items[:2])
    _steps(engine, 2)
    later = engine.submit(items[2:])
    engine.run_all()
    joined_steps = [i for i, s in enumerate(stats) if s.admitted]
    assert len(joined_steps) == 2
    assert all(s.rows <= 2 for s in stats)
    for got, item in zip([*first.result().decoded, *later.result().decoded], items, strict=True):
        _same(got, setup.alone(item))


def test_tokens_stream_as_they_are_chosen(setup: Setup) -> None:
    item = setup.item(ENGLISH[0], "fra_Latn", MODES["sampling"], limit=8)
    streamed: list[tuple[int, int, int]] = []
    engine, _ = setup.engine()
    future = engine.submit([item], sink=lambda text, row, token: streamed.append((text, row, token)))
    engine.run_all()
    decoded = future.result().decoded[0]
    for copy, tokens in enumerate(decoded.tokens):
        assert [t for _, row, t in streamed if row == copy] == tokens
    assert {text for text, _, _ in streamed} == {0}


def test_the_engine_thread_serves_and_stops(setup: Setup) -> None:
    engine, _ = setup.engine()
    engine.start()
    try:
        futures = [
            engine.submit([setup.item(t, "fra_Latn", DecodingOptions(), limit=6)]) for t in ENGLISH[:3]
        ]
        results = [f.result(timeout=60).decoded[0] for f in futures]
    finally:
        engine.close()
    assert all(r.tokens for r in results)
    with pytest.raises(Exception, match="shutting down"):
        engine.submit([setup.item(ENGLISH[0], "fra_Latn", DecodingOptions())])
