"""int8 activation quantization of an encoder, three ways side by side: batch dependence, accuracy against
fp32 and speed (a measurement, not a test).

    python -m bench.quantization EXPORT_DIR [EXPORT_DIR ...] --out bench/results/<date>-int8

From each export's fp32 graph (`pgw export`, an encoder task) it builds, in a scratch directory:
- `per-tensor`: ONNX Runtime's dynamic quantization, one activation scale per tensor (over the padded
  batch): what int8 was before the gateway's per-row rewrite;
- `per-row`: the gateway's int8 (`gateway.export.variants.quantize_int8`): a symmetric scale per token;
- `static`: calibrated QDQ (MinMax over sample sentences the evaluation does not use), fixed scales.
All take int8 per-channel weights. For each: the largest difference between a text's outputs alone and
inside 5 batches of other texts (0 means batch-invariant), the error against fp32 on the same texts (min
cosine for embeddings, max absolute probability error and the tokens whose label flips for token
classifiers), and the median time of ONNX Runtime alone at 1x32 and 32x128, the variants timed in
alternating rounds. Writes quantization.json and quantization.md to --out.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.results import measurement_parser, write_measurement
from bench.texts import TextMaker
from gateway.manifest import Manifest
from gateway.samples import probe_sentences, sample_sentences

Arrays = dict[str, np.ndarray]
METHODS = ("fp32", "per-tensor", "per-row", "static")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: ort.InferenceSession, ids: list[list[int]], pad: int) -> Arrays:
    longest = max(map(len, ids))
    input_ids = np.full((len(ids), longest), pad, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, values in enumerate(ids):
        input_ids[row, : len(values)] = values
        mask[row, : len(values)] = 1
    feed = {"input_ids": input_ids, "attention_mask": mask}
    names = {i.name for i in session.get_inputs()}
    if "positions" in names:  # fill-mask: the logits of the second token of each row
        feed["positions"] = np.ones((len(ids), 1), dtype=np.int64)
    return {k: v for k, v in feed.items() if k in names}


def _run(session: ort.InferenceSession, ids: list[list[int]], pad: int) -> list[Arrays]:
    """Per text, its rows of every output (cut to its own length where the output has one per token)."""
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, _feed(session, ids, pad))
    rows = []
    for row, values in enumerate(ids):
        mine = {}
        for name, out in zip(names, outputs, strict=True):
            value = out[row]
            if value.ndim >= 1 and out.shape[1] == max(map(len, ids)) and out.ndim >= 3:
                value = value[: len(values)]
            mine[name] = value.astype(np.float64)
        rows.append(mine)
    return rows


class Calibration:
    """onnxruntime.quantization's CalibrationDataReader over sample sentences, one text per batch."""

    def __init__(self, feeds: list[Arrays]) -> None:
        self._feeds: Iterator[Arrays] = iter(feeds)

    def get_next(self) -> Arrays | None:
        return next(self._feeds, None)


def build(fp32: Path, work: Path, calibration: list[Arrays]) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from gateway.export.variants import quantize_int8

    paths = {"fp32": fp32}
    paths["per-tensor"] = work / "per-tensor.onnx"
    quantize_dynamic(
        str(fp32), str(paths["per-tensor"]), per_channel=True, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True},
    )  # fmt: skip
    paths["per-row"] = work / "per-row.onnx"
    quantize_int8(fp32, paths["per-row"])
    paths["static"] = work / "static.onnx"
    quantize_static(
        str(fp32), str(paths["static"]), Calibration(calibration), quant_format=QuantFormat.QDQ,
        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
        extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": True},
    )  # fmt: skip
    return paths


