"""`pgw`: the command line. Export commands import torch lazily, so serving never loads it."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway.cli_client import register as register_client_commands
from gateway.cli_triton import (
    DelayOption,
    FlavorOption,
    InstancesOption,
    KindOption,
    MaxBatchOption,
    NameOption,
    TensorrtOption,
)
from gateway.cli_triton import register as register_triton_commands
from gateway.cli_triton import repo as write_triton_repo
from gateway.errors import GatewayError
from gateway.manifest import TASKS, VARIANTS, VariantName

if TYPE_CHECKING:
    from gateway.config import ModelConfig

app = typer.Typer(
    name="pgw", help="Polyglot Gateway: multilingual NLP models over gRPC.", no_args_is_help=True
)


def _version(asked: bool) -> None:
    if asked:
        from gateway import __version__

        typer.echo(f"pgw {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Polyglot Gateway: multilingual NLP models over gRPC."""


models_app = typer.Typer(help="Build and inspect model checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True, soft_wrap=True)  # an error stays one line


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    """One line naming the problem; exit code 1, or 2 for a usage error (a bad flag or setting)."""
    console.print(f"[bold red]error:[/] {escape(str(exc))}")
    return typer.Exit(code=code)


def _usage(message: str) -> typer.Exit:
    return _fail(ValueError(message), code=2)


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@models_app.command("demo")
def models_demo(
    directory: Annotated[
        Path, typer.Argument(help="Where to write sat-demo/, distilbert-demo/, nllb-demo/.")
    ],
    size: Annotated[str, typer.Option(help="tiny (seconds to build) or full (published sizes).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    only: Annotated[list[str] | None, typer.Option(help="Build only these (repeatable).")] = None,
) -> None:
    """Build random-weight demo checkpoints of the served architectures, with trained tokenizers."""
    from gateway.export.demo import BUILDERS, DEMO_NAMES

    if size not in ("tiny", "full"):
        raise _usage("--size must be tiny or full")
    names = only or list(DEMO_NAMES)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise _usage(f"unknown demo model {unknown}; choose from {', '.join(DEMO_NAMES)}")
    with _progress() as progress:
        bar = progress.add_task("demo models", total=len(names))
        for name in names:
            progress.update(bar, description=f"building {name} ({size})")
            path = BUILDERS[name](directory, size, seed)  # type: ignore[arg-type]
            progress.advance(bar)
            progress.console.print(f"{name}: {path}")


@app.command("export")
def export(
    model: Annotated[
        str, typer.Argument(help="A Hugging Face model directory, or a hub id in the local cache.")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Output directory (replaced).")],
    task: Annotated[str, typer.Option(help=f"One of {', '.join(TASKS)}.")],
    variants: Annotated[
        str, typer.Option(help=f"Comma-separated subset of {','.join(VARIANTS)}.")
    ] = "fp32,int8",
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer directory or cached hub id, for checkpoints without one.")
    ] = None,
    min_cosine: Annotated[float, typer.Option(help="Embedding bound: min cosine vs PyTorch fp32.")] = 0.99,
    min_agreement: Annotated[
        float, typer.Option(help="Label / top-1 / greedy-token agreement bound vs PyTorch fp32.")
    ] = 0.95,
    enforce_bounds: Annotated[
        bool | None,
        typer.Option(
            "--enforce-bounds/--record-only",
            help="Fail outside the bounds. Default: enforce on real checkpoints, record on demo ones.",
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Translation: the server's cap on new tokens.")] = 256,
    triton: Annotated[
        Path | None, typer.Option(help="Also write Triton model directories into this model repository.")
    ] = None,
    triton_flavor: FlavorOption = "onnxruntime",
    triton_kind: KindOption = "auto",
    triton_instances: InstancesOption = 1,
    triton_max_batch_size: MaxBatchOption = 32,
    triton_delay_us: DelayOption = 2000,
    triton_tensorrt: TensorrtOption = False,
    triton_name: NameOption = None,
) -> None:
    """Export a checkpoint to ONNX variants with a manifest and an accuracy report per variant."""
    from gateway.export.accuracy import Bounds
    from gateway.export.exporter import ExportOptions, export_model

    if task not in TASKS:
        raise _usage(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    try:
        options = ExportOptions(
            task=task,
            variants=tuple(cast(VariantName, v.strip()) for v in variants.split(",") if v.strip()),
            tokenizer=tokenizer,
            bounds=Bounds(min_cosine=min_cosine, min_agreement=min_agreement),
            enforce_bounds=enforce_bounds,
            max_new_tokens=max_new_tokens,
        )
        steps = options.steps()
        with _progress() as progress:
            bar = progress.add_task(steps[0], total=len(steps))
            seen: list[str] = []

            def on_step(step: str) -> None:
                if seen:
                    progress.advance(bar)
                seen.append(step)
                progress.update(bar, description=step)

            manifest = export_model(model, out_dir, options, on_step)
            progress.advance(bar)
    except GatewayError as exc:
        raise _fail(exc) from exc
    table = Table(title=f"{manifest.task} export of {manifest.source.name} -> {out_dir}")
    for column in ("variant", "size MB", "seconds", "accuracy vs PyTorch fp32", "passed"):
        table.add_column(column)
    for name, variant in manifest.variants.items():
        report = variant.accuracy
        figures = ", ".join(f"{k}={v:.4g}" for k, v in report.metrics.items()) if report else ""
        table.add_row(
            name,
            f"{variant.size_bytes / 1e6:.1f}",
            f"{variant.export_seconds:.1f}",
            figures or (report.note if report else ""),
            str(report.passed) if report and report.bounds else "recorded",
        )
    Console().print(table)
    if triton is not None:
        write_triton_repo(
            out_dir,
            triton,
            flavor=triton_flavor,
            kind=triton_kind,
            instances=triton_instances,
            max_batch_size=triton_max_batch_size,
            delay_us=triton_delay_us,
            tensorrt=triton_tensorrt,
            name=triton_name,
        )


def _served_model(entry: str, variant: str | None) -> ModelConfig:
    """NAME=EXPORT_DIR[:VARIANT]; a directory whose name ends in ':fp32' needs --variant or the config."""
    from gateway.config import ModelConfig

    name, equals, path = entry.partition("=")
    if not equals or not name or not path:
        raise ValueError(f"--model takes NAME=EXPORT_DIR[:VARIANT], not {entry[:100]!r}")
    head, colon, tail = path.rpartition(":")
    if colon and tail in VARIANTS:
        path, variant = head, tail
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant {variant[:100]!r}: choose fp32, fp16 or int8")
    return ModelConfig(name=name, path=Path(path), variant=variant)


@app.command("serve")
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML config file (see README).")] = None,
    demo: Annotated[
        bool, typer.Option(help="Build, export and serve the demo models (cached after the first run).")
    ] = False,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=EXPORT_DIR[:VARIANT] to serve (repeatable; VARIANT fp32, fp16 or int8); replaces "
            "the file's list."
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(help="Variant of every --model without its own (default: int8 on CPU, fp16 on GPU)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="gRPC address to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (default 50051).")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (default 9464, 0: off).")
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            help="HTTP/JSON port: OpenAI and LibreTranslate APIs, JSON routes (default 8080, 0: off)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve TLS: the server's certificate chain (PEM); needs --tls-key.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="Require client certificates signed by this CA (mutual TLS).")
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="API keys, one per line, re-read on SIGHUP (one key: env PGW_API_KEY)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "INFO",
) -> None:
    """Serve exported models over gRPC and HTTP/JSON (settings: file < PGW_* environment < flags)."""
    import asyncio
    import logging

    from gateway.config import ServerConfig
    from gateway.server import serve as run_server

    # Our logs at the asked level; libraries (ONNX Runtime's quantizer talks at INFO) at warnings only.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gateway").setLevel(log_level.upper())
    models = None
    if model:
        try:
            models = tuple(_served_model(entry, variant) for entry in model)
        except ValueError as exc:
            raise _fail(exc, code=2) from exc
    elif variant:
        raise _usage("--variant applies to --model entries; give the variant in the config file")
    if (tls_cert is None) != (tls_key is None) or (tls_client_ca is not None and tls_cert is None):
        raise _usage("TLS needs --tls-cert and --tls-key together (--tls-client-ca adds to them)")
    tls = None if tls_cert is None else {"cert": tls_cert, "key": tls_key, "client_ca": tls_client_ca}
    try:
        settings = ServerConfig.load(
            config,
            demo=demo or None,
            models=models,
            host=host,
            port=port,
            metrics_port=metrics_port,
            http_port=http_port,
            device=device,
            tls=tls,
            api_key_file=api_key_file,
        )
    except GatewayError as exc:  # the file, the environment or a flag
        raise _fail(exc, code=2) from exc
    try:
        asyncio.run(run_server(settings))
    except GatewayError as exc:
        raise _fail(exc) from exc


def _register_plugins(app: typer.Typer) -> None:
    """Commands other packages add to `pgw` (`pgw bench`, from bench/) through the entry points of the
    group `polyglot_gateway.commands`: each names a function that takes the app."""
    for entry in entry_points(group="polyglot_gateway.commands"):
        try:
            register = entry.load()
        except ImportError:  # pragma: no cover - an install without that command's package
            continue
        register(app)


register_client_commands(app, models_app)
register_triton_commands(app)
_register_plugins(app)


def main() -> None:
    app()
