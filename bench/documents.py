"""A whole multilingual document through TranslateDocument against the same sentences sent as separate
Translate calls, on one server in one run (a measurement, not a test).

    python -m bench.documents --translation NLLB_EXPORT --segmenter SAT_EXPORT [--variant int8]

The document: Markdown of about `--bytes` bytes (50 kB by default), one section per language of the
shipped sample text in turn (24 languages, 2 to 4 sentences a paragraph), translated with source "auto":
SaT splits it, language identification names each sentence's language, and every sentence is one item
of the translation engine. Then each sentence the document translated is sent alone
(`Translate(texts=[sentence], source_lang=<its detected language>)`) by `--concurrency` callers at once,
as a client that splits and detects for itself would, and the translations are compared with the
document's. Each way runs `--rounds` times, alternating. Reported: time, sentences per second, the
document's time split into parsing, segmentation, detection and translation (the reply's `phases`).

Random-weight SaT checkpoints mark a sentence end after almost every token (their probabilities sit
around 0.5); the bench gives the segmenter the threshold that makes it split the document into as many
sentences as it was built from, so that sentence lengths, and the work per sentence, are those of real
text. A real SaT checkpoint needs none of this (`--keep-threshold`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.gateway import GatewayProcess
from bench.results import measurement_parser, write_measurement
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc
from gateway.samples import sample_languages, sample_sentences

TARGET = "fra_Latn"


def document(size: int) -> tuple[str, int]:
    """Markdown of at least `size` UTF-8 bytes, and the number of sentences it was made of."""
    by_language: dict[str, list[str]] = {lang: [] for lang in sample_languages()}
    for sentence in sample_sentences():
        by_language[sentence.lang].append(sentence.text)
    parts: list[str] = []
    sentences = section = 0
    used = {lang: 0 for lang in by_language}
    while len("\n".join(parts).encode()) < size:
        lang = list(by_language)[section % len(by_language)]
        parts.append(f"## Section {section + 1}\n")
        pool = by_language[lang]
        for paragraph in range(3):
            count = 2 + (section + paragraph) % 3
            taken = [pool[(used[lang] + i) % len(pool)] for i in range(count)]
            used[lang] += count
            parts.append(" ".join(taken) + "\n")
            sentences += count
        section += 1
    return "\n".join(parts), sentences


async def _segment_probabilities(address: str, text: str) -> np.ndarray:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PolyglotStub(channel)
        paragraphs = [p for p in text.split("\n") if p.strip() and not p.startswith("#")]
        found = []
        for first in range(0, len(paragraphs), 64):
            request = pb.SegmentRequest(texts=paragraphs[first : first + 64], return_probabilities=True)
            reply = await stub.Segment(request, timeout=600)
            found += [np.array(r.probabilities, dtype=np.float64) for r in reply.results]
        return np.concatenate(found)


def calibrated_segmenter(
    export: Path, variant: str, work: Path, text: str, sentences: int
) -> tuple[Path, float]:
    """A copy of the SaT export (links to its files) whose default threshold splits `text` into about
    `sentences` sentences."""
    probe = GatewayProcess("sat", export, variant, work / "calibrate")
    probe.start()
    try:
        probabilities = asyncio.run(_segment_probabilities(probe.address, text))
    finally:
        probe.stop()
    paragraphs = sum(1 for p in text.split("\n") if p.strip() and not p.startswith("#"))
    # each paragraph ends a sentence at its end anyway: the threshold places the others
    inner = max(sentences - paragraphs, 1)
    threshold = float(np.quantile(probabilities, 1 - inner / len(probabilities)))
    copy = work / "sat-calibrated"
    copy.mkdir(parents=True, exist_ok=True)
    for entry in export.iterdir():
        if entry.name != "manifest.json" and not (copy / entry.name).exists():
            os.symlink(entry.resolve(), copy / entry.name)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["token_classification"]["default_threshold"] = threshold
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy, threshold


async def _as_document(stub: pb_grpc.PolyglotStub, text: str, options: pb.TranslateOptions) -> Any:
    request = pb.TranslateDocumentRequest(
        document=text, format=pb.DOCUMENT_FORMAT_MARKDOWN, source_lang="auto", target_lang=TARGET,
        model="nllb", options=options,
    )  # fmt: skip
    started = time.perf_counter()
    reply = await stub.TranslateDocument(request, timeout=3600)
    return reply, time.perf_counter() - started


async def _as_sentences(
    stub: pb_grpc.PolyglotStub, sentences: list[Any], options: pb.TranslateOptions, concurrency: int
) -> tuple[list[str], float]:
    translations: list[str] = [""] * len(sentences)
    cursor = iter(range(len(sentences)))

    async def caller() -> None:
        for index in cursor:
            sentence = sentences[index]
            request = pb.TranslateRequest(
                texts=[sentence.text], source_lang=sentence.source_lang, target_lang=TARGET, model="nllb",
                options=options,
            )  # fmt: skip
            reply = await stub.Translate(request, timeout=3600)
            translations[index] = reply.translations[0].hypotheses[0].text

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return translations, time.perf_counter() - started


async def runs(address: str, text: str, args: argparse.Namespace) -> dict[str, Any]:
    options = pb.TranslateOptions(max_new_tokens=args.max_new_tokens)
    rows: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PolyglotStub(channel)
        reply, _ = await _as_document(stub, text, pb.TranslateOptions(max_new_tokens=4))  # warm-up
        for turn in range(args.rounds):
            reply, seconds = await _as_document(stub, text, options)
            translated = [s for s in reply.sentences if not s.kept and not s.attribute]
            phases = reply.phases
            rows.append({
                "mode": "TranslateDocument", "round": turn, "seconds": seconds,
                "sentences": len(reply.sentences), "translated": len(translated),
                "sentences_per_second": len(translated) / seconds,
                "output_tokens": reply.usage.output_tokens,
                "phases_ms": {"parse": phases.parse_ms, "segment": phases.segment_ms,
                              "detect": phases.detect_ms, "translate": phases.translate_ms},
            })  # fmt: skip
            for concurrency in args.concurrency:
                separate, seconds = await _as_sentences(stub, translated, options, concurrency)
                same = sum(a == s.translation for a, s in zip(separate, translated, strict=True))
                rows.append({
                    "mode": f"Translate x{len(translated)}, concurrency {concurrency}", "round": turn,
                    "seconds": seconds, "translated": len(translated),
                    "sentences_per_second": len(translated) / seconds, "same_translation": same,
                })  # fmt: skip
        languages: dict[str, int] = {}
        for sentence in reply.sentences:
            if not sentence.attribute:
                languages[sentence.source_lang or "-"] = languages.get(sentence.source_lang or "-", 0) + 1
    return {"rows": rows, "detected_languages": languages}


def summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for row in report["rows"]:
        by_mode.setdefault(row["mode"], []).append(row)
    document_seconds = statistics.median(r["seconds"] for r in by_mode["TranslateDocument"])
    out = []
    for mode, rows in by_mode.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        entry = {
            "mode": mode, "seconds": seconds,
            "sentences_per_second": statistics.median(r["sentences_per_second"] for r in rows),
            "document_speedup": seconds / document_seconds,
        }  # fmt: skip
        if "phases_ms" in rows[0]:
            total = 1000 * seconds
            entry["share"] = {
                k: statistics.median(r["phases_ms"][k] for r in rows) / total for k in rows[0]["phases_ms"]
            }
        if "same_translation" in rows[0]:
            entry["same_translation"] = f"{min(r['same_translation'] for r in rows)}/{rows[0]['translated']}"
        out.append(entry)
    return out


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        "# A 50 kB document: TranslateDocument against separate Translate calls",
        "",
        f"`python -m bench.documents`: {settings['bytes']} bytes of Markdown, {settings['sentences']} "
        f"sentences in {len(report['detected_languages'])} detected languages, source `auto`, target "
        f"{TARGET}, greedy, max_new_tokens {settings['max_new_tokens']}; {settings['variant']} models, "
        f"median of {settings['rounds']} rounds (alternating). Segmenter threshold "
        f"{settings['threshold']:.4f} ({settings['threshold_note']}).",
        "",
        "| how | seconds | sentences / s | time / TranslateDocument's | same translations |",
        "|---|---|---|---|---|",
    ]
    for entry in report["summary"]:
        lines.append(
            f"| {entry['mode']} | {entry['seconds']:.1f} | {entry['sentences_per_second']:.2f} | "
            f"{entry['document_speedup']:.2f}x | {entry.get('same_translation', '-')} |"
        )
    share = report["summary"][0]["share"]
    rest = 1 - sum(share.values())
    lines += [
        "",
        "TranslateDocument's time: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())
        + f", the rest (reassembly, the reply) {100 * rest:.1f}%. Segmentation and detection run before "
        "the first sentence is translated. The separate calls are given the document's sentences already "
        "split and detected: their time is translation alone.",
        "",
        "Detected languages (sentences): "
        + ", ".join(f"{k} {v}" for k, v in sorted(report["detected_languages"].items())),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = measurement_parser(__doc__, "documents")
    parser.add_argument("--translation", type=Path, required=True, help="a `pgw export` of NLLB")
    parser.add_argument("--segmenter", type=Path, required=True, help="a `pgw export` of SaT")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--bytes", type=int, default=50_000)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[8, 64])
    parser.add_argument("--keep-threshold", action="store_true", help="a real SaT: its own threshold")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pgw-bench-documents"))
    args = parser.parse_args()
    text, sentences = document(args.bytes)
    segmenter, note = args.segmenter, "the export's own"
    threshold = json.loads((segmenter / "manifest.json").read_text())["token_classification"][
        "default_threshold"
    ]
    if not args.keep_threshold:
        segmenter, threshold = calibrated_segmenter(args.segmenter, args.variant, args.work, text, sentences)
        note = f"calibrated on the random-weight SaT to the document's {sentences} sentences"
    gateway = GatewayProcess(
        "nllb", args.translation, args.variant, args.work,
        extra_models=[{"name": "sat", "path": str(segmenter), "variant": args.variant}],
    )  # fmt: skip
    gateway.start(timeout=900)
    try:
        report = asyncio.run(runs(gateway.address, text, args))
    finally:
        gateway.stop()
    report["settings"] = {
        "bytes": len(text.encode()), "sentences": sentences, "variant": args.variant,
        "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "threshold": threshold,
        "threshold_note": note, "translation": str(args.translation), "segmenter": str(args.segmenter),
    }  # fmt: skip
    report["summary"] = summary(report)
    write_measurement(args.out, "documents", report, markdown(report))


if __name__ == "__main__":
    main()
