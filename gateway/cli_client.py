"""The client commands (`pgw translate`, `segment`, `detect`, ..., `models list`): call a gateway, print."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar, cast

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from gateway.client import (
    DocumentFormat,
    PolyglotClient,
    PolyglotError,
    Tls,
    translate_document_request,
    vectors,
)
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb

# User text and model output are printed verbatim (escaped, never read as markup) and never hard-wrapped:
# a terminal wraps long lines itself, and a pipe gets one line per line.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")
# The flag wins over the environment variable, which wins over the default; --help shows both.
Server = Annotated[str, typer.Option(envvar="PGW_SERVER", help="host:port of the gateway.")]
ApiKey = Annotated[
    str | None, typer.Option(envvar="PGW_API_KEY", help="API key, when the server asks for one.")
]
TlsCa = Annotated[
    Path | None,
    typer.Option(
        envvar="PGW_TLS_CA", help="Use TLS; PEM file of the CA that signed the server's certificate."
    ),
]
TlsCert = Annotated[
    Path | None, typer.Option(envvar="PGW_TLS_CERT", help="Client certificate (PEM), for mutual TLS.")
]
TlsKey = Annotated[Path | None, typer.Option(envvar="PGW_TLS_KEY", help="Client certificate's key (PEM).")]
Model = Annotated[str, typer.Option(help="Model name; default: the server's default for the task.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the whole reply as JSON (every field).")]
DEFAULT_SERVER = "localhost:50051"


@dataclass(frozen=True)
class Connection:
    """Where and how the client commands reach the gateway."""

    server: str = DEFAULT_SERVER
    api_key: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


CONNECTION = Connection()
# A command's connection options: (parameter, its Annotated type, default); `_connected` adds them.
_OPTIONS: tuple[tuple[str, object, object], ...] = (
    ("server", Server, DEFAULT_SERVER),
    ("api_key", ApiKey, None),
    ("tls_ca", TlsCa, None),
    ("tls_cert", TlsCert, None),
    ("tls_key", TlsKey, None),
)


def _connected(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command taking `conn: Connection` the connection options (`--server`, `--api-key`, TLS).

    typer reads a command's options from its signature: the wrapper shows the command's own parameters
    followed by the connection options, and hands the command one `Connection` built from them.
    """
    signature = inspect.signature(command, eval_str=True)
    own = [p for name, p in signature.parameters.items() if name != "conn"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
        for name, kind, default in _OPTIONS
    ]

    @functools.wraps(command)
    def run(**kwargs: object) -> None:
        conn = Connection(**{name: kwargs.pop(name) for name, _, _ in _OPTIONS})  # type: ignore[arg-type]
        command(**kwargs, conn=conn)

    run.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    return run


def _call(conn: Connection, action: Callable[[PolyglotClient], T]) -> T:
    """Run one call; a gRPC error prints its status and details and exits 1."""
    tls = None
    if conn.tls_ca or conn.tls_cert or conn.tls_key:
        tls = Tls(conn.tls_ca, conn.tls_cert, conn.tls_key)
    try:
        client = PolyglotClient(conn.server, conn.api_key, tls=tls)
    except (OSError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    with client:
        try:
            return action(client)
        except ValueError as exc:  # an option the client refuses before calling (`--format iob`)
            err.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(code=2) from exc
        except PolyglotError as exc:
            where = f" (request id {exc.request_id})" if exc.request_id else ""
            err.print(f"[bold red]error:[/] {exc.status.name}: {escape(exc.message)}{escape(where)}")
            raise typer.Exit(code=1) from exc


_FILE_FORMATS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
}


def _read(path: Path) -> str:
    """A file's text as it is (line endings kept)."""
    with path.open(encoding="utf-8", newline="") as handle:
        return handle.read()


