"""Accuracy of an exported variant against the PyTorch fp32 model on a fixed multilingual probe set.

- token classification: label agreement over real tokens and the max absolute logit error;
- embedding: min / mean cosine of the pooled, normalized vectors (mean and CLS pooling);
- fill-mask: top-1 agreement and the max error of the top-k probabilities;
- translation: greedy token agreement over up to 32 new tokens (each probe up to and including the
  reference's end token: past it `generate()` pads and our loop repeats `</s>`), and the max difference of
  the teacher-forced log-probabilities, stepping the decoder with its key/value cache as the server does.
  Random-weight models with tied embeddings repeat the forced language token under greedy decoding, so
  agreement alone says nothing there; the log-probability difference does.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedTokenizerFast

from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.decoding.batch import Batch, StepParts
from gateway.decoding.engine import Engine, EngineSettings
from gateway.decoding.search import DecodingOptions, GenerationItem
from gateway.export.onnx import EMBEDDING_OUTPUTS
from gateway.manifest import AccuracyReport
from gateway.runtime import part_settings
from gateway.samples import probe_sentences

TRANSLATION_NEW_TOKENS = 32
PROBE_SET = "gateway/data/sample_text.tsv: first 2 sentences of each of its languages"


@dataclass(frozen=True)
class Bounds:
    """Minimums a variant must reach on a real checkpoint (demo checkpoints record figures only)."""

    min_cosine: float = 0.99
    min_agreement: float = 0.95


def probe_texts() -> list[str]:
    return [s.text for s in probe_sentences(per_language=2)]


def session(path: Path, provider: str = "CPUExecutionProvider", threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=[provider])


def _feed(sess: ort.InferenceSession, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The subset of `values` the session takes, by the session's own input names."""
    return {i.name: values[i.name] for i in sess.get_inputs()}


def encode_batch(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], max_length: int
) -> dict[str, np.ndarray]:
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64),
    }


def _torch(values: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in values.items()}


def _report(
    metrics: dict[str, float], bounds: dict[str, float], provider: str, note: str = ""
) -> AccuracyReport:
    failed = [
        name
        for name, bound in bounds.items()
        if not (metrics[name] <= bound if name.startswith("max_") else metrics[name] >= bound)
    ]
    return AccuracyReport(
        probe_set=PROBE_SET,
        provider=provider,
        metrics={k: float(v) for k, v in metrics.items()},
        bounds=bounds,
        passed=not failed,
        note=note,
    )


# ---------------------------------------------------------------------------------------------- encoders


def token_classification_report(
    reference: torch.nn.Module,
    onnx_path: Path,
    tokenizer: PreTrainedTokenizerFast,
    threshold: float | None,
    bounds: Bounds | None,
    provider: str,
    max_length: int,
) -> AccuracyReport:
    inputs = encode_batch(tokenizer, probe_texts(), max_length)
    with torch.no_grad():
        expected = reference(**_torch(inputs)).numpy()
    sess = session(onnx_path, provider)
    got = sess.run(["logits"], _feed(sess, inputs))[0]
    real = inputs["attention_mask"].astype(bool)
    if expected.shape[-1] == 1:  # one label (SaT): positive when the sigmoid exceeds the threshold
        cut = float(np.log(threshold / (1 - threshold))) if threshold else 0.0
        agree = (expected[..., 0] > cut) == (got[..., 0] > cut)
    else:
        agree = expected.argmax(-1) == got.argmax(-1)
    metrics = {
        "label_agreement": float(agree[real].mean()),
        "max_logit_error": float(np.abs(expected - got)[real].max()),
    }
    return _report(metrics, {"label_agreement": bounds.min_agreement} if bounds else {}, provider)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.asarray((a * b).sum(-1))


def embedding_report(
    reference: torch.nn.Module,
    onnx_path: Path,
    tokenizer: PreTrainedTokenizerFast,
    bounds: Bounds | None,
    provider: str,
    max_length: int,
) -> AccuracyReport:
    """reference: an EmbeddingGraph around the PyTorch encoder (same outputs as the ONNX graph)."""
    inputs = encode_batch(tokenizer, probe_texts(), max_length)
    with torch.no_grad():
        expected = [t.numpy() for t in reference(**_torch(inputs))]
    sess = session(onnx_path, provider)
    got = sess.run(list(EMBEDDING_OUTPUTS.values()), _feed(sess, inputs))
    mean_cos = _cosine(expected[2], got[2])
    cls_cos = _cosine(expected[3], got[3])
    metrics = {
        "min_cosine": float(min(mean_cos.min(), cls_cos.min())),
        "mean_cosine": float(mean_cos.mean()),
        "mean_cosine_cls": float(cls_cos.mean()),
        "max_abs_error": float(max(np.abs(e - g).max() for e, g in zip(expected, got, strict=True))),
    }
    return _report(metrics, {"min_cosine": bounds.min_cosine} if bounds else {}, provider)


