"""Benchmark inputs: texts cut to an exact token count, in several languages, from the shipped sample text.

Every engine of a comparison gets the same token ids: the gateway receives the texts, the baselines the ids
that the same tokenizer makes of them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from gateway.samples import sample_languages, sample_sentences

# Languages with a variety of scripts; each has enough sample text for 256-token paragraphs.
LANGUAGES = ("eng_Latn", "deu_Latn", "fra_Latn", "rus_Cyrl", "zho_Hans", "arb_Arab", "hin_Deva", "jpn_Jpan")


@dataclass(frozen=True)
class BenchText:
    lang: str
    text: str
    tokens: int  # without special tokens


class TextMaker:
    """Texts of exactly N tokens (without special tokens) for one tokenizer."""

    def __init__(self, tokenizer_file: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        languages = [lang for lang in LANGUAGES if lang in sample_languages()]
        by_lang: dict[str, list[str]] = {lang: [] for lang in languages}
        for sentence in sample_sentences():
            if sentence.lang in by_lang:
                by_lang[sentence.lang].append(sentence.text)
        self._pools = by_lang
        self._cycle = itertools.cycle(languages)

    def text(self, tokens: int, lang: str | None = None, offset: int = 0) -> BenchText:
        """A text of `tokens` tokens: consecutive sentences of `lang` from `offset`, cut at a token."""
        lang = lang or next(self._cycle)
        pool = self._pools[lang]
        joined = ""
        index = offset
        while True:
            joined = f"{joined} {pool[index % len(pool)]}".strip()
            index += 1
            encoding = self.tokenizer.encode(joined, add_special_tokens=False)
            if len(encoding.ids) >= tokens:
                end = encoding.offsets[tokens - 1][1]
                cut = joined[:end]
                # Cutting can merge the last pieces differently: trim until the count is exact.
                while len(self.tokenizer.encode(cut, add_special_tokens=False).ids) > tokens:
                    cut = cut[:-1]
                return BenchText(lang, cut, len(self.tokenizer.encode(cut, add_special_tokens=False).ids))
            if index - offset > 10 * len(pool):
                raise ValueError(f"not enough {lang} sample text for {tokens} tokens")

    def texts(self, count: int, tokens: int, lang: str | None = None) -> list[BenchText]:
        """`count` different texts of `tokens` tokens, languages in turn unless `lang` is given."""
        return [self.text(tokens, lang, offset=i) for i in range(count)]
