"""Wiring: config -> models -> registry -> gRPC server with health, reflection, metrics and a graceful stop.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING, in-flight requests finish within the grace period,
the batchers drain, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.backends.onnxruntime import OrtSettings
from gateway.batcher import DynamicBatcher
from gateway.config import ModelConfig, ServerConfig
from gateway.errors import InvalidInput
from gateway.interceptors import GatewayInterceptor
from gateway.manifest import Task
from gateway.metrics import Metrics
from gateway.pb.polyglot.v1 import polyglot_pb2, polyglot_pb2_grpc
from gateway.registry import Registry, Served
from gateway.runtime import LoadedModel, load_model, load_triton_model
from gateway.servicer import PolyglotServicer
from gateway.tasks.base import BatchedTask, TextLimits
from gateway.tasks.embedding import EmbeddingModel, FillMaskModel
from gateway.tasks.token_classification import TokenClassificationModel
from gateway.tasks.translation import TranslationModel

if TYPE_CHECKING:
    from gateway.backends.triton import TritonPool

log = logging.getLogger(__name__)
HEALTH_POLL_SECONDS = 0.25  # how often model health follows backend readiness
SERVICE = polyglot_pb2.DESCRIPTOR.services_by_name["Polyglot"].full_name

# The demo models `pgw serve --demo` builds and serves: (served name, demo checkpoint, export task).
DEMO_MODELS: tuple[tuple[str, str, Task], ...] = (
    ("sat-demo", "sat-demo", "token-classification"),
    ("distilbert-demo", "distilbert-demo", "embedding"),
    ("distilbert-demo-fill-mask", "distilbert-demo", "fill-mask"),
    ("nllb-demo", "nllb-demo", "translation"),
)


def prepare_demo(directory: Path) -> tuple[ModelConfig, ...]:
    """Build and export the tiny demo models under `directory` on first use (needs the export extra)."""
    exports = directory / "exports"
    missing = [entry for entry in DEMO_MODELS if not (exports / entry[0] / "manifest.json").is_file()]
    if missing:
        try:
            from gateway.export.demo import build_demo_models
            from gateway.export.exporter import ExportOptions, export_model
        except ImportError as exc:
            raise InvalidInput(
                "--demo builds its models with PyTorch: pip install 'polyglot-gateway[export]'"
            ) from exc
        checkpoints = directory / "checkpoints"
        build_demo_models(checkpoints, "tiny", seed=0, names=sorted({source for _, source, _ in missing}))
        for name, source, task in missing:
            log.info("exporting demo model %s (%s)", name, task)
            export_model(
                checkpoints / source, exports / name, ExportOptions(task=task, variants=("fp32", "int8"))
            )
    return tuple(ModelConfig(name=name, path=exports / name) for name, _, _ in DEMO_MODELS)


def _task_model(
    loaded: LoadedModel, config: ServerConfig, model: ModelConfig, metrics: Metrics
) -> BatchedTask[Any, Any]:
    settings = (model.batching or config.batching).settings(remote=model.backend == "triton")
    observer = metrics.batch_observer(model.name, loaded.variant.name)
    limits = TextLimits(max_texts=config.limits.max_texts, max_chars=config.limits.max_text_chars)
    task = loaded.manifest.task
    if task == "translation":
        return TranslationModel(
            loaded, settings, observer, limits, max_new_tokens=config.limits.max_new_tokens
        )
    if task == "token-classification":
        return TokenClassificationModel(loaded, settings, observer, limits)
    if task == "embedding":
        return EmbeddingModel(loaded, settings, observer, limits)
    return FillMaskModel(loaded, settings, observer, limits)


def _depth(batcher: DynamicBatcher[Any, Any]) -> int:
    return batcher.queue_depth


def _triton_pool(config: ServerConfig, registry: Registry) -> TritonPool:
    """The server's one pool of Triton endpoints, made on first use (tritonclient is the triton extra)."""
    if registry.triton is None:
        try:
            from gateway.backends.triton import TritonPool
        except ImportError as exc:
            raise InvalidInput(
                "backend: triton needs tritonclient: pip install 'polyglot-gateway[triton]'"
            ) from exc
        t = config.triton
        registry.triton = TritonPool(t.endpoints, t.health_interval_s, t.timeout_s)
    return registry.triton


