"""The fp32 export gate of translation on a checkpoint whose greedy outputs end early (as real NLLB outputs
do): it passes when the export is exact, and still fails when the decoder is broken."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoTokenizer, GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

from gateway.export import accuracy
from gateway.export.demo import _NLLB_SIZES, nllb_fast, shipped_tokenizer
from gateway.export.exporter import ExportOptions, export_model
from gateway.languages import flores200_codes
from gateway.manifest import Manifest

pytestmark = pytest.mark.slow


def _probe(model: M2M100ForConditionalGeneration, tokenizer: object) -> np.ndarray:
    languages = [c for c in flores200_codes() if c in tokenizer.get_vocab()]
    inputs, start = accuracy.translation_inputs(tokenizer, accuracy.translation_probe_pairs(languages), 512)
    with torch.no_grad():
        out = model.generate(
            **{k: torch.from_numpy(v) for k, v in inputs.items()},
            decoder_input_ids=torch.from_numpy(start),
            max_new_tokens=accuracy.TRANSLATION_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
        )
    return np.asarray(out.numpy()[:, start.shape[1] :])


@pytest.fixture(scope="module")
def early_ending(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny M2M100 with an untied output projection whose `</s>` row is 1.01 times the row of the token
    greedy decoding emits most: every probe then ends where it would have emitted that token (within 32)."""
    tokenizer = nllb_fast(shipped_tokenizer("nllb"))
    eos = tokenizer.eos_token_id
    config = M2M100Config(
        vocab_size=len(tokenizer),
        **_NLLB_SIZES["tiny"],
        max_position_embeddings=1024,
        scale_embedding=True,
        activation_function="relu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        decoder_start_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(config).eval()
    before = _probe(model, tokenizer)
    common = collections.Counter(before[:, 1:].ravel().tolist()).most_common(1)[0][0]
    with torch.no_grad():
        model.lm_head.weight[eos] = model.lm_head.weight[common] * 1.01
        # Untied, the encoder's and decoder's embeddings are saved under their own names (saving a tensor
        # shared by several modules keeps one name only, and loading would draw the others at random).
        for part in (model.model.encoder, model.model.decoder):
            part.embed_tokens.weight = torch.nn.Parameter(model.model.shared.weight.clone())
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=eos,
        max_length=200,
    )
    directory = tmp_path_factory.mktemp("early-ending") / "m2m100"
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def test_an_exact_export_of_early_ending_outputs_passes_the_gate(early_ending: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(early_ending)
    model = M2M100ForConditionalGeneration.from_pretrained(early_ending).eval()
    probes = _probe(model, tokenizer)
    ends = [list(row).index(tokenizer.eos_token_id) for row in probes if tokenizer.eos_token_id in row]
    assert len(ends) == len(probes), "every probe output should end within 32 tokens"
    assert max(ends) < accuracy.TRANSLATION_NEW_TOKENS - 1
    # no demo marker: a real checkpoint, so the bounds are enforced
    manifest: Manifest = export_model(
        early_ending, tmp_path / "out", ExportOptions(task="translation", variants=("fp32",))
    )
    report = manifest.variants["fp32"].accuracy
    assert report is not None
    assert report.passed
    assert report.bounds == {"token_agreement": 0.95}
    assert report.metrics["token_agreement"] == 1.0
    assert report.metrics["compared_tokens"] == sum(e + 1 for e in ends)  # up to and including </s>
    assert report.metrics["max_logprob_error"] < 1e-4


def test_a_broken_decoder_still_fails_the_gate(early_ending: Path, tmp_path: Path) -> None:
    manifest = export_model(
        early_ending, tmp_path / "out", ExportOptions(task="translation", variants=("fp32",))
    )
    parts = {name: tmp_path / "out" / spec.file for name, spec in manifest.variants["fp32"].parts.items()}
    broken = tmp_path / "broken_decoder_step.onnx"
    graph = onnx.load(parts["decoder_step"])
    for initializer in graph.graph.initializer:  # every weight of the decoder step halved
        values = numpy_helper.to_array(initializer)
        if values.dtype == np.float32 and values.size > 1:
            initializer.CopyFrom(numpy_helper.from_array(values * 0.5, initializer.name))
    onnx.save(graph, broken)
    tokenizer = AutoTokenizer.from_pretrained(early_ending)
    reference = M2M100ForConditionalGeneration.from_pretrained(early_ending).eval()
    languages = [c for c in flores200_codes() if c in tokenizer.get_vocab()]
    report = accuracy.translation_report(
        reference,
        parts | {"decoder_step": broken},
        tokenizer,
        languages,
        accuracy.Bounds(),
        "CPUExecutionProvider",
        512,
    )
    assert not report.passed
    assert report.metrics["token_agreement"] < 0.95