def _json(reply: Message) -> None:
    """The reply as JSON on stdout, as it is (no markup, no wrapping, not escaped to ASCII)."""
    text = json_format.MessageToJson(reply, always_print_fields_with_no_presence=True, ensure_ascii=False)
    typer.echo(text)


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    """Add the client commands to the `pgw` app (and `pgw models list`)."""

    @app.command("translate")
    @_connected
    def translate(
        texts: Annotated[list[str], typer.Argument(help="Texts to translate.")],
        to: Annotated[str, typer.Option("--to", help="Target language: FLORES-200 code or ISO 639-1.")],
        source: Annotated[
            str, typer.Option("--from", help="Source language; auto: each text's, detected.")
        ] = "eng_Latn",
        beam: Annotated[int, typer.Option(help="Beam size (1: greedy).")] = 1,
        max_new_tokens: Annotated[int, typer.Option(help="0: the server's limit.")] = 0,
        model: Model = "",
        as_json: AsJson = False,
        conn: Connection = CONNECTION,
    ) -> None:
        """Translate texts."""
        reply = _call(
            conn,
            lambda c: c.translate(
                texts, to, source_lang=source, beam_size=beam, max_new_tokens=max_new_tokens, model=model
            ),
        )
        if as_json:
            return _json(reply)
        for text, translation in zip(texts, reply.translations, strict=True):
            out.print(f"[dim]{reply.source_lang}:[/] {escape(text)}")
            out.print(f"[bold]{reply.target_lang}:[/] {escape(translation.hypotheses[0].text)}")
        out.print(f"[dim]{escape(reply.model)}, {reply.timing.total_ms:.1f} ms[/]")

    @app.command("translate-file")
    @_connected
    def translate_file(
        path: Annotated[Path, typer.Argument(help="The document: text, Markdown or HTML (by extension).")],
        to: Annotated[str, typer.Option("--to", help="Target language: FLORES-200 code or ISO 639-1.")],
        source: Annotated[
            str, typer.Option("--from", help="Source language; auto: each sentence's, detected.")
        ] = "auto",
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
        ] = None,
        format: Annotated[
            str, typer.Option(help="text, markdown or html; default: from the extension.")
        ] = "",
        beam: Annotated[int, typer.Option(help="Beam size (1: greedy).")] = 1,
        max_new_tokens: Annotated[int, typer.Option(help="Per sentence; 0: the server's limit.")] = 0,
        model: Model = "",
        as_json: AsJson = False,
        conn: Connection = CONNECTION,
    ) -> None:
        """Translate a document, keeping its structure, with a progress bar per sentence."""
        try:
            document = _read(path)
        except (OSError, UnicodeDecodeError) as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(code=2) from exc
        kind = format or _FILE_FORMATS.get(path.suffix.lower(), "text")

        def run(client: PolyglotClient) -> pb.TranslateDocumentResponse:
            request = translate_document_request(
                document, to, cast(DocumentFormat, kind), source, model, beam
            )
            with Progress(console=err, transient=True) as progress:
                bar = progress.add_task(f"translating {path.name}", total=None)
                for message in client.translate_document_stream(request, timeout=None):
                    progress.update(bar, completed=message.done, total=message.total)
                    if message.HasField("result"):
                        return message.result
            err.print("[bold red]error:[/] the server ended the stream without the document")
            raise typer.Exit(code=1)

        reply = _call(conn, run)
        if as_json:
            return _json(reply)
        if output is None:
            typer.echo(reply.document, nl=False)
        else:
            with output.open("w", encoding="utf-8", newline="") as handle:
                handle.write(reply.document)
        kept = sum(s.kept for s in reply.sentences)
        err.print(
            f"[dim]{len(reply.sentences)} sentences ({kept} kept) in {reply.timing.total_ms / 1000:.1f} s, "
            f"{escape(reply.model)}[/]"
        )

    @app.command("segment")
    @_connected
    def segment(
        texts: Annotated[list[str], typer.Argument(help="Texts to split into sentences.")],
        threshold: Annotated[float | None, typer.Option(help="Boundary probability threshold.")] = None,
        max_length: Annotated[int, typer.Option(help="Max characters per sentence (0: none).")] = 0,
        wtpsplit_compat: Annotated[
            bool, typer.Option(help="wtpsplit's SaT.split segments (newlines dropped).")
        ] = False,
        strip_whitespace: Annotated[bool, typer.Option(help="Strip each sentence.")] = False,
        model: Model = "",
        as_json: AsJson = False,
        conn: Connection = CONNECTION,
    ) -> None:
        """Split texts into sentences (one per line, numbered per text)."""
        reply = _call(
            conn,
            lambda c: c.segment(
                texts,
                model=model,
                threshold=threshold,
                max_length=max_length,
                wtpsplit_compat=wtpsplit_compat,
                strip_whitespace=strip_whitespace,
            ),
        )
        if as_json:
            return _json(reply)
        for number, result in enumerate(reply.results, 1):
            if len(texts) > 1:
                out.print(f"[bold]text {number}[/]")
            for index, sentence in enumerate(result.sentences, 1):
                out.print(f"{index:>3}  {escape(sentence.text.strip())}")

    @app.command("classify")
    @_connected
    def classify(
        texts: Annotated[list[str], typer.Argument(help="Texts to label.")],
        format: Annotated[str, typer.Option(help="labels, bio or bioes.")] = "labels",
        scores: Annotated[str, typer.Option(help="none, logits or probabilities.")] = "none",
        chunk: Annotated[
            bool, typer.Option(help="Label long texts whole (overlapping windows) instead of cutting them.")
        ] = False,
        model: Model = "",
        as_json: AsJson = False,
        conn: Connection = CONNECTION,
    ) -> None:
        """Per-token labels as a table, and the spans they form."""
        reply = _call(
            conn,
            lambda c: c.classify(
                texts,
                model=model,
                format=format,  # type: ignore[arg-type]
                scores=scores,  # type: ignore[arg-type]
                long_input="chunk" if chunk else "truncate",
            ),
        )
        if as_json:
            return _json(reply)
        for text, result in zip(texts, reply.results, strict=True):
            table = Table(title=Text(text if len(text) < 80 else text[:77] + "..."))
            for column in (
                "token",
                "start",
                "end",
                "label",
                "score",
                *(["scores"] if scores != "none" else []),
            ):
                table.add_column(column)
            for token in result.tokens:
                extra = [" ".join(f"{v:.3f}" for v in token.scores)] if scores != "none" else []
                table.add_row(
                    Text(repr(token.token)),
                    str(token.start),
                    str(token.end),
                    Text(token.label),
                    f"{token.score:.3f}",
                    *extra,
                )
            out.print(table)
            for span in result.spans:
                where = f"[{span.start}:{span.end}]"
                out.print(Text(f"  {span.label} {where} {span.text!r} ({span.score:.3f})"))

    @app.command("embed")
    @_connected
    def embed(
        texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
        pooling: Annotated[str, typer.Option(help="mean or cls.")] = "mean",
        normalize: Annotated[bool, typer.Option(help="L2-normalize the vectors.")] = False,
        model: Model = "",
        as_json: AsJson = False,
        conn: Connection = CONNECTION,
    ) -> None:
        """Embed texts; prints dimensions and the first values (or --json)."""
        reply = _call(
            conn,
            lambda c: c.embed(texts, model=model, pooling=pooling, normalize=normalize),  # type: ignore[arg-type]
        )
        if as_json:
            return _json(reply)
        matrix = vectors(reply)
        for text, row in zip(texts, matrix, strict=True):
            head = ", ".join(f"{v:.4f}" for v in row[:6])
            out.print(Text(f"{text[:40]!r}: [{head}, ...] ({reply.dimensions} dims)"))

    @app.command("fill-mask")
    @_connected
    def fill_mask(
        texts: Annotated[list[str], typer.Argument(help="Texts with mask tokens, e.g. [MASK].")],
        top_k: Annotated[int, typer.Option(help="Predictions per mask.")] = 5,
        model: Model = "",
        as_json: AsJson = False,
        conn: Connection = CONNECTION,
    ) -> None:
        """Predict the masked tokens."""
        reply = _call(
            conn,
            lambda c: c.fill_mask(texts, model=model, top_k=top_k),
        )
        if as_json:
            return _json(reply)
        for text, result in zip(texts, reply.results, strict=True):
            out.print(Text(text, style="bold"))
            for mask in result.masks:
                guesses = ", ".join(f"{p.token} ({p.score:.3f})" for p in mask.predictions)
                out.print(Text(f"  [{mask.start}:{mask.end}] {guesses}"))

    @app.command("detect")
    @_connected
    def detect(
        texts: Annotated[list[str], typer.Argument(help="Texts whose language to detect.")],
        top_k: Annotated[int, typer.Option(help="Candidates per text.")] = 3,
        as_json: AsJson = False,
        conn: Connection = CONNECTION,
    ) -> None:
        """Detect each text's language (FLORES-200 code, ISO code and probability)."""
        reply = _call(
            conn,
            lambda c: c.detect_language(texts, top_k=top_k),
        )
        if as_json:
            return _json(reply)
        for text, result in zip(texts, reply.results, strict=True):
            found = ", ".join(
                f"{c.language or '-'} ({c.iso_code}) {c.probability:.3f}" for c in result.candidates
            )
            out.print(Text(f"{text[:40]!r}: {found or 'nothing to detect'}"))

    @models_app.command("list")
    @_connected
    def list_models(
        as_json: AsJson = False,
        conn: Connection = CONNECTION,
    ) -> None:
        """The served models, their variants, devices and accuracy against fp32."""
        reply = _call(conn, lambda c: c.list_models())
        if as_json:
            return _json(reply)
        table = Table(title=Text(f"models on {conn.server}"))
        for column in ("name", "task", "variant", "runs on", "default"):
            table.add_column(column, no_wrap=column in ("name", "variant"))
        for m in reply.models:
            provider = m.provider.removesuffix("ExecutionProvider")
            name = m.name + (" *" if m.random_weights else "")
            table.add_row(
                Text(name),
                m.task,
                m.variant,
                f"{m.backend} {m.device} {provider}",
                "yes" if m.is_default else "",
            )
        out.print(table)
        if any(m.random_weights for m in reply.models):
            out.print("* random-weight demo model: its outputs mean nothing")
        for m in reply.models:
            figures = ", ".join(f"{x.name}={x.value:.4g}" for x in m.accuracy.metrics)
            out.print(Text(f"{m.name} {m.variant} vs {m.accuracy.reference}: {figures}"))
