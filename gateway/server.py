"""Wiring: config -> models -> registry -> gRPC server with health, reflection, metrics and a graceful stop.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING, in-flight requests finish within the grace period,
the batchers drain, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.backends.onnxruntime import OrtSettings
from gateway.config import ModelConfig, ServerConfig
from gateway.decoding.engine import Engine
from gateway.errors import InvalidInput
from gateway.export.demo import DEMO_MODELS
from gateway.interceptors import GatewayInterceptor
from gateway.manifest import is_current
from gateway.metrics import Metrics
from gateway.offload import behind_the_loop
from gateway.pb.polyglot.v1 import polyglot_pb2, polyglot_pb2_grpc
from gateway.registry import Registry, Served, TaskModel
from gateway.runtime import LoadedModel, load_model, load_triton_model
from gateway.servicer import PolyglotServicer
from gateway.tasks.base import BatchedTask
from gateway.tasks.embedding import EmbeddingModel
from gateway.tasks.fill_mask import FillMaskModel
from gateway.tasks.token_classification import TokenClassificationModel
from gateway.tasks.translation import TranslationModel

if TYPE_CHECKING:
    from gateway.backends.triton import TritonPool
    from gateway.web.app import HttpServer

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 0.25  # how often the event loop proves it runs, for /healthz
# /healthz fails when the event loop has not run the heartbeat for this long (a stuck loop)
LIVENESS_SECONDS = 10.0
SERVICE = polyglot_pb2.DESCRIPTOR.services_by_name["Polyglot"].full_name


def prepare_demo(directory: Path) -> tuple[ModelConfig, ...]:
    """Build and export the tiny demo models under `directory` on first use (needs the export extra)."""
    exports = directory / "exports"
    missing = [demo for demo in DEMO_MODELS if not is_current(exports / demo.name)]
    if missing:
        try:
            from gateway.export.demo import build_demo_models
            from gateway.export.exporter import ExportOptions, export_model
        except ImportError as exc:
            raise InvalidInput(
                "--demo builds its models with PyTorch: pip install 'polyglot-gateway[export]'"
            ) from exc
        checkpoints = directory / "checkpoints"
        build_demo_models(checkpoints, "tiny", seed=0, names=sorted({demo.checkpoint for demo in missing}))
        for demo in missing:
            log.info("exporting demo model %s (%s)", demo.name, demo.task)
            export_model(
                checkpoints / demo.checkpoint,
                exports / demo.name,
                ExportOptions(task=demo.task, variants=("fp32", "int8")),
            )
    return tuple(ModelConfig(name=demo.name, path=exports / demo.name) for demo in DEMO_MODELS)


def _task_model(loaded: LoadedModel, config: ServerConfig, model: ModelConfig, metrics: Metrics) -> TaskModel:
    settings = (model.batching or config.batching).settings(
        remote=model.backend == "triton", device=model.device or config.device
    )
    observer = metrics.batch_observer(model.name, loaded.variant.name)
    limits = config.limits.text_limits()
    if model.max_in_flight is not None:
        limits = dataclasses.replace(limits, max_in_flight=model.max_in_flight)
    task = loaded.manifest.task
    if task == "translation":
        batching = model.batching or config.batching
        return TranslationModel(
            loaded,
            settings,
            observer,
            limits,
            max_new_tokens=config.limits.max_new_tokens,
            scheduling=batching.scheduling,
            kv_cache=batching.kv_cache,
            engine_observer=metrics.engine_observer(model.name, loaded.variant.name),
        )
    if task == "token-classification":
        return TokenClassificationModel(loaded, settings, observer, limits)
    if task == "embedding":
        return EmbeddingModel(loaded, settings, observer, limits)
    return FillMaskModel(loaded, settings, observer, limits)


def _depth(task: BatchedTask[Any, Any]) -> int:
    return task.queue_depth


def _rows(engine: Engine) -> int:
    return engine.rows_in_flight


def triton_pool(config: ServerConfig) -> TritonPool | None:
    """The server's one pool of Triton endpoints, when a model runs there (tritonclient is the triton
    extra)."""
    if not any(model.backend == "triton" for model in config.models):
        return None
    try:
        from gateway.backends.triton import TritonPool
    except ImportError as exc:
        raise InvalidInput(
            "backend: triton needs tritonclient: pip install 'polyglot-gateway[triton]'"
        ) from exc
    t = config.triton
    return TritonPool(t.endpoints, t.health_interval_s, t.timeout_s)


def build_registry(config: ServerConfig, metrics: Metrics, triton: TritonPool | None = None) -> Registry:
    """Load every configured model and its task model (not started); `triton`: the pool the models with
    backend triton use."""
    models = config.models + (prepare_demo(config.demo_dir) if config.demo else ())
    if not models:
        raise InvalidInput("no models to serve: list them in the config file (models:) or pass --demo")
    registry = Registry()
    local_cpu = [m for m in models if m.backend == "onnxruntime" and (m.device or config.device) == "cpu"]
    for model in models:
        if model.backend == "triton":
            assert triton is not None, "triton_pool(config) makes the pool of the models on Triton"
            loaded = load_triton_model(model.name, model.path, triton, model.variant, model.triton_model)
        else:
            device = model.device or config.device
            spinning = model.spinning if model.spinning is not None else local_cpu == [model]
            settings = OrtSettings(
                device=device,
                intra_op_threads=config.intra_op_threads,
                tensorrt=config.tensorrt,
                spinning=spinning,
            )
            executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"ort-{model.name}", initializer=behind_the_loop
            )
            loaded = load_model(model.name, model.path, settings, model.variant, executor)
        loaded.tokenizer.observer = metrics.tokenization_seconds.labels(model.name).observe
        task_model = _task_model(loaded, config, model, metrics)
        registry.add(Served(model.name, task_model, model.default))
        d = task_model.describe()
        metrics.set_model_info(model.name, d.task, d.variant, d.backend, d.device, d.provider)
        metrics.track_queue_depth(model.name, loaded.variant.name, partial(_depth, task_model))
        if isinstance(task_model, TranslationModel) and task_model.engine is not None:
            metrics.track_engine_rows(model.name, loaded.variant.name, partial(_rows, task_model.engine))
        log.info(
            "model %s: task %s, variant %s, %s on %s (%s)%s",
            model.name,
            d.task,
            d.variant,
            d.backend,
            d.device,
            d.provider,
            ", random weights (demo)" if d.random_weights else "",
        )
    return registry


class _Health(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health has no types
    """grpc's health service, with `List` (every service's status) as well as Check and Watch."""

    def __init__(self) -> None:
        super().__init__()
        self._listed: dict[str, Any] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._final = False  # shutting down: every status is NOT_SERVING for good, as in Check

    async def set(self, service: str, status: Any) -> None:
        if not self._final:
            self._listed[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        if not self._final:
            self._final = True
            self._listed = dict.fromkeys(self._listed, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()

    async def List(  # noqa: N802 - the rpc's name
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        listed = {
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._listed.items()
        }
        return health_pb2.HealthListResponse(statuses=listed)


def _reflection_v1(names: tuple[str, ...]) -> grpc.GenericRpcHandler:
    """Reflection v1 (what grpcurl and newer tools ask first) beside v1alpha: the two protocols have the
    same messages under another package, so v1alpha's servicer answers both."""
    from grpc_reflection.v1alpha import reflection_pb2

    servicer = reflection.aio.ReflectionServicer(names)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        "grpc.reflection.v1.ServerReflection", {"ServerReflectionInfo": method}
    )


