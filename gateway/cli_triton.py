"""`pgw triton …`: model repositories and a local tritonserver; also the `--triton-*` options of export."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.console import Console

from gateway.errors import GatewayError

console = Console(stderr=True, soft_wrap=True)
triton_app = typer.Typer(
    help="Triton Inference Server: model repositories and a local server.", no_args_is_help=True
)

# Options shared by `pgw export --triton` and `pgw triton repo`.
FlavorOption = Annotated[
    str,
    typer.Option(
        "--triton-flavor",
        help="onnxruntime: encoders on Triton's ONNX Runtime backend; python: every model on the Python "
        "backend (Triton builds without ONNX Runtime, such as nvidia-pytriton's). Translation is always "
        "python.",
    ),
]
KindOption = Annotated[
    str, typer.Option("--triton-kind", help="auto (fp16 on GPU, others on CPU), cpu or gpu instances.")
]
InstancesOption = Annotated[int, typer.Option("--triton-instances", help="Model instances per device.")]
MaxBatchOption = Annotated[int, typer.Option("--triton-max-batch-size", help="Triton's max_batch_size.")]
DelayOption = Annotated[
    int, typer.Option("--triton-delay-us", help="Dynamic batcher: max_queue_delay_microseconds.")
]
TensorrtOption = Annotated[
    bool,
    typer.Option("--triton-tensorrt", help="fp16 on GPU through the TensorRT accelerator (onnxruntime)."),
]
NameOption = Annotated[
    str | None,
    typer.Option(
        "--triton-name",
        help="Model name in Triton, before -<variant> (default: the export's directory name).",
    ),
]


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=1)


@triton_app.command("repo")
def repo(
    export_dir: Annotated[Path, typer.Argument(help="A directory written by `pgw export`.")],
    repository: Annotated[Path, typer.Argument(help="The Triton model repository to write into.")],
    variants: Annotated[
        str | None, typer.Option(help="Comma-separated variants (default: all exported).")
    ] = None,
    flavor: FlavorOption = "onnxruntime",
    kind: KindOption = "auto",
    instances: InstancesOption = 1,
    max_batch_size: MaxBatchOption = 32,
    delay_us: DelayOption = 2000,
    tensorrt: TensorrtOption = False,
    name: NameOption = None,
) -> None:
    """Write Triton model directories (config.pbtxt and the ONNX files) for an existing export."""
    from gateway.triton.repository import Flavor, Kind, TritonOptions, write_repository

    chosen = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None
    try:
        options = TritonOptions(
            flavor=cast(Flavor, flavor),
            kind=cast(Kind, kind),
            instances=instances,
            max_batch_size=max_batch_size,
            max_queue_delay_us=delay_us,
            tensorrt=tensorrt,
        )
        for directory in write_repository(export_dir, repository, options, name, chosen):
            console.print(f"triton model {directory.name}: {directory}")
    except GatewayError as exc:
        raise _fail(exc) from exc


def _state_dir(given: Path | None) -> Path:
    """The --state-dir, else $XDG_CACHE_HOME/polyglot-gateway/triton (~/.cache/... without it)."""
    from gateway.config import cache_dir

    return given.expanduser() if given is not None else cache_dir() / "triton"


@triton_app.command("up")
def up(
    repository: Annotated[Path, typer.Option(help="Model repository to serve.")] = Path("model_repo"),
    grpc_port: Annotated[int, typer.Option(help="Triton's gRPC port.")] = 8001,
    http_port: Annotated[int, typer.Option(help="Triton's HTTP port (health).")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Triton's Prometheus port.")] = 8002,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Backends, log and pid of the server (default: the cache's triton/)."),
    ] = None,
    tritonserver: Annotated[
        Path | None, typer.Option(help="tritonserver binary (default: nvidia-pytriton's, else PATH).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait until every model is ready.")] = 180.0,
) -> None:
    """Start tritonserver in the background on a model repository and wait until it is ready."""
    from gateway.triton.process import Ports, TritonServer, locate, read_state

    state_dir = _state_dir(state_dir)
    try:
        if read_state(state_dir) is not None:
            raise GatewayError(
                f"a tritonserver started here is recorded in {state_dir}: `pgw triton down` first"
            )
        server = TritonServer(
            repository, state_dir, Ports(grpc_port, http_port, metrics_port), locate(tritonserver)
        )
        started = time.monotonic()
        server.start()
        server.wait_ready(timeout)
        server.save_state()
    except GatewayError as exc:
        raise _fail(exc) from exc
    assert server.process is not None
    console.print(
        f"tritonserver ready in {time.monotonic() - started:.1f} s (pid {server.process.pid}): "
        f"gRPC localhost:{grpc_port}, HTTP localhost:{http_port}, metrics localhost:{metrics_port}/metrics\n"
        f"repository {server.repository}; log {server.log_path}; stop with `pgw triton down`"
    )


@triton_app.command("down")
def down(
    state_dir: Annotated[Path | None, typer.Option(help="As given to `pgw triton up`.")] = None,
) -> None:
    """Stop the tritonserver `pgw triton up` started (SIGTERM, then SIGKILL after 20 s)."""
    from gateway.triton.process import stop_recorded

    pid = stop_recorded(_state_dir(state_dir))
    console.print("no tritonserver recorded" if pid is None else f"tritonserver (pid {pid}) stopped")


def register(app: typer.Typer) -> None:
    app.add_typer(triton_app, name="triton")
