"""TranslateDocument on the demo models: Markdown, HTML and plain text come back with the same structure
(same parse tree, code and URLs byte for byte, same line breaks and blank lines), every sentence maps to one
span of the source and one of the output, each sentence is what Translate makes of it; the stream sends the
same document in order; limits, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import grpc
import lxml.html
import pytest
from markdown_it import MarkdownIt
from typer.testing import CliRunner

from gateway.cli import app
from gateway.client import PolyglotClient, translate_document_request
from gateway.documents.translate import DocumentInput, DocumentLimits, DocumentTranslator
from gateway.errors import InvalidInput
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc
from gateway.server import GatewayServer
from gateway.tasks.translation import DecodingOptions, TranslationModel
from tests.e2e.conftest import stepper

Stub = polyglot_pb2_grpc.PolyglotStub
OPTIONS = pb.TranslateOptions(max_new_tokens=6)
runner = CliRunner()  # the demo model's words are noise: keep them short

MARKDOWN = """# Getting *started* with the gateway

Run `pgw serve --demo` to start it, then read [the guide](https://example.com/guide?a=1&b=2 "Guide").
It works on Linux &amp; macOS.

## Options

| Option | What it does |
|--------|--------------|
| `--port` | The **port** to listen on. |
| `--host` | Where to listen. |

1. First step.
2. Second step, with a [link](https://example.com/two).

- A list item
  that continues.
- Another one.

```python
print("never translated")
```

> A quoted sentence. And another one!
"""

HTML = """<!DOCTYPE html>
<html lang="en">
<head><title>The gateway's page</title><style>p { color: red; }</style></head>
<body>
  <h1 title="Main heading">Welcome to <em>our <b>small</b></em> site</h1>
  <p>Read the <a href="https://example.com/docs?x=1&amp;y=2" title="The docs">documentation</a> first,
     then try it.<br>A new line starts here.</p>
  <p translate="no">Brand Name Stays</p>
  <p>Call <code>pgw serve</code> and wait.</p>
  <img src="cat.png" alt="A cat on a mat">
  <script>var message = "not translated";</script>
  <ul><li>One item</li><li>Two items &amp; more</li></ul>
</body>
</html>
"""

TEXT = (
    "The first paragraph.\r\nIt has two lines.\r\n\r\n\r\n   A second paragraph, indented.\r\n\r\n"
    "The end.\r\n"
)
_WORD = re.compile(r"\w+")


async def _translate(stub: Stub, document: str, fmt: int, **fields: Any) -> pb.TranslateDocumentResponse:
    request = pb.TranslateDocumentRequest(
        document=document, format=fmt, source_lang="eng_Latn", target_lang="fra_Latn", options=OPTIONS
    )
    for name, value in fields.items():
        setattr(request, name, value)
    reply: pb.TranslateDocumentResponse = await stub.TranslateDocument(request)
    return reply


def _check_sentences(source: str, reply: pb.TranslateDocumentResponse) -> None:
    """Each sentence's source span holds its words; the text sentences' spans run in order without
    overlap, in the source and in the output; a kept sentence's output is its source."""
    out = reply.document
    text = [s for s in reply.sentences if not s.attribute]
    assert text
    for before, after in itertools.pairwise(text):
        assert before.end <= after.start
        assert before.output_end <= after.output_start
    for s in reply.sentences:
        assert 0 <= s.start < s.end <= len(source)
        assert 0 <= s.output_start <= s.output_end <= len(out)
        written = source[s.start : s.end]
        assert all(word in written for word in _WORD.findall(s.text)), (written, s.text)
        if s.kept:
            assert out[s.output_start : s.output_end] == written
        else:
            words = _WORD.findall(s.translation)
            assert all(word in out[s.output_start : s.output_end] for word in words)


async def _same_as_translate(stub: Stub, reply: pb.TranslateDocumentResponse, count: int = 8) -> None:
    """Each sentence is translated as Translate translates that sentence alone."""
    sentences = [s for s in reply.sentences if not s.kept][:count]
    single = await stub.Translate(
        pb.TranslateRequest(
            texts=[s.text for s in sentences], source_lang="eng_Latn", target_lang="fra_Latn", options=OPTIONS
        )
    )
    for s, t in zip(sentences, single.translations, strict=True):
        assert s.translation == " ".join(t.hypotheses[0].text.split())
        assert s.truncated == t.truncated


def _markdown_shape(text: str) -> list[tuple[str, ...]]:
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    shape: list[tuple[str, ...]] = []
    for token in md.parse(text):
        kept = token.content if token.type in ("fence", "code_block", "html_block") else ""
        shape.append((token.type, str(token.level), token.info, kept))
        for child in token.children or []:
            kept = child.content if child.type in ("code_inline", "html_inline") else ""
            shape.append(("  " + child.type, kept, str(sorted(child.attrs.items()))))
    return shape


def _letters(texts: list[str]) -> str:
    """The texts' characters but whitespace, in order."""
    return re.sub(r"\s", "", "".join(texts))


def _markdown_text(text: str) -> str:
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    texts = [
        child.content for token in md.parse(text) for child in token.children or [] if child.type == "text"
    ]
    return _letters(texts)


def _lines(text: str) -> tuple[list[str], list[int]]:
    """The line breaks, and which lines are blank."""
    breaks = re.findall(r"\r\n|\r|\n", text)
    lines = re.split(r"\r\n|\r|\n", text)
    return breaks, [index for index, line in enumerate(lines) if not line.strip()]


async def test_markdown_keeps_its_structure_code_and_urls(stub: Stub) -> None:
    reply = await _translate(stub, MARKDOWN, pb.DOCUMENT_FORMAT_MARKDOWN)
    out = reply.document
    assert out != MARKDOWN
    assert _markdown_shape(out) == _markdown_shape(MARKDOWN)  # code, URLs, titles, HTML: byte for byte
    assert _lines(out) == _lines(MARKDOWN)
    for kept in (
        "`pgw serve --demo`",
        '](https://example.com/guide?a=1&b=2 "Guide")',
        'print("never translated")',
    ):
        assert kept in out
    _check_sentences(MARKDOWN, reply)
    # every character of the document's text is in exactly one sentence
    assert _letters([s.text for s in reply.sentences]) == _markdown_text(MARKDOWN)
    await _same_as_translate(stub, reply)
    assert reply.model == "nllb-demo"
    assert reply.target_lang == "fra_Latn"
    assert reply.usage.input_tokens > 0
    assert reply.usage.output_tokens > 0
    assert reply.phases.translate_ms > 0


def _html_shape(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    root = lxml.html.document_fromstring(text)
    return [
        (str(e.tag), sorted((k, v) for k, v in e.attrib.items() if k not in ("alt", "title")))
        for e in root.iter()
    ]


def _html_text(text: str) -> str:
    """What lxml finds to translate, in document order: title and alt values, texts and tails outside
    the elements that are kept."""

    def kept(e: Any) -> bool:
        return bool(e.tag in ("script", "style", "code") or e.attrib.get("translate") == "no")

    texts: list[str] = []

    def walk(e: Any) -> None:
        texts.extend(e.attrib[name] for name in ("title", "alt") if name in e.attrib)
        if kept(e):
            return
        texts.append(e.text or "")
        for child in e:
            if isinstance(child.tag, str):
                walk(child)
            texts.append(child.tail or "")

    walk(lxml.html.document_fromstring(text))
    return _letters(texts)


async def test_html_keeps_its_tree_scripts_code_and_untranslated_elements(stub: Stub) -> None:
    reply = await _translate(stub, HTML, pb.DOCUMENT_FORMAT_HTML)
    out = reply.document
    assert _html_shape(out) == _html_shape(HTML)
    for kept in (
        '<p translate="no">Brand Name Stays</p>',
        "<code>pgw serve</code>",
        '<script>var message = "not translated";</script>',
        '<a href="https://example.com/docs?x=1&amp;y=2" title="',
        "<style>p { color: red; }</style>",
    ):
        assert kept in out
    root = lxml.html.document_fromstring(out)
    assert root.find(".//img").attrib["alt"] != "A cat on a mat"  # attributes are translated
    assert sum(s.attribute for s in reply.sentences) == 3
    _check_sentences(HTML, reply)
    assert _letters([s.text for s in reply.sentences]) == _html_text(HTML)
    await _same_as_translate(stub, reply)


async def test_plain_text_keeps_every_line_break_and_blank_line(stub: Stub) -> None:
    reply = await _translate(stub, TEXT, pb.DOCUMENT_FORMAT_TEXT)
    assert _lines(reply.document) == _lines(TEXT)
    assert reply.document.startswith(TEXT[: TEXT.index("T")])
    assert reply.document[reply.document.index("\r\n\r\n\r\n") :].startswith("\r\n\r\n\r\n   ")
    _check_sentences(TEXT, reply)
    for s in reply.sentences:  # text reads as it is written
        assert TEXT[s.start : s.end] == s.text
    await _same_as_translate(stub, reply)


async def test_the_stream_sends_the_document_in_order(stub: Stub) -> None:
    unary = await _translate(stub, MARKDOWN, pb.DOCUMENT_FORMAT_MARKDOWN)
    request = pb.TranslateDocumentRequest(
        document=MARKDOWN,
        format=pb.DOCUMENT_FORMAT_MARKDOWN,
        source_lang="en",
        target_lang="fr",
        options=OPTIONS,
    )
    parts, sentences, done = [], [], []
    result = None
    async for message in stub.TranslateDocumentStream(request):
        if message.HasField("result"):
            result = message.result
            continue
        parts.append(message.part)
        sentences += list(message.sentences)
        done.append(message.done)
        assert message.total == len(unary.sentences)
    assert result is not None
    assert "".join(parts) == result.document == unary.document
    assert done == sorted(done)
    assert done[-1] == len(unary.sentences)
    assert [s.start for s in sentences] == sorted(s.start for s in sentences)
    assert len(sentences) == len(result.sentences)


def _model(gateway: GatewayServer, name: str) -> Any:
    return next(entry.model for entry in gateway.registry.all() if entry.name == name)


async def test_auto_detects_each_sentence_and_keeps_those_in_the_target_language(
    gateway: GatewayServer,
) -> None:
    # Without a SaT model, sentences end at line breaks: each line is one sentence, detected by lid.176.
    translator = DocumentTranslator(_model(gateway, "nllb-demo"), None)
    document = "The train leaves at eight.\nLe train part à huit heures.\nDer Zug fährt um acht Uhr.\n12:30\n"
    result = await translator.translate(
        DocumentInput(document, "text", "auto", "fra_Latn", DecodingOptions(max_new_tokens=4))
    )
    found = [(s.text, s.source_lang, s.kept) for s in result.sentences]
    assert found == [
        ("The train leaves at eight.", "eng_Latn", False),
        ("Le train part à huit heures.", "fra_Latn", True),
        ("Der Zug fährt um acht Uhr.", "deu_Latn", False),
        ("12:30", "", True),  # nothing to translate
    ]
    lines = result.document.split("\n")
    assert lines[1] == "Le train part à huit heures."
    assert lines[3] == "12:30"
    assert lines[0] != "The train leaves at eight."
    assert lines[2] != "Der Zug fährt um acht Uhr."
    assert all(0.5 <= s.probability <= 1 for s in result.sentences[:3])


async def _refused(stub: Stub, request: pb.TranslateDocumentRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.TranslateDocument(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return refused.value.details() or ""


async def test_bad_documents_are_invalid_argument_and_say_why(stub: Stub) -> None:
    def request(document: str = "Some text.", **fields: Any) -> pb.TranslateDocumentRequest:
        return pb.TranslateDocumentRequest(document=document, source_lang="en", target_lang="fr", **fields)

    assert "1000001 bytes exceed the limit of 1000000" in await _refused(stub, request("a" * 1_000_001))
    deep = "<div>" * 300 + "deep" + "</div>" * 300
    assert "deeper than 256 levels at offset 1280" in await _refused(
        stub, request(deep, format=pb.DOCUMENT_FORMAT_HTML)
    )
    assert "num_return" in await _refused(
        stub, request(options=pb.TranslateOptions(num_return=2, beam_size=2))
    )
    assert "format: unknown value 9" in await _refused(stub, request(format=9))  # type: ignore[arg-type]
    assert "target_lang" in await _refused(stub, pb.TranslateDocumentRequest(document="x", target_lang="xx"))
    assert "segmenter: unknown model 'nope'" in await _refused(stub, request(segmenter="nope"))
    assert "segmenter: 'nllb-demo' is a translation model" in await _refused(
        stub, request(segmenter="nllb-demo")
    )
    empty = await stub.TranslateDocument(request(""))
    assert empty.document == ""
    assert not empty.sentences


async def test_too_many_sentences_are_refused(gateway: GatewayServer) -> None:
    translator = DocumentTranslator(_model(gateway, "nllb-demo"), None, DocumentLimits(max_sentences=3))
    with pytest.raises(InvalidInput, match="4 sentences exceed the limit of 3"):
        await translator.translate(DocumentInput("One.\nTwo.\nThree.\nFour.", "text", "en", "fr"))


async def test_a_document_past_its_deadline_fails_and_a_cancelled_one_leaves_the_engine(
    stub: Stub, gateway: GatewayServer
) -> None:
    document = "\n".join(f"Sentence number {n} of a long document." for n in range(40))
    request = pb.TranslateDocumentRequest(
        document=document, source_lang="en", target_lang="fr", options=pb.TranslateOptions(max_new_tokens=30)
    )
    model: TranslationModel = _model(gateway, "nllb-demo")
    assert model.engine is not None
    with stepper(gateway, "nllb-demo") as engine:
        leaving = stub.TranslateDocumentStream(request)
        reading = asyncio.ensure_future(leaving.read())
        await engine.waiting()
        assert model.engine.rows_in_flight > 0
        leaving.cancel()
        texts = model.engine._texts
        while not all(t.request.future.cancelled() for t in texts):  # the server saw the client leave
            await asyncio.sleep(0.005)
    await _engine_empties(model)  # released: the document's rows and queued texts leave; no more come
    with pytest.raises(asyncio.CancelledError):
        await reading
    with stepper(gateway, "nllb-demo") as engine:
        late = asyncio.ensure_future(stub.TranslateDocument(request, timeout=0.5))
        await engine.waiting()
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await late
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _engine_empties(model)


async def _engine_empties(model: TranslationModel) -> None:
    """Until the engine has no rows and no queued texts (polling a condition)."""
    assert model.engine is not None
    deadline = time.monotonic() + 30
    while model.engine.rows_in_flight or model.engine.waiting:
        assert time.monotonic() < deadline, "a document's sentences stayed in the engine"
        await asyncio.sleep(0.005)


async def test_clients_and_pgw_translate_file(gateway: GatewayServer, tmp_path: Path) -> None:
    target = f"127.0.0.1:{gateway.port}"
    source = tmp_path / "guide.md"
    source.write_bytes(MARKDOWN.replace("\n", "\r\n").encode())  # line endings go through as they are

    def calls() -> None:
        with PolyglotClient(target) as client:
            reply = client.translate_document(
                MARKDOWN, "fr", format="markdown", source_lang="en", max_new_tokens=6
            )
            request = translate_document_request(MARKDOWN, "fr", "markdown", "en", max_new_tokens=6)
            streamed = list(client.translate_document_stream(request))
            assert streamed[-1].result.document == reply.document
            assert _markdown_shape(reply.document) == _markdown_shape(MARKDOWN)
            with pytest.raises(ValueError, match="format must be one of text, markdown, html"):
                client.translate_document("x", "fr", format="latex")  # type: ignore[arg-type]

        args = ["translate-file", str(source), "--to", "fr", "--from", "en", "--max-new-tokens", "6"]
        written = tmp_path / "guide.fr.md"
        result = runner.invoke(app, [*args, "-o", str(written), "--server", target])
        assert result.exit_code == 0, result.output
        out = written.read_bytes().decode()
        assert "\r\n" in out
        assert _lines(out) == _lines(source.read_bytes().decode())
        assert _markdown_shape(out) == _markdown_shape(MARKDOWN.replace("\n", "\r\n"))
        shown = runner.invoke(app, [*args, "--json", "--server", target])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["document"] == out
        missing = runner.invoke(app, ["translate-file", str(tmp_path / "nope.md"), "--to", "fr"])
        assert missing.exit_code == 2
        bad = runner.invoke(app, ["translate-file", str(source), "--to", "zz", "--server", target])
        assert bad.exit_code == 1
        assert "INVALID_ARGUMENT" in bad.output

    await asyncio.to_thread(calls)
