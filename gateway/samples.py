"""The multilingual sample text the project ships: tokenizer training data and the accuracy probe set."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class Sentence:
    lang: str  # FLORES-200 code
    text: str


@cache
def sample_sentences() -> tuple[Sentence, ...]:
    """Every sentence of `gateway/data/sample_text.tsv`, in file order (grouped by language)."""
    raw = resources.files("gateway.data").joinpath("sample_text.tsv").read_text(encoding="utf-8")
    rows = (line.split("\t", 1) for line in raw.splitlines() if line.strip())
    return tuple(Sentence(lang, text) for lang, text in rows)


def sample_languages() -> tuple[str, ...]:
    """The languages of the sample text, in file order."""
    return tuple(dict.fromkeys(s.lang for s in sample_sentences()))


def probe_sentences(per_language: int = 2) -> tuple[Sentence, ...]:
    """The fixed probe set: the first `per_language` sentences of every language."""
    taken: dict[str, int] = {}
    probes = []
    for sentence in sample_sentences():
        if taken.get(sentence.lang, 0) < per_language:
            taken[sentence.lang] = taken.get(sentence.lang, 0) + 1
            probes.append(sentence)
    return tuple(probes)