def mask_probe_inputs(
    tokenizer: PreTrainedTokenizerFast, max_length: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Probe texts with their middle real token replaced by the mask token, and the mask positions."""
    inputs = encode_batch(tokenizer, probe_texts(), max_length)
    lengths = inputs["attention_mask"].sum(1)
    positions = np.maximum(1, (lengths - 1) // 2).astype(np.int64)[:, None]
    inputs["input_ids"][np.arange(len(positions)), positions[:, 0]] = tokenizer.mask_token_id
    return inputs, positions


def fill_mask_report(
    reference: Any,
    onnx_path: Path,
    tokenizer: PreTrainedTokenizerFast,
    bounds: Bounds | None,
    provider: str,
    max_length: int,
) -> AccuracyReport:
    inputs, positions = mask_probe_inputs(tokenizer, max_length)
    with torch.no_grad():
        logits = reference(**_torch(inputs)).logits
    rows = np.arange(len(positions))
    probs = torch.softmax(logits, dim=-1).numpy()[rows, positions[:, 0]]  # [batch, vocab]
    sess = session(onnx_path, provider)
    top_p, top_ids = sess.run(None, _feed(sess, inputs | {"positions": positions}))
    top_p, top_ids = top_p[:, 0], top_ids[:, 0]  # [batch, k]
    metrics = {
        "top1_agreement": float((probs.argmax(-1) == top_ids[:, 0]).mean()),
        "max_probability_error": float(np.abs(np.take_along_axis(probs, top_ids, -1) - top_p).max()),
    }
    return _report(metrics, {"top1_agreement": bounds.min_agreement} if bounds else {}, provider)


# ------------------------------------------------------------------------------------------- translation


def translation_engine(parts: dict[str, Path], provider: str, eos: int, pad: int) -> Engine:
    """The served decoding engine over exported translation parts, run in this thread (`run_all`)."""
    device: Literal["cpu", "cuda"] = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    executor = ThreadPoolExecutor(max_workers=1)
    backends = {
        name: OnnxRuntimeBackend(path, part_settings(OrtSettings(device=device), name), executor)
        for name, path in parts.items()
    }
    settings = EngineSettings(max_batch_size=512, max_batch_tokens=1 << 24)
    return Engine("accuracy", StepParts.of(backends), eos, pad, settings)


def engine_greedy(
    engine: Engine,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    start: np.ndarray,
    new_tokens: int,
    eos: int,
) -> np.ndarray:
    """Greedy decoding after the forced `start` tokens [batch, 2], as the server decodes: [batch, 2 + n]
    with rows that ended padded with `eos`."""
    items = [
        GenerationItem(
            ids[mask.astype(bool)].tolist(), (int(s[0]), int(s[1])), new_tokens, DecodingOptions(), i
        )
        for i, (ids, mask, s) in enumerate(zip(input_ids, attention_mask, start, strict=True))
    ]
    future = engine.submit(items)
    engine.run_all()
    rows = [d.tokens[0] for d in future.result().decoded]
    width = max(len(r) for r in rows) + 1
    out = np.full((len(rows), start.shape[1] + width), eos, dtype=np.int64)
    out[:, : start.shape[1]] = start
    for i, row in enumerate(rows):
        out[i, start.shape[1] : start.shape[1] + len(row)] = row
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return np.asarray(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))


def teacher_forced_logprobs(
    parts: StepParts, pad: int, input_ids: np.ndarray, attention_mask: np.ndarray, decoder_ids: np.ndarray
) -> np.ndarray:
    """Log-probabilities [batch, steps, vocab] of the decoder fed `decoder_ids` one token per step through
    its cache, as the engine runs it: position p predicts token p + 1."""
    batch = Batch(parts, pad)
    sources = [ids[mask.astype(bool)].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
    cross_kv, source_mask = batch.encode(sources)
    batch.join(cross_kv, source_mask, [1] * len(sources))
    steps = [
        batch.step(decoder_ids[:, p], np.full(len(sources), p, dtype=np.int64))
        for p in range(decoder_ids.shape[1])
    ]
    return np.stack(steps, axis=1)


def translation_probe_pairs(languages: Sequence[str]) -> list[tuple[str, str, str]]:
    """(text, source, target) probes: every probe sentence into French, French ones into English."""
    known = set(languages)
    pairs = []
    for sentence in probe_sentences(per_language=2):
        if sentence.lang not in known:
            continue
        target = "eng_Latn" if sentence.lang == "fra_Latn" else "fra_Latn"
        pairs.append((sentence.text, sentence.lang, target))
    return pairs


def translation_inputs(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str, str]], max_length: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Encoder inputs (`[src_lang] text </s>`, padded) and the decoder start ids `[</s>, tgt_lang]`."""
    rows = []
    for text, source, _ in pairs:
        tokenizer.src_lang = source
        rows.append(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    start_id = tokenizer.eos_token_id  # NLLB's decoder_start_token_id
    targets = [tokenizer.convert_tokens_to_ids(target) for _, _, target in pairs]
    start = np.array([[start_id, t] for t in targets], dtype=np.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask}, start


def translation_report(
    reference: Any,
    parts: dict[str, Path],
    tokenizer: PreTrainedTokenizerFast,
    languages: Sequence[str],
    bounds: Bounds | None,
    provider: str,
    max_length: int,
) -> AccuracyReport:
    pairs = translation_probe_pairs(languages)
    inputs, start = translation_inputs(tokenizer, pairs, max_length)
    eos = int(tokenizer.eos_token_id)
    with torch.no_grad():
        expected = reference.generate(
            **_torch(inputs),
            decoder_input_ids=torch.from_numpy(start),
            max_new_tokens=TRANSLATION_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
        ).numpy()
        forced_logits = reference(
            **_torch(inputs), decoder_input_ids=torch.from_numpy(expected)
        ).logits.numpy()
    pad = int(tokenizer.pad_token_id)
    engine = translation_engine(parts, provider, eos, pad)
    got = engine_greedy(
        engine, inputs["input_ids"], inputs["attention_mask"], start, TRANSLATION_NEW_TOKENS, eos
    )
    width = max(expected.shape[1], got.shape[1])
    expected_new = _pad(expected, width, eos)[:, start.shape[1] :]
    got_new = _pad(got, width, eos)[:, start.shape[1] :]
    # After a row ends, generate() pads with pad_id and our loop repeats </s>: positions past the reference's
    # end token say nothing about the export, so each row is compared up to and including it.
    compared = _through_end(expected_new, eos)
    logprobs = teacher_forced_logprobs(
        engine.batch.parts, pad, inputs["input_ids"], inputs["attention_mask"], expected
    )
    reference_logprobs = _log_softmax(forced_logits)
    # Position p predicts token p + 1: the forced language token, then each new token up to and including
    # the end (the last position predicts past the reference and is left out).
    new_columns = expected.shape[1] - start.shape[1]
    forced = np.ones((len(compared), start.shape[1] - 1), dtype=bool)
    beyond = np.zeros((len(compared), 1), dtype=bool)
    scored = np.concatenate([forced, compared[:, :new_columns], beyond], axis=1)
    metrics = {
        "token_agreement": float((expected_new == got_new)[compared].mean()),
        "max_logprob_error": float(np.abs(logprobs - reference_logprobs)[scored].max()),
        "new_tokens": float(expected_new.shape[1]),
        "compared_tokens": float(compared.sum()),
    }
    return _report(metrics, {"token_agreement": bounds.min_agreement} if bounds else {}, provider)


def _through_end(tokens: np.ndarray, eos: int) -> np.ndarray:
    """A mask of each row's tokens up to and including its first `eos` (the whole row when it has none)."""
    is_end = tokens == eos
    ended_before = np.cumsum(is_end, axis=1) - is_end  # ends strictly before each position
    return np.asarray(ended_before == 0)


def _pad(sequences: np.ndarray, width: int, value: int) -> np.ndarray:
    return np.pad(sequences, ((0, 0), (0, width - sequences.shape[1])), constant_values=value)