class GatewayServer:
    """The running gateway: start, serve, stop gracefully."""

    def __init__(
        self, config: ServerConfig, registry: Registry | None = None, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.keys = ApiKeys(config.api_key, config.api_key_file)
        self.metrics = metrics or Metrics()
        self.triton = triton_pool(config) if registry is None else None
        self.registry = registry or build_registry(config, self.metrics, self.triton)
        self.admission = Admission(config.limits.max_in_flight)
        self.health = _Health()
        interceptor = GatewayInterceptor(self.metrics, self.keys, self.admission)
        self.server = aio.server(
            interceptors=[interceptor],
            options=[
                # A request is parsed only when it can be within the limits (a few MB by default).
                ("grpc.max_receive_message_length", config.limits.max_message_bytes),
                # Never share a port with another process: a second server on it must fail, not split
                # the connections with the first.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.servicer = PolyglotServicer(
            self.registry, config.limits.text_limits(), config.limits.document_limits()
        )
        polyglot_pb2_grpc.add_PolyglotServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.server.add_generic_rpc_handlers((_reflection_v1(names),))
        self.port = 0
        self._serving: dict[str, bool] = {}
        # Model health follows readiness: the Triton pool says when it changes (in-process models are
        # always ready).
        self._readiness_changed = asyncio.Event()
        if self.triton is not None:
            self.triton.on_change(self._readiness_changed.set)
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_metrics: Callable[[], None] | None = None
        self.http: HttpServer | None = None
        self.http_port = 0
        self._stopping = False
        self._started = False
        self._beat = time.monotonic()  # the health watch's last run, for /healthz
        self._drain_over = asyncio.Event()
        self._stopped = asyncio.Event()

    def _bind(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        tls = self.config.tls
        try:
            if tls is None:
                port = self.server.add_insecure_port(address)
            else:
                ca = tls.client_ca.read_bytes() if tls.client_ca else None
                credentials = grpc.ssl_server_credentials(
                    [(tls.key.read_bytes(), tls.cert.read_bytes())],
                    root_certificates=ca,
                    require_client_auth=ca is not None,
                )
                port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise InvalidInput(
                f"cannot listen on {address}: {exc}; is another server using the port?"
            ) from exc
        if not port:
            raise InvalidInput(f"cannot listen on {address}: is another server using the port?")
        return int(port)

    async def start(self) -> int:
        """Start the models and the server; returns the bound gRPC port."""
        self.port = self._bind()
        if self.config.http_port:
            self.http = self._http()
            self.http.bind()
        if self.config.metrics_port:
            self._stop_metrics = self.metrics.serve_http(
                self.config.metrics_host,
                self.config.metrics_port,
                self.config.tls,
                {"/healthz": self._liveness, "/readyz": self._readiness},
            )
        await self.registry.start()
        await self.server.start()
        if self.http is not None:
            self.http_port = await self.http.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE, serving)
        await self._update_health()
        self._tasks = [
            asyncio.create_task(self._follow_readiness(), name="model-health"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        self._beat = time.monotonic()  # loading the models took what it took: the heartbeat starts now
        self._started = True
        self._log_security()
        log.info("serving %s on %s:%d", SERVICE, self.config.host, self.port)
        if self.http is not None:
            log.info("serving HTTP/JSON on %s:%d", self.config.host, self.http_port)
        return self.port

    def _http(self) -> HttpServer:
        from gateway.web import build_http_app
        from gateway.web.app import HttpServer

        app = build_http_app(
            self.servicer,
            self.registry,
            self.metrics,
            self.keys,
            self.admission,
            {"/healthz": self._liveness, "/readyz": self._readiness},
            self.config.limits.max_http_body_bytes,
        )
        return HttpServer(
            app,
            self.config.host,
            self.config.http_port,
            self.config.tls,
            self.config.grace_seconds,
            # connections and requests at once: the server's in-flight bound, and room to refuse beyond it
            max_connections=self.config.limits.max_in_flight + 64,
        )

    def _log_security(self) -> None:
        tls, keys = self.config.tls, self.keys
        if keys.enabled:
            where = f", file {keys.file} (re-read on SIGHUP)" if keys.file else ""
            log.info("auth: API keys required (%d keys%s)", len(keys), where)
        else:
            log.info("auth: off (no api_key or api_key_file)")
        if tls is None:
            log.info("TLS: off")
        else:
            log.info("TLS: on%s", ", client certificates required (mutual TLS)" if tls.client_ca else "")
        if tls is None and not keys.enabled and self.config.host in ("0.0.0.0", "::", "[::]", ""):
            log.warning(
                "listening on every interface with neither TLS nor an API key: anyone who can reach this "
                "machine can use the models. Use --host 127.0.0.1 for local use, or configure tls and "
                "api_key / api_key_file."
            )

    async def _update_health(self) -> None:
        """Each model's health follows its backend: NOT_SERVING while Triton has it nowhere ready."""
        for entry in self.registry.all():
            ready = entry.model.ready
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

    async def _follow_readiness(self) -> None:
        while True:
            await self._readiness_changed.wait()
            self._readiness_changed.clear()
            await self._update_health()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            self._beat = time.monotonic()

    def _liveness(self) -> tuple[bool, dict[str, object]]:
        """/healthz (from the metrics thread): the event loop still runs; a server shutting down is alive."""
        since = time.monotonic() - self._beat
        alive = self._stopping or not self._started or since < LIVENESS_SECONDS
        return alive, {"alive": alive, "event_loop_seconds_since_check": round(since, 3)}

    def _readiness(self) -> tuple[bool, dict[str, object]]:
        """/readyz (from the metrics thread): started, not shutting down, and every model ready."""
        models = dict(self._serving)
        ready = self._started and not self._stopping and all(models.values())
        return ready, {"ready": ready, "shutting_down": self._stopping, "models": models}

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Health NOT_SERVING; keep taking requests for `drain` seconds (so that load balancers notice; a
        second call ends the drain at once); then take no new ones and let the accepted ones finish within
        `grace` seconds; release the models. Defaults: the config's drain_seconds and grace_seconds."""
        if self._stopping:  # a second signal: end the drain now
            self._drain_over.set()
            await self._stopped.wait()
            return
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        drain = self.config.drain_seconds if drain is None else drain
        grace = self.config.grace_seconds if grace is None else grace
        if drain > 0:
            log.info("shutting down: health NOT_SERVING, still taking requests for %.1f s", drain)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_over.wait(), drain)
        self.admission.stop_accepting()
        started = time.monotonic()
        log.info("shutting down: no new requests; %d in flight", self.admission.in_flight)
        if not await self.admission.wait_idle(grace):
            log.warning(
                "shutting down: %d requests still running after the %.1f s grace are cancelled",
                self.admission.in_flight,
                grace,
            )
        await self.server.stop(max(0.0, grace - (time.monotonic() - started)))
        if self.http is not None:
            await self.http.stop()
        await self.registry.close()
        if self.triton is not None:
            await self.triton.close()
        if self._stop_metrics is not None:
            self._stop_metrics()
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM (drain, then stop) or SIGINT (stop without the drain); a second signal ends a
    drain at once; SIGHUP re-reads the API key file."""
    server = GatewayServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop()))
    loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(server.stop(drain=0)))
    loop.add_signal_handler(signal.SIGHUP, server.keys.reload)
    await server.wait()