def _invariance(session: ort.InferenceSession, texts: list[list[int]], pad: int) -> float:
    """The largest difference between a text's outputs alone and in 5 batches of other texts."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for index, ids in enumerate(texts[:6]):
        (alone,) = _run(session, [ids], pad)
        others = [t for i, t in enumerate(texts) if i != index]
        for size in (2, 3, 5, 8, 16):
            batch = [others[i] for i in rng.choice(len(others), size - 1, replace=False)]
            where = int(rng.integers(size))
            batch.insert(where, ids)
            mine = _run(session, batch, pad)[where]
            worst = max(worst, *(float(np.abs(mine[k] - alone[k]).max()) for k in alone))
    return worst


def _accuracy(task: str, reference: list[Arrays], rows: list[Arrays]) -> dict[str, float]:
    if task == "embedding":
        cosines = []
        for ref, got in zip(reference, rows, strict=True):
            a, b = ref["embedding_mean"], got["embedding_mean"]
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        return {"min_cosine": min(cosines), "mean_cosine": statistics.fmean(cosines)}
    name = next(iter(reference[0]))
    worst, flips, tokens = 0.0, 0, 0
    for ref, got in zip(reference, rows, strict=True):
        a, b = ref[name], got[name]
        if task == "token-classification":
            single = a.shape[-1] == 1
            pa = 1 / (1 + np.exp(-a)) if single else _softmax(a)
            pb = 1 / (1 + np.exp(-b)) if single else _softmax(b)
            worst = max(worst, float(np.abs(pa - pb).max()))
            la = (pa[..., 0] > 0.25) if single else pa.argmax(-1)
            lb = (pb[..., 0] > 0.25) if single else pb.argmax(-1)
            flips += int((la != lb).sum())
            tokens += la.size
        else:  # fill-mask: top-k probabilities
            worst = max(worst, float(np.abs(a - b).max()))
    result = {"max_abs_error": worst}
    if task == "token-classification":
        result |= {"label_flips": flips, "tokens": tokens}
    return result


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted: np.ndarray = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)  # type: ignore[no-any-return]


def _speed(
    sessions: dict[str, ort.InferenceSession], shapes: dict[str, list[list[int]]], pad: int, rounds: int
) -> dict[str, dict[str, float]]:
    times: dict[str, dict[str, list[float]]] = {m: {s: [] for s in shapes} for m in sessions}
    for shape, ids in shapes.items():
        feeds = {m: _feed(s, ids, pad) for m, s in sessions.items()}
        for session, feed in zip(sessions.values(), feeds.values(), strict=True):
            session.run(None, feed)  # warm-up
        for turn in range(rounds):
            order = list(sessions) if turn % 2 == 0 else list(reversed(sessions))
            for method in order:
                started = time.perf_counter()
                sessions[method].run(None, feeds[method])
                times[method][shape].append(time.perf_counter() - started)
    return {m: {s: 1000 * statistics.median(t) for s, t in by.items()} for m, by in times.items()}


def measure(export: Path, rounds: int) -> dict[str, Any]:
    manifest = Manifest.read(export)
    maker = TextMaker(export / "tokenizer.json")
    tokenizer = maker.tokenizer
    pad = manifest.special_tokens.pad_id
    evaluate = [tokenizer.encode(s.text).ids[:510] for s in probe_sentences()]
    probes = {s.text for s in probe_sentences()}
    calibrate = [tokenizer.encode(s.text).ids[:510] for s in sample_sentences() if s.text not in probes][:64]
    shapes = {
        "1x32": [tokenizer.encode(maker.text(30).text).ids],
        "32x128": [tokenizer.encode(t.text).ids for t in maker.texts(32, 126)],
    }
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export / manifest.variants["fp32"].parts["model"].file
        probe_session = _session(fp32)
        calibration = [_feed(probe_session, [ids], pad) for ids in calibrate]
        paths = build(fp32, Path(scratch), calibration)
        sessions = {method: _session(path) for method, path in paths.items()}
        reference = _run(sessions["fp32"], evaluate, pad)
        methods: dict[str, Any] = {}
        for method, session in sessions.items():
            rows = [_run(session, [ids], pad)[0] for ids in evaluate]
            methods[method] = {
                "batch_dependence": _invariance(session, evaluate, pad),
                "accuracy": _accuracy(manifest.task, reference, rows),
            }
        speed = _speed(sessions, shapes, pad, rounds)
    for method, by_shape in speed.items():
        methods[method]["ms"] = by_shape
    return {"model": export.name, "task": manifest.task, "texts": len(evaluate), "methods": methods}


def markdown(results: list[dict[str, Any]], rounds: int) -> str:
    lines = [
        "# int8 activation quantization: per tensor, per row, static",
        "",
        f"`python -m bench.quantization`: ONNX Runtime alone, median of {rounds} alternating rounds. "
        "Batch dependence: the largest difference of a text's outputs alone and in 5 batches (0: "
        "batch-invariant). Accuracy against fp32 on the probe sentences, one text at a time.",
        "",
        "| model | method | batch dependence | accuracy vs fp32 | 1x32 ms | 32x128 ms | 1x32 / fp32 | "
        "32x128 / fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        fp32 = result["methods"]["fp32"]["ms"]
        for method, row in result["methods"].items():
            accuracy = ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row["accuracy"].items()
            )
            ms = row["ms"]
            lines.append(
                f"| {result['model']} | {method} | {row['batch_dependence']:.2e} | {accuracy} | "
                f"{ms['1x32']:.2f} | {ms['32x128']:.1f} | {ms['1x32'] / fp32['1x32']:.2f} | "
                f"{ms['32x128'] / fp32['32x128']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = measurement_parser(__doc__, "int8")
    parser.add_argument("exports", type=Path, nargs="+", help="`pgw export` directories of encoders")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    results = [measure(export, args.rounds) for export in args.exports]
    write_measurement(args.out, "quantization", results, markdown(results, args.rounds))


if __name__ == "__main__":
    main()
