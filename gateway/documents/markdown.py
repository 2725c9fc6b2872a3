"""Markdown (CommonMark with GFM tables and strikethrough) by markdown-it-py: the text of every paragraph,
heading and table cell is a block; code blocks, HTML blocks, link reference definitions, front matter and
tables' pipes are never in one. Inside a block, code spans, link targets, autolinks, images, inline HTML
and emphasis markers are markup.

markdown-it reports where each block's lines are but not where its inline pieces are, so each inline child
is found in the source in order: text character by character (an escape or an entity reads as the character
it stands for), markup where the text before it ends. A block that does not line up this way is kept as it
is rather than risk its structure.
"""

from __future__ import annotations

import bisect
import html
import logging
import re
from typing import Any

from markdown_it import MarkdownIt

from gateway.documents.structure import Block, Parsed, Piece

log = logging.getLogger(__name__)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{0,31});")
_FRONT_MATTER = re.compile(r"\A(?:---|\+\+\+)[ \t]*(?:\r\n|\r|\n)")
_PUNCTUATION = re.compile(r"([\\`*_\[\]<>|~&!])")
_MARKER = re.compile(r"^(?:([#>+=-])|(\d+)([.)]))")


def escape(words: str) -> str:
    """Translated words as Markdown that reads as those words (no markup can start inside them, nor a
    heading or list marker at their start)."""
    words = _PUNCTUATION.sub(r"\\\1", words)
    return _MARKER.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", words)


class _Unaligned(Exception):
    """The inline tokens do not line up with the source."""


class _Lines:
    def __init__(self, source: str) -> None:
        self.starts = [0]
        self.ends = []
        for match in _LINE_BREAK.finditer(source):
            self.ends.append(match.start())
            self.starts.append(match.end())
        self.ends.append(len(source))


def parse(source: str) -> Parsed:
    # Front matter (YAML between --- lines, TOML between +++) is blanked out, line for line, so the
    # parser sees no text there and its line numbers still hold.
    text = source
    if fence := _FRONT_MATTER.match(source):
        marker = fence.group()[:3]
        close = re.compile(rf"^{re.escape(marker)}[ \t]*$", re.M).search(source, fence.end())
        if close is not None:
            head = source[: close.end()]
            text = _LINE_BREAK.sub("\n", re.sub(r"[^\r\n]", " ", head)) + source[close.end() :]
    lines = _Lines(source)
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    tokens = md.parse(_LINE_BREAK.sub("\n", text))
    blocks: list[Block] = []
    cell = 0
    for index, token in enumerate(tokens):
        if token.type == "tr_open":
            cell = 0
        if token.type != "inline" or token.map is None or not token.content.strip():
            continue
        parent = tokens[index - 1].type if index else ""
        try:
            if parent in ("th_open", "td_open"):
                regions = [_cell(source, lines, token.map[0], cell)]
                cell += 1
            else:
                regions = _regions(source, lines, token)
            pieces = _Inline(source, regions).pieces(token.children or [])
        except _Unaligned as exc:
            log.debug("a Markdown block on line %d is kept as it is: %s", token.map[0] + 1, exc)
            continue
        if any(piece.text for piece in pieces):
            blocks.append(Block(pieces))
    return Parsed(source, "markdown", blocks, escape)


def _regions(source: str, lines: _Lines, token: Any) -> list[tuple[int, int]]:
    """Where each line of an inline token's content is in the source."""
    regions = []
    for number, content in enumerate(token.content.split("\n")):
        line = token.map[0] + number
        if line >= len(lines.ends):
            raise _Unaligned("content past the block's lines")
        start, end = lines.starts[line], lines.ends[line]
        text = source[start:end].rstrip()
        wanted = content.rstrip()
        if not wanted:
            regions.append((end, end))
            continue
        at = len(text) - len(wanted) if text.endswith(wanted) else text.find(wanted)
        if at < 0:
            raise _Unaligned(f"line {line + 1} does not hold its content")
        regions.append((start + at, start + len(text) if text.endswith(wanted) else start + at + len(wanted)))
    return regions


def _cell(source: str, lines: _Lines, line: int, number: int) -> tuple[int, int]:
    """The span of the `number`th cell of a table row (cells split at pipes that are not escaped)."""
    start, end = lines.starts[line], lines.ends[line]
    row = source[start:end]
    pipes = [m.start() for m in re.finditer(r"(?<!\\)\|", row)]
    edges = [-1, *pipes, len(row)]
    cells = [(edges[i] + 1, edges[i + 1]) for i in range(len(edges) - 1)]
    if row.lstrip().startswith("|"):
        cells = cells[1:]
    if row.rstrip().endswith("|") and cells:
        cells = cells[:-1]
    if number >= len(cells):
        raise _Unaligned("a table row has fewer cells than the parser found")
    a, b = cells[number]
    text = row[a:b]
    a += len(text) - len(text.lstrip())
    b -= len(text) - len(text.rstrip())
    return start + a, start + b


