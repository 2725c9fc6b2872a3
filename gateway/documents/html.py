"""HTML by the standard library's tokenizer (`html.parser`), which, unlike lxml's and selectolax's tree
builders, says where in the source each tag, text and entity is: reassembly keeps every byte that is not a
translated word, so it needs those offsets.

Block-level elements (p, li, td, h1, title, ...) bound the blocks; inline elements (a, b, em, span, ...)
are markup inside them, and `<br>` a line break. Text nodes are translated, and the `alt`, `title`,
`placeholder` and `aria-label` attributes (each value one sentence). Never translated: `<script>`, `<style>`,
`<pre>`, `<code>`, `<kbd>`, `<samp>`, `<textarea>`, `<svg>`, `<math>`, `<template>`, and any element with
`translate="no"` or the `notranslate` class, with all they contain.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

from gateway.documents.structure import Block, Parsed, Piece
from gateway.errors import InvalidInput

DEFAULT_MAX_DEPTH = 256
BLOCK = frozenset(
    [
        "address",
        "article",
        "aside",
        "blockquote",
        "body",
        "caption",
        "dd",
        "details",
        "dialog",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "head",
        "header",
        "hgroup",
        "hr",
        "html",
        "legend",
        "li",
        "main",
        "menu",
        "nav",
        "ol",
        "option",
        "p",
        "section",
        "summary",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "title",
        "tr",
        "ul",
    ]
)
SKIP_BLOCK = frozenset(["script", "style", "pre", "textarea", "svg", "math", "template"])
SKIP_INLINE = frozenset(["code", "kbd", "samp"])
VOID = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    ]
)
AUTO_CLOSE = frozenset(["p", "li", "dt", "dd", "option", "tr", "td", "th"])  # a second one closes the first
ATTRIBUTES = frozenset(("alt", "title", "placeholder", "aria-label"))
_ATTRIBUTE = re.compile(r"""([^\s"'>/=]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+))""")
_REFERENCE = re.compile(r"&(?:#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[A-Za-z][A-Za-z0-9]*;?)")
_BREAKING_SPACE = re.compile(r"[ \t\f]*[\r\n]\s*")  # whitespace with a line break: a space in HTML


def escape(words: str) -> str:
    return html.escape(words, quote=False)


def escape_attribute(words: str) -> str:
    return html.escape(words, quote=True)


def _text_pieces(source: str, start: int, end: int) -> list[Piece]:
    """Text as pieces: character references read as what they stand for, line breaks as a space."""
    pieces = []
    at = start
    for match in _REFERENCE.finditer(source, start, end):
        pieces += _spaced(source, at, match.start())
        decoded = html.unescape(match.group())
        pieces.append(Piece(match.start(), match.end(), decoded, True))
        at = match.end()
    return pieces + _spaced(source, at, end)


def _spaced(source: str, start: int, end: int) -> list[Piece]:
    pieces = []
    at = start
    for match in _BREAKING_SPACE.finditer(source, start, end):
        if match.start() > at:
            pieces.append(Piece(at, match.start(), source[at : match.start()], True))
        pieces.append(Piece(match.start(), match.end(), " ", True))
        at = match.end()
    if end > at:
        pieces.append(Piece(at, end, source[at:end], True))
    return pieces


class _Tokens(HTMLParser):
    """The tokenizer's events with their source offsets; each event runs to where the next one starts."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=False)
        self.source = source
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self.events: list[tuple[str, int, str, list[tuple[str, str | None]]]] = []

    def _offset(self) -> int:
        line, column = self.getpos()
        return self.line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.events.append(("start", self._offset(), tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.events.append(("void", self._offset(), tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        self.events.append(("end", self._offset(), tag, []))

    def handle_data(self, data: str) -> None:
        self.events.append(("data", self._offset(), "", []))

    def handle_entityref(self, name: str) -> None:
        self.events.append(("data", self._offset(), "", []))

    def handle_charref(self, name: str) -> None:
        self.events.append(("data", self._offset(), "", []))

    def handle_comment(self, data: str) -> None:
        self.events.append(("other", self._offset(), "", []))

    def handle_decl(self, decl: str) -> None:
        self.events.append(("other", self._offset(), "", []))

    def handle_pi(self, data: str) -> None:
        self.events.append(("other", self._offset(), "", []))

    def unknown_decl(self, data: str) -> None:
        self.events.append(("other", self._offset(), "", []))


def parse(source: str, max_depth: int = DEFAULT_MAX_DEPTH) -> Parsed:
    tokens = _Tokens(source)
    try:
        tokens.feed(source)
        tokens.close()
    except Exception as exc:  # the tokenizer is lenient; whatever it still refuses is the document's fault
        raise InvalidInput(
            f"document: the HTML does not parse near offset {tokens._offset()}: {exc}"
        ) from exc
    events = tokens.events
    blocks: list[Block] = []
    pieces: list[Piece] = []
    stack: list[str] = []
    skip: tuple[int, int, bool] | None = None  # (stack depth, start offset, inline) of a kept element

    def flush() -> None:
        nonlocal pieces
        if any(piece.text and piece.plain.strip() for piece in pieces):
            blocks.append(Block(pieces))
        pieces = []

    for number, (kind, start, tag, attrs) in enumerate(events):
        end = events[number + 1][1] if number + 1 < len(events) else len(source)
        if skip is not None:
            if kind == "start" and tag not in VOID:
                stack.append(tag)
            elif kind == "end":
                _close(stack, tag)
            if len(stack) < skip[0]:
                if skip[2]:
                    pieces.append(Piece(skip[1], end, "", False))
                skip = None
            continue
        if kind == "data":
            pieces += _text_pieces(source, start, end)
            continue
        if kind == "other":
            pieces.append(Piece(start, end, "", False))
            continue
        if kind == "start" and tag in AUTO_CLOSE and stack and stack[-1] == tag:
            stack.pop()
        is_block = tag in BLOCK or tag in SKIP_BLOCK
        if is_block:
            flush()
        if kind in ("start", "void"):
            kept = tag in SKIP_BLOCK or tag in SKIP_INLINE or _not_translated(attrs)
            if not kept:
                blocks += _attribute_blocks(source, start, end)
            if kind == "start" and tag not in VOID:
                stack.append(tag)
                if len(stack) > max_depth:
                    raise InvalidInput(
                        f"document: HTML elements nest deeper than {max_depth} levels at offset {start}"
                    )
                if kept:
                    inline = not is_block
                    if not inline:
                        flush()
                    skip = (len(stack), start, inline)
                    continue
            if not is_block:
                pieces.append(Piece(start, end, "\n" if tag == "br" else "", False))
            continue
        _close(stack, tag)  # an end tag
        if not is_block:
            pieces.append(Piece(start, end, "", False))
    if skip is not None and skip[2]:
        pieces.append(Piece(skip[1], len(source), "", False))
    flush()
    blocks.sort(key=lambda block: block.pieces[0].start)
    return Parsed(source, "html", blocks, escape, escape_attribute)


def _close(stack: list[str], tag: str) -> None:
    """An end tag closes the innermost open element of its name and all open inside it (a stray one
    closes nothing)."""
    if tag in stack:
        del stack[len(stack) - 1 - stack[::-1].index(tag) :]


def _not_translated(attrs: list[tuple[str, str | None]]) -> bool:
    for name, value in attrs:
        if name == "translate" and (value or "").strip().lower() == "no":
            return True
        if name == "class" and "notranslate" in (value or "").split():
            return True
    return False


def _attribute_blocks(source: str, start: int, end: int) -> list[Block]:
    """Each translated attribute of the tag at [start, end) as a one-sentence block."""
    blocks = []
    tag = source[start:end]
    name_end = re.match(r"<[^\s/>]*", tag)
    offset = name_end.end() if name_end else 0
    for match in _ATTRIBUTE.finditer(tag, offset):
        if match.group(1).lower() not in ATTRIBUTES:
            continue
        group = next(g for g in (2, 3, 4) if match.group(g) is not None)
        a, b = start + match.start(group), start + match.end(group)
        pieces = _text_pieces(source, a, b)
        if any(piece.plain.strip() for piece in pieces):
            blocks.append(Block(pieces, whole=True))
    return blocks