def build_registry(config: ServerConfig, metrics: Metrics) -> Registry:
    """Load every configured model and its task model (batchers not started)."""
    models = config.models + (prepare_demo(config.demo_dir) if config.demo else ())
    if not models:
        raise InvalidInput("no models to serve: list them in the config file (models:) or pass --demo")
    registry = Registry()
    for model in models:
        if model.backend == "triton":
            loaded = load_triton_model(
                model.name, model.path, _triton_pool(config, registry), model.variant, model.triton_model
            )
        else:
            device = model.device or config.device
            settings = OrtSettings(
                device=device, intra_op_threads=config.intra_op_threads, tensorrt=config.tensorrt
            )
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{model.name}")
            loaded = load_model(model.name, model.path, settings, model.variant, executor)
        loaded.tokenizer.observer = metrics.tokenization_seconds.labels(model.name).observe
        task_model = _task_model(loaded, config, model, metrics)
        registry.add(Served(model.name, loaded.manifest.task, loaded, task_model, model.default))
        backend = loaded.backend if "model" in loaded.parts else next(iter(loaded.parts.values()))
        metrics.set_model_info(
            model.name,
            loaded.manifest.task,
            loaded.variant.name,
            backend.name,
            backend.device,
            backend.provider,
        )
        metrics.track_queue_depth(model.name, loaded.variant.name, partial(_depth, task_model.batcher))
        log.info(
            "model %s: task %s, variant %s, %s on %s (%s)%s",
            model.name,
            loaded.manifest.task,
            loaded.variant.name,
            backend.name,
            backend.device,
            backend.provider,
            ", random weights (demo)" if loaded.manifest.source.random_weights else "",
        )
    return registry


class GatewayServer:
    """The running gateway: start, serve, stop gracefully."""

    def __init__(
        self, config: ServerConfig, registry: Registry | None = None, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.registry = registry or build_registry(config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.server = aio.server(
            interceptors=[GatewayInterceptor(self.metrics, self.registry.label, config.api_key)],
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        polyglot_pb2_grpc.add_PolyglotServicer_to_server(PolyglotServicer(self.registry), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = 0
        self._serving: dict[str, bool] = {}
        self._watch: asyncio.Task[None] | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Start the models and the server; returns the bound gRPC port."""
        for entry in self.registry.all():
            await entry.loaded.start()
            entry.model.start()
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self.server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE, serving)
        await self._update_health()
        self._watch = asyncio.create_task(self._watch_health(), name="model-health")
        if self.config.metrics_port:
            self._stop_metrics = self.metrics.serve_http(self.config.metrics_host, self.config.metrics_port)
        log.info("serving %s on %s:%d", SERVICE, self.config.host, self.port)
        return self.port

    async def _update_health(self) -> None:
        """Each model's health follows its backend: NOT_SERVING while Triton has it nowhere ready."""
        for entry in self.registry.all():
            ready = entry.loaded.ready
            if self._serving.get(entry.name) != ready:
                self._serving[entry.name] = ready
                status = health_pb2.HealthCheckResponse
                await self.health.set(
                    f"{SERVICE}/{entry.name}", status.SERVING if ready else status.NOT_SERVING
                )
                log.log(
                    logging.INFO if ready else logging.WARNING,
                    "model %s: %s",
                    entry.name,
                    "ready (health SERVING)" if ready else "not ready (health NOT_SERVING)",
                )

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_SECONDS)
            await self._update_health()

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, let in-flight requests finish, then release the models."""
        if self._stopped.is_set():
            return
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        await self.registry.close()
        if self._stop_metrics is not None:
            self._stop_metrics()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = GatewayServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    await server.wait()