class _Inline:
    """Inline children laid over their source regions, as pieces."""

    def __init__(self, source: str, regions: list[tuple[int, int]]) -> None:
        self.source = source
        self.regions = regions
        self.region_starts = [a for a, _ in regions]
        self.end = regions[-1][1]
        self.at = regions[0][0]
        self.out: list[Piece] = []

    def _mark(self, end: int, plain: str = "") -> None:
        if end <= self.at or end > self.end:
            raise _Unaligned("markup outside its block")
        self.out.append(Piece(self.at, end, plain, False))
        self.at = end

    def _expect(self, literal: str) -> None:
        if not self.source.startswith(literal, self.at):
            raise _Unaligned(f"{literal!r} not where the parser put it")

    def pieces(self, children: list[Any]) -> list[Piece]:
        skip_to_close = False
        for child in children:
            kind = child.type
            if skip_to_close:
                skip_to_close = kind != "link_close"
                continue
            if kind == "text":
                self._text(child.content)
            elif kind in ("softbreak", "hardbreak"):
                line = bisect.bisect_right(self.region_starts, self.at)
                if line >= len(self.regions):
                    raise _Unaligned("a line break after the last line")
                self._mark(self.regions[line][0], " ")
            elif kind == "code_inline":
                self._expect(child.markup)
                close = re.compile(rf"(?<!`){re.escape(child.markup)}(?!`)")
                found = close.search(self.source, self.at + len(child.markup), self.end)
                if found is None:
                    raise _Unaligned("an unclosed code span")
                self._mark(found.end())
            elif kind in ("em_open", "em_close", "strong_open", "strong_close", "s_open", "s_close"):
                self._expect(child.markup)
                self._mark(self.at + len(child.markup))
            elif kind == "link_open" and child.markup == "autolink":
                self._expect("<")
                self._mark(self.source.index(">", self.at, self.end) + 1)
                skip_to_close = True
            elif kind == "link_open":
                self._expect("[")
                self._mark(self.at + 1)
            elif kind == "link_close":
                self._expect("]")
                self._mark(self._after_target(self.at + 1))
            elif kind == "image":
                self._expect("![")
                self._mark(self._after_target(self._bracket_end(self.at + 1)))
            elif kind == "html_inline":
                self._expect(child.content)
                self._mark(self.at + len(child.content))
            else:
                raise _Unaligned(f"inline {kind}")
        return self.out

    def _text(self, content: str) -> None:
        src, at, run = self.source, self.at, self.at
        i = 0
        while i < len(content):
            ch = content[i]
            escaped = src.startswith("\\", at) and at + 1 < self.end and src[at + 1] == ch
            entity = _ENTITY.match(src, at, self.end) if src.startswith("&", at) else None
            decoded = html.unescape(entity.group()) if entity else ""
            if entity and not content.startswith(decoded, i):
                entity = None
            if not escaped and not entity:
                if at >= self.end or src[at] != ch:
                    raise _Unaligned("text that is not in the source")
                at += 1
                i += 1
                continue
            if at > run:
                self.out.append(Piece(run, at, src[run:at], True))
            if escaped:
                self.out.append(Piece(at, at + 2, ch, True))
                at += 2
                i += 1
            elif entity:
                self.out.append(Piece(at, entity.end(), decoded, True))
                at = entity.end()
                i += len(decoded)
            run = at
        if at > run:
            self.out.append(Piece(run, at, src[run:at], True))
        self.at = at

    def _bracket_end(self, at: int) -> int:
        """Just past the `]` that closes the `[` at `at`."""
        depth, i = 0, at
        while i < self.end:
            ch = self.source[i]
            if ch == "\\":
                i += 2
                continue
            depth += ch == "["
            depth -= ch == "]"
            i += 1
            if depth == 0:
                return i
        raise _Unaligned("an unclosed bracket")

    def _after_target(self, at: int) -> int:
        """Just past a link's target: `(destination "title")`, `[label]`, or nothing (a shortcut)."""
        src = self.source
        if src.startswith("[", at):
            return self._bracket_end(at)
        if not src.startswith("(", at):
            return at
        depth, i, quote = 1, at + 1, ""
        while i < self.end:
            ch = src[i]
            if ch == "\\":
                i += 2
                continue
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "<":
                close = src.find(">", i, self.end)
                i = close if close > 0 else i
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise _Unaligned("an unclosed link target")
