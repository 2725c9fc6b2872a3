"""A document as its parser sees it: blocks of text (a paragraph, a heading, a table cell, an attribute
value) made of pieces that tile the source, and everything between blocks kept byte for byte.

A piece is either words (`text`: what gets translated; an entity or an escape reads as its character) or
markup kept as it is (emphasis markers, inline tags, code spans, link targets, line breaks). Sentences are
found on a block's `plain` text, and every sentence maps back to the source span of its characters.

Reassembly replaces each translated sentence's words and keeps its markup: the sentence's text runs between
markup ("slots") take the translation's words in order, in proportion to the runs' lengths, so that a link or
an emphasis inside a sentence keeps its place and its share of the words; a translation with fewer words
than runs goes whole into the longest run, and the rest of the sentence's markup stays around it. Rendering
a document whose every sentence is kept gives back the source, exactly.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Format = Literal["text", "markdown", "html"]
_WORDS = re.compile(r"\S+\s*")


@dataclass(frozen=True)
class Piece:
    start: int  # code-point offsets into the document, end exclusive
    end: int
    plain: str  # what it reads as: its text; " " for a soft line break; "" for other markup
    text: bool  # words (translated) or markup (kept byte for byte)


@dataclass
class Block:
    """A run of pieces that reads as text: segmented into sentences (or one sentence when `whole`)."""

    pieces: list[Piece]
    whole: bool = False  # an attribute value: translated as one sentence, escaped as an attribute
    _starts: list[int] = field(default_factory=list, repr=False)  # plain offset of each piece

    def __post_init__(self) -> None:
        offset = 0
        for piece in self.pieces:
            self._starts.append(offset)
            offset += len(piece.plain)

    @property
    def plain(self) -> str:
        return "".join(piece.plain for piece in self.pieces)

    def _char(self, index: int) -> tuple[int, int]:
        """The source span of the plain character at `index`."""
        at = bisect.bisect_right(self._starts, index) - 1
        while not self.pieces[at].plain:  # zero-width markup shares its offset with the piece after it
            at -= 1
        piece, offset = self.pieces[at], index - self._starts[at]
        if len(piece.plain) == piece.end - piece.start:  # reads as it is written
            return piece.start + offset, piece.start + offset + 1
        return piece.start, piece.end  # an entity or an escape: one unit

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The source span of the plain characters [start, end)."""
        return self._char(start)[0], self._char(end - 1)[1]

    def slots(self, start: int, end: int) -> tuple[list[str], list[list[Piece]]]:
        """The sentence at source span [start, end): its text runs (plain) and the markup between them
        (`marks[i]` follows `runs[i]`; one list of marks fewer than runs)."""
        runs: list[str] = [""]
        marks: list[list[Piece]] = []
        after_mark = False
        for piece in self.pieces:
            if piece.end <= start or piece.start >= end:
                continue
            if not piece.text:
                if not after_mark:
                    marks.append([])
                    after_mark = True
                marks[-1].append(piece)
                continue
            if after_mark:
                runs.append("")
                after_mark = False
            if len(piece.plain) == piece.end - piece.start:  # clipped to the sentence
                a, b = max(start, piece.start) - piece.start, min(end, piece.end) - piece.start
                runs[-1] += piece.plain[a:b]
            else:
                runs[-1] += piece.plain
        if after_mark:
            runs.append("")
        return runs, marks


def distribute(runs: Sequence[str], translation: str) -> list[str]:
    """The translation's words laid over a sentence's text runs: in order, each run that had words gets a
    share in proportion to its length (at least one word), keeping the run's own leading and trailing
    whitespace; with fewer words than such runs, the longest run takes them all."""
    filled = [index for index, run in enumerate(runs) if run.strip()]
    units = _WORDS.findall(translation.strip())
    if len(units) < len(filled) and len(units) == 1 and _unspaced(units[0]):
        units = list(units[0])  # a script written without spaces (Chinese, Japanese, Thai): characters
    out = [""] * len(runs)
    if not filled:
        return out
    if len(units) < len(filled):
        longest = max(filled, key=lambda index: len(runs[index].strip()))
        counts = {longest: len(units)}
    else:
        shares = _shares([len(runs[index].strip()) for index in filled], len(units))
        counts = dict(zip(filled, shares, strict=True))
    taken = 0
    for index in filled:
        words = "".join(units[taken : taken + counts.get(index, 0)]).strip()
        taken += counts.get(index, 0)
        run = runs[index]
        lead, trail = run[: len(run) - len(run.lstrip())], run[len(run.rstrip()) :]
        out[index] = f"{lead}{words}{trail}" if words else ""
    return out


_UNSPACED = ("CJK", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


def _unspaced(text: str) -> bool:
    """Mostly letters of scripts that do not put spaces between words."""
    letters = [ch for ch in text if ch.isalpha()]
    unspaced = sum(unicodedata.name(ch, "").startswith(_UNSPACED) for ch in letters)
    return bool(letters) and 2 * unspaced > len(letters)


def _shares(weights: list[int], total: int) -> list[int]:
    """`total` split into one share per weight, each >= 1, in proportion (largest remainders)."""
    extra = total - len(weights)
    mass = sum(weights) or 1
    exact = [extra * w / mass for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[: extra - sum(shares)]:
        shares[i] += 1
    return [1 + s for s in shares]


@dataclass(frozen=True)
class Parsed:
    """A document's blocks and how translated words are written into it."""

    source: str
    format: Format
    blocks: list[Block]
    escape: Callable[[str], str]  # translated words -> document text (Markdown / HTML escaping)
    escape_attribute: Callable[[str], str] = lambda text: text


def text_blocks(source: str, base: int = 0) -> list[Block]:
    """Plain text: each paragraph (lines between blank lines) a block; blank lines are kept as they are."""
    blocks = []
    for match in re.finditer(r"[^\r\n]*\S[^\r\n]*(?:(?:\r\n|\r|\n)[^\r\n]*\S[^\r\n]*)*", source):
        start, end = base + match.start(), base + match.end()
        blocks.append(Block([Piece(start, end, match.group(), True)]))
    return blocks


def parse_text(source: str) -> Parsed:
    return Parsed(source, "text", text_blocks(source), lambda text: text)
