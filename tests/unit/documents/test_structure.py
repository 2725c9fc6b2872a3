"""Document structure without models: what each parser makes text and what it keeps, that pieces tile
their blocks, that a document whose sentences are all kept reassembles to its source byte for byte, and how
translated words are laid over a sentence's markup."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from gateway.documents import html, markdown
from gateway.documents.structure import Block, Parsed, Piece, distribute, parse_text
from gateway.documents.translate import Assembler, fallback_spans, sentences_of
from gateway.errors import InvalidInput

MARKDOWN = """---
title: Kept as it is
---
# Getting *started*

Run `pgw serve --demo` to start, then read [the guide](https://example.com/g?a=1&b=2 "Guide").
It works on Linux &amp; macOS \\* too.

| Option | Meaning \\| here |
|--------|---------|
| `--port` | The **port** to listen on. |

- First item
  continues here.
- Second item with <b>html</b>.

```python
print("never translated")
```

    indented code stays

> Quoted text. Another sentence!

![an image](img.png) and <https://auto.link/x>.

[ref]: https://example.com/ref
"""

HTML = """<!DOCTYPE html>
<html lang="en"><head><title>A page &amp; its title</title>
<style>p { color: red; }</style></head>
<body>
  <h1 title="Main heading">Welcome to <em>our</em> site</h1>
  <p>Read the <a href="https://example.com/d?x=1&amp;y=2" title="The docs">documentation <b>first</b></a>,
     then try it.<br>New line.</p>
  <p translate="no">Brand Name Stays</p>
  <p>Call <code>pgw serve</code> and <span class="notranslate">KeepMe</span> now.</p>
  <img src="a.png" alt="A cat on a mat">
  <script>var s = "not translated";</script>
  <!-- a comment -->
  <pre>  pre
    formatted </pre>
  <ul><li>One<li>Two &lt;three&gt;</ul>
</body></html>
"""


def _texts(parsed: Parsed) -> list[str]:
    return [" ".join(block.plain.split()) for block in parsed.blocks]


def _check_tiling(parsed: Parsed) -> None:
    """Pieces run in order without overlap, inside the source; words that read as written are the source
    (in HTML a line break reads as a space)."""
    for block in parsed.blocks:
        for before, after in zip(block.pieces, block.pieces[1:], strict=False):
            assert before.end <= after.start
        for piece in block.pieces:
            assert 0 <= piece.start < piece.end <= len(parsed.source)
            written = parsed.source[piece.start : piece.end]
            if piece.text and len(piece.plain) == len(written) and not re.search(r"[\r\n]", written):
                assert written == piece.plain


def _kept(parsed: Parsed) -> str:
    """The document with every sentence kept, reassembled."""
    split = [block for block in parsed.blocks if not block.whole]
    sentences = sentences_of(parsed, [fallback_spans(block.plain, 60) for block in split])
    for s in sentences:
        s.kept = s.done = True
    assembler = Assembler(parsed, sentences)
    text, _ = assembler.finish()
    assert text == assembler.output()
    return text


def test_markdown_translates_text_and_keeps_code_urls_and_front_matter() -> None:
    parsed = markdown.parse(MARKDOWN)
    _check_tiling(parsed)
    assert _texts(parsed) == [
        "Getting started",
        "Run to start, then read the guide. It works on Linux & macOS * too.",
        "Option",
        "Meaning | here",
        "The port to listen on.",
        "First item continues here.",
        "Second item with html.",
        "Quoted text. Another sentence!",
        "and .",
    ]
    words = "".join(p.plain for b in parsed.blocks for p in b.pieces if p.text)
    for kept in ("pgw serve", "https://", "never translated", "indented code", "Kept as it is", "img.png"):
        assert kept not in words
    assert _kept(parsed) == MARKDOWN


def test_html_translates_text_nodes_and_attributes_and_keeps_the_rest() -> None:
    parsed = html.parse(HTML)
    _check_tiling(parsed)
    assert _texts(parsed) == [
        "A page & its title",
        "Main heading",
        "Welcome to our site",
        "Read the documentation first, then try it. New line.",
        "The docs",
        "Call and now.",
        "A cat on a mat",
        "One",
        "Two <three>",
    ]
    assert [b.whole for b in parsed.blocks].count(True) == 3
    words = "".join(p.plain for b in parsed.blocks for p in b.pieces if p.text)
    for kept in ("Brand Name", "pgw serve", "KeepMe", "not translated", "a comment", "formatted", "color"):
        assert kept not in words
    assert _kept(parsed) == HTML


def test_an_attribute_inside_a_sentence_nests_in_it() -> None:
    parsed = html.parse(HTML)
    split = [block for block in parsed.blocks if not block.whole]
    sentences = sentences_of(parsed, [[(0, len(block.plain.rstrip()))] for block in split])
    docs = next(s for s in sentences if s.text == "The docs")
    holder = next(s for s in sentences if docs in s.inner)
    assert holder.start < docs.start < docs.end < holder.end
    assert "documentation" in holder.text


def test_plain_text_keeps_blank_lines_and_crlf() -> None:
    source = "First line.\r\nSecond line.\r\n\r\n\r\n   Indented. Two!\r\n\r\n"
    parsed = parse_text(source)
    assert [b.plain for b in parsed.blocks] == ["First line.\r\nSecond line.", "   Indented. Two!"]
    assert _kept(parsed) == source


def test_html_nesting_deeper_than_the_limit_is_refused_with_its_offset() -> None:
    deep = "<div>" * 10 + "text" + "</div>" * 10
    html.parse(deep, max_depth=10)
    with pytest.raises(InvalidInput, match=r"deeper than 9 levels at offset 45"):
        html.parse(deep, max_depth=9)


@pytest.mark.parametrize(
    ("runs", "translation", "expected"),
    [
        (["Hello world"], "Bonjour le monde", ["Bonjour le monde"]),
        # a link's words keep their share, and each run its own spaces
        (
            ["Read the ", "guide", " now."],
            "Lisez le guide maintenant.",
            ["Lisez le ", "guide", " maintenant."],
        ),
        # fewer words than runs: all in the longest run, markup around it
        (["Read the ", "guide", " now."], "Lisez.", ["Lisez. ", "", ""]),
        # no spaces: characters
        (["ab", "c"], "你好吗", ["你好", "吗"]),
        (["Read ", "", "this"], "Lis ceci", ["Lis ", "", "ceci"]),
    ],
)
def test_distribute_lays_words_over_runs_in_order(
    runs: list[str], translation: str, expected: list[str]
) -> None:
    out = distribute(runs, translation)
    assert out == expected
    assert "".join(out).split() == translation.split() or len(translation.split()) == 1


def test_markdown_escape_keeps_translated_words_plain() -> None:
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    for words in ("# not a heading", "1. not a list", "*a* `b` [c](d) <e> | ~~f~~ & g!", "- x", "\\"):
        tokens = md.parse(markdown.escape(words))
        assert [t.type for t in tokens] == ["paragraph_open", "inline", "paragraph_close"]
        assert [c.type for c in tokens[1].children or []] == ["text"]
        assert tokens[1].children[0].content == words  # type: ignore[index]


def test_a_block_that_does_not_line_up_is_kept() -> None:
    # A NUL reads as U+FFFD to the parser: that paragraph is kept whole, the next one still translated.
    parsed = markdown.parse("Bad \x00 byte here.\n\nGood paragraph.\n")
    assert _texts(parsed) == ["Good paragraph."]


def test_a_block_maps_plain_offsets_to_source_spans() -> None:
    # "One &amp;<b> two": an entity, then markup
    block = Block(
        [
            Piece(0, 4, "One ", True),
            Piece(4, 9, "&", True),
            Piece(9, 12, "", False),
            Piece(12, 16, " two", True),
        ]
    )
    assert block.plain == "One & two"
    assert block.span(0, 3) == (0, 3)
    assert block.span(4, 5) == (4, 9)  # the entity is one unit
    assert block.span(0, 9) == (0, 16)
    assert block.slots(0, 16) == (["One &", " two"], [[Piece(9, 12, "", False)]])
    assert block.slots(2, 14) == (["e &", " t"], [[Piece(9, 12, "", False)]])  # clipped to the sentence


# fmt: off
_MARKDOWN_BITS = st.sampled_from(
    [
        "word",
        "Two words.",
        " ",
        "\n",
        "\n\n",
        "# ",
        "- ",
        "1. ",
        "> ",
        "*",
        "**",
        "_",
        "`code`",
        "``",
        '[link](http://x.y/(a) "t")',
        "[ref]",
        "![img](i.png)",
        "<b>",
        "</b>",
        "<http://a.b>",
        "&amp;",
        "&#35;",
        "\\*",
        "\\",
        "|",
        "| a | b |\n|---|---|\n| c | d |\n",
        "```\ncode\n```\n",
        "    ",
        "\t",
        "é",
        "~~",
        "[x]: http://y\n",
        "---\n",
        "<!-- c -->",
        "\r\n",
    ]
)
_HTML_BITS = st.sampled_from(
    [
        "word",
        "Two words. ",
        " ",
        "\n",
        "<p>",
        "</p>",
        "<b>",
        "</b>",
        "<a href='x' title=\"T t\">",
        "</a>",
        "<br>",
        "<img alt='A b' src=x>",
        "<script>x<y</script>",
        "<code>c</code>",
        "<span translate=no>k</span>",
        "&amp;",
        "&lt;",
        "&#x41;",
        "&bogus;",
        "<!-- c -->",
        "<",
        ">",
        "<li>",
        "<div title=x>",
        "</div>",
        "<pre>p</pre>",
        "<!DOCTYPE html>",
        "é",
        "\r\n",
        "<br/>",
    ]
)
# fmt: on


@settings(max_examples=300, deadline=None)
@given(st.lists(_MARKDOWN_BITS, max_size=30).map("".join))
def test_any_markdown_reassembles_to_itself(source: str) -> None:
    parsed = markdown.parse(source)
    _check_tiling(parsed)
    assert _kept(parsed) == source


@settings(max_examples=300, deadline=None)
@given(st.lists(_HTML_BITS, max_size=30).map("".join))
def test_any_html_reassembles_to_itself(source: str) -> None:
    parsed = html.parse(source)
    _check_tiling(parsed)
    assert _kept(parsed) == source


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab .!\n\r\t\u2028é"), max_size=80))
def test_any_text_reassembles_to_itself(source: str) -> None:
    parsed = parse_text(source)
    _check_tiling(parsed)
    assert _kept(parsed) == source
    for block in parsed.blocks:  # paragraphs: no blank line inside one
        assert not re.search(r"(?:\r\n|\r(?!\n)|\n)[^\S\r\n]*(?:\r|\n)", block.plain)
