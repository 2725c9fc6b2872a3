"""Every Prometheus metric of the gateway, in one place.

Stage histograms are labelled by model and variant: request (end to end, per rpc), queue (waiting for a
batch), inference (the runtime), tokenization; batch size and padded batch tokens show how well the batcher
fills batches. Names follow Prometheus conventions (`_seconds`, `_total`).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)

from gateway.batcher import BatchStats
from gateway.decoding.engine import StepStats
from gateway.errors import InvalidInput

if TYPE_CHECKING:
    from gateway.config import TlsConfig

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BATCH_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


@dataclass
class Outcome:
    """Set `code` to the gRPC status name, and `model` to the served model's name once known, before the
    request context closes."""

    code: str = "OK"
    model: str = "-"


_REQUEST: ContextVar[Outcome | None] = ContextVar("pgw_request_outcome", default=None)


def label_request(model: str) -> None:
    """Name the model of the request being served (its metrics label): called where the request's model is
    looked up, so that every request is looked up once."""
    outcome = _REQUEST.get()
    if outcome is not None:
        outcome.model = model


Probe = Callable[[], tuple[bool, dict[str, Any]]]  # (passes, what to say about it)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series beside every counter and histogram
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)
        self.requests = Counter(
            "pgw_requests", "Requests by rpc, model and status code.", ["rpc", "model", "code"], registry=r
        )
        self.requests_in_flight = Gauge(
            "pgw_requests_in_flight", "RPCs admitted and not yet answered.", registry=r
        )
        self.request_seconds = Histogram(
            "pgw_request_duration_seconds",
            "Time from arrival to reply.",
            ["rpc", "model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "pgw_queue_duration_seconds",
            "Time an item waited for its batch.",
            ["model", "variant"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "pgw_inference_duration_seconds",
            "Runtime time of one batch.",
            ["model", "variant"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tokenization_seconds = Histogram(
            "pgw_tokenization_duration_seconds",
            "Time to tokenize one request.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "pgw_batch_size", "Items per batch.", ["model", "variant"], buckets=_BATCH_SIZES, registry=r
        )
        self.batch_tokens = Histogram(
            "pgw_batch_tokens",
            "Padded tokens per batch.",
            ["model", "variant"],
            buckets=_BATCH_TOKENS,
            registry=r,
        )
        self.batch_failures = Counter(
            "pgw_batch_failures", "Batches that raised.", ["model", "variant"], registry=r
        )
        self.queue_depth = Gauge(
            "pgw_queue_depth", "Items waiting for a batch.", ["model", "variant"], registry=r
        )
        self.input_tokens = Counter("pgw_input_tokens", "Tokens read.", ["model"], registry=r)
        self.output_tokens = Counter("pgw_output_tokens", "Tokens generated.", ["model"], registry=r)
        self.engine_rows = Gauge(
            "pgw_engine_rows_in_flight",
            "Rows (texts times their beams or samples) decoding in the translation engine.",
            ["model", "variant"],
            registry=r,
        )
        self.engine_admissions = Histogram(
            "pgw_engine_admissions",
            "Texts that joined the translation batch, per decoder step.",
            ["model", "variant"],
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.engine_step_seconds = Histogram(
            "pgw_engine_step_duration_seconds",
            "Time of one translation decoder step (every row in flight).",
            ["model", "variant"],
            buckets=_LATENCY,
            registry=r,
        )
        self.engine_encode_seconds = Histogram(
            "pgw_engine_encode_duration_seconds",
            "Time the translation engine spent encoding the texts that joined before a step.",
            ["model", "variant"],
            buckets=_LATENCY,
            registry=r,
        )
        self.generated_tokens = Counter(
            "pgw_generated_tokens",
            "Tokens the translation engine generated.",
            ["model", "variant"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "pgw_time_to_first_token_seconds",
            "From a translation request's arrival at the engine to its first generated token, per text.",
            ["model", "variant"],
            buckets=_LATENCY,
            registry=r,
        )
        self.model_info = Gauge(
            "pgw_model_info",
            "1 for every served model, labelled with what serves it.",
            ["model", "task", "variant", "backend", "device", "provider"],
            registry=r,
        )

    @contextmanager
    def request(self, rpc: str) -> Iterator[Outcome]:
        """Time one rpc and count it by the model and status code left in the outcome."""
        outcome = Outcome()
        started = time.perf_counter()
        token = _REQUEST.set(outcome)
        try:
            yield outcome
        finally:
            _REQUEST.reset(token)
            self.request_seconds.labels(rpc, outcome.model).observe(time.perf_counter() - started)
            self.requests.labels(rpc, outcome.model, outcome.code).inc()

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """One admitted rpc, for the in-flight gauge."""
        self.requests_in_flight.inc()
        try:
            yield
        finally:
            self.requests_in_flight.dec()

    def batch_observer(self, model: str, variant: str) -> Callable[[BatchStats], None]:
        """A DynamicBatcher observer recording its batches under (model, variant)."""
        queue = self.queue_seconds.labels(model, variant)
        inference = self.inference_seconds.labels(model, variant)
        size = self.batch_size.labels(model, variant)
        tokens = self.batch_tokens.labels(model, variant)
        failures = self.batch_failures.labels(model, variant)

        def observe(stats: BatchStats) -> None:
            for seconds in stats.queue_seconds:
                queue.observe(seconds)
            inference.observe(stats.run_seconds)
            size.observe(stats.size)
            tokens.observe(stats.padded_tokens)
            if stats.failed:
                failures.inc()

        return observe

    def engine_observer(self, model: str, variant: str) -> Callable[[StepStats], None]:
        """A decoding engine observer recording its steps under (model, variant). A step is the engine's
        batch: the batch histograms get its rows, cached tokens and time; the queue histogram how long each
        text waited for the engine to take it; the encode histogram the encoder runs of those that joined."""
        admissions = self.engine_admissions.labels(model, variant)
        step = self.engine_step_seconds.labels(model, variant)
        encode = self.engine_encode_seconds.labels(model, variant)
        tokens = self.generated_tokens.labels(model, variant)
        first = self.time_to_first_token.labels(model, variant)
        queue = self.queue_seconds.labels(model, variant)
        inference = self.inference_seconds.labels(model, variant)
        size = self.batch_size.labels(model, variant)
        cached = self.batch_tokens.labels(model, variant)

        def observe(stats: StepStats) -> None:
            admissions.observe(stats.admitted)
            step.observe(stats.seconds)
            if stats.admitted:
                encode.observe(stats.encode_seconds)
            inference.observe(stats.seconds)
            size.observe(stats.rows)
            cached.observe(stats.cached_tokens)
            tokens.inc(stats.new_tokens)
            for seconds in stats.first_tokens:
                first.observe(seconds)
            for seconds in stats.waited:
                queue.observe(seconds)

        return observe

    def track_queue_depth(self, model: str, variant: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(model, variant).set_function(lambda: float(depth()))

    def track_engine_rows(self, model: str, variant: str, rows: Callable[[], int]) -> None:
        self.engine_rows.labels(model, variant).set_function(lambda: float(rows()))

    def count_tokens(self, model: str, input_tokens: int, output_tokens: int = 0) -> None:
        self.input_tokens.labels(model).inc(input_tokens)
        if output_tokens:
            self.output_tokens.labels(model).inc(output_tokens)

    def set_model_info(
        self, model: str, task: str, variant: str, backend: str, device: str, provider: str
    ) -> None:
        self.model_info.labels(model, task, variant, backend, device, provider).set(1)

    def serve_http(
        self,
        host: str,
        port: int,
        tls: TlsConfig | None = None,
        probes: dict[str, Probe] | None = None,
    ) -> Callable[[], None]:
        """Serve /metrics on host:port, and each probe at its path (`/healthz`, `/readyz`): 200 with its
        JSON when it passes, 503 when it does not; any other path is 404. HTTPS with `tls`, client
        certificates required when it names a client CA. Returns a function that stops the server."""
        app = _http_app(make_wsgi_app(self.registry), probes or {})
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            kind = type("MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
            server: WSGIServer = make_server(host, port, app, kind, handler_class=_QuietHandler)
        except OSError as exc:
            raise InvalidInput(f"metrics port {host}:{port}: cannot listen ({exc.strerror})") from exc
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls.cert), str(tls.key))
            if tls.client_ca is not None:
                context.load_verify_locations(str(tls.client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
            server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes and probes are not worth a line
        pass


def _http_app(metrics: Callable[..., Any], probes: dict[str, Probe]) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        probe = probes.get(path)
        if probe is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics, " + ", ".join(sorted(probes)).encode() + b"\n"]
        passes, body = probe()
        start_response(
            "200 OK" if passes else "503 Service Unavailable", [("Content-Type", "application/json")]
        )
        return [json.dumps(body).encode() + b"\n"]

    return app
