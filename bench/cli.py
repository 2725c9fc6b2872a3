"""`pgw bench`: run the suite and write bench/results/<date>-<host>/ (JSON, markdown, PNG)."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def bench(
    work: Annotated[
        Path | None,
        typer.Option(help="Checkpoints and exports (built when missing). Default: a cache dir per --size."),
    ] = None,
    size: Annotated[str, typer.Option(help="tiny or full (random weights at the published sizes).")] = "tiny",
    out: Annotated[
        Path | None, typer.Option(help="Results directory (default bench/results/<date>-<host>).")
    ] = None,
    model: Annotated[list[str] | None, typer.Option(help="Models to run (repeatable; default all).")] = None,
    variants: Annotated[
        str | None,
        typer.Option(help="Comma-separated variants. Default: fp32,int8 on cpu; fp16,fp32 on cuda."),
    ] = None,
    seconds: Annotated[float, typer.Option(help="Seconds per load point.")] = 10.0,
    concurrency: Annotated[str, typer.Option(help="Closed-loop concurrency sweep.")] = "1,2,4,8",
    repeats: Annotated[int, typer.Option(help="Baseline timings: median of this many runs.")] = 5,
    baselines: Annotated[
        bool, typer.Option(help="Run the baselines (PyTorch, ONNX Runtime, CTranslate2).")
    ] = True,
    quick: Annotated[
        bool, typer.Option(help="Tiny models, short points: a smoke run of every part.")
    ] = False,
    triton: Annotated[
        bool, typer.Option(help="Also run each model on a local tritonserver (pgw triton's, Python flavor).")
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            help="cpu, or cuda: the gateway and the baselines on the GPU (PyTorch fp16 and fp32, fp16 with a "
            "static cache for translation), with GPU shapes (256x128 saturation, 48->48 translation)."
        ),
    ] = "cpu",
    rewrite_report: Annotated[
        Path | None, typer.Option(help="Only rewrite report.md and plots of this results directory.")
    ] = None,
) -> None:
    """Benchmark the gateway against PyTorch, ONNX Runtime and CTranslate2 on the same inputs."""
    from bench.profiles import MODELS, PROFILES, Settings
    from bench.report import publish
    from bench.suite import run_suite

    if rewrite_report is not None:
        from bench.report import rewrite

        rewrite(rewrite_report)
        return
    chosen = tuple(model or MODELS)
    unknown = [m for m in chosen if m not in MODELS]
    if unknown or size not in ("tiny", "full") or device not in PROFILES:
        console.print(
            f"[bold red]error:[/] models must be among {', '.join(MODELS)}; --size tiny or full; "
            f"--device {' or '.join(PROFILES)}"
        )
        raise typer.Exit(1)
    on_gpu = PROFILES[device].device == "cuda"
    if on_gpu:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            console.print(
                "[bold red]error:[/] --device cuda needs an onnxruntime with the CUDAExecutionProvider "
                "(pip install 'polyglot-gateway[gpu]'); this one has "
                f"{', '.join(onnxruntime.get_available_providers())}"
            )
            raise typer.Exit(1)
    if on_gpu and triton:
        console.print("[bold red]error:[/] --triton runs nvidia-pytriton's CPU tritonserver: not with cuda")
        raise typer.Exit(1)
    if quick:
        size, seconds, repeats, concurrency = "tiny", 0.6, 2, "1,4"
    from gateway.config import cache_dir

    work = work or cache_dir() / f"bench-{size}"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    suffix = f"{'-cuda' if device == 'cuda' else ''}{'-quick' if quick else ''}"
    out = out or Path("bench/results") / f"{stamp}-{platform.node()}{suffix}"
    chosen_variants = variants.split(",") if variants else PROFILES[device].variants
    settings = Settings(
        work=work,
        out=out,
        models=chosen,
        variants=tuple(v.strip() for v in chosen_variants if v.strip()),
        seconds=seconds,
        concurrency=tuple(int(c) for c in concurrency.split(",")),
        repeats=repeats,
        warmup=2 if quick else 5,
        shape_concurrency=(1,) if quick else (1, 2),
        poisson=(0.5,) if quick else (0.5, 0.8),
        baselines=baselines,
        size=size,
        triton=triton,
        device=device,
    )
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bar = progress.add_task("benchmark", total=None)

        def step(description: str) -> None:
            progress.update(bar, description=description, advance=1)

        results = run_suite(settings, step)
    publish(results, out)
    console.print(f"results: {out}/results.json, report.md and plots ({results.meta['seconds']} s)")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
