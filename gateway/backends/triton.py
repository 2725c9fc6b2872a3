"""Triton Inference Server as a backend: the gateway tokenizes, batches and post-processes; Triton runs the
graphs (encoders) or the whole decoding loop (translation's `generate` part) on its own devices.

One `TritonPool` per gateway holds a client per endpoint and checks every few seconds which endpoints have
which models ready. Requests go round-robin over the endpoints where their model is ready; an endpoint that
fails with UNAVAILABLE is marked down at once and the request is retried on the next one (inference has no
side effects). With no ready endpoint the request fails with UNAVAILABLE and the model's health turns
NOT_SERVING until a check finds it ready again. Inputs are cast to the types the model's metadata declares,
and batches larger than the model's `max_batch_size` are split.

Imported only when a model is configured with `backend: triton` (tritonclient is the `triton` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from gateway.backends.base import Arrays
from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, ModelNotReady, Overloaded
from gateway.manifest import TensorSpec

log = logging.getLogger(__name__)
_MAX_MESSAGE = 256 * 1024 * 1024
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # Reconnect soon after a restart: the health check decides when an endpoint is back.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Triton refuses queued requests with these messages (max_queue_size, queue policy timeout).
_QUEUE_REFUSALS = ("exceeds maximum queue size", "request timeout expired", "timeout expired")


class TritonError(GatewayError):
    """Triton failed a request for a reason that is not the client's (INTERNAL)."""


def map_error(exc: InferenceServerException, endpoint: str, model: str) -> GatewayError:
    """A Triton error as one of our domain errors, with a message that names the endpoint and model."""
    status = str(exc.status() or "")
    message = str(exc.message() or exc)
    where = f"triton {endpoint}, model {model}"
    if any(text in message.lower() for text in _QUEUE_REFUSALS) or status.endswith("RESOURCE_EXHAUSTED"):
        return Overloaded(
            f"{where}: its queue is full or the request waited too long ({message}); retry later"
        )
    if status.endswith("UNAVAILABLE"):
        return ModelNotReady(f"{where} is unavailable: {message}")
    if status.endswith("DEADLINE_EXCEEDED"):
        return DeadlineExceeded(f"{where}: the deadline passed before Triton answered")
    if status.endswith("INVALID_ARGUMENT"):
        return InvalidInput(f"{where} refused the request: {message}")
    return TritonError(f"{where} failed: {message}")


@dataclass
class _Endpoint:
    url: str
    client: Any = None
    ready_models: set[str] = field(default_factory=set)

    def connect(self) -> None:
        self.client = triton_aio.InferenceServerClient(self.url, channel_args=_CHANNEL_ARGS)

    async def reconnect(self) -> None:
        old, self.client = self.client, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        self.connect()


@dataclass(frozen=True)
class _ModelInfo:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    datatypes: dict[str, str]  # input name -> Triton datatype
    max_batch_size: int


class TritonPool:
    """The Triton endpoints of one gateway and which of their models are ready."""

    def __init__(self, endpoints: Sequence[str], health_interval: float = 1.0, timeout: float = 60.0) -> None:
        if not endpoints:
            raise InvalidInput("triton.endpoints: list at least one host:port of a Triton gRPC endpoint")
        self.endpoints = [_Endpoint(url) for url in endpoints]
        self.health_interval = health_interval
        self.timeout = timeout
        self.models: set[str] = set()
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._info: dict[str, _ModelInfo] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the event loop) whenever an endpoint's ready models change."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def describe(self) -> str:
        return ",".join(e.url for e in self.endpoints)

    async def start(self) -> None:
        """Connect and check once now, then keep checking in the background (idempotent)."""
        if self._task is not None:
            return
        for endpoint in self.endpoints:
            endpoint.connect()
        await self.check()
        self._task = asyncio.create_task(self._watch(), name="triton-health")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check()
            except Exception:  # the health loop must outlive any one failure
                log.exception("triton health check failed")

    async def check(self) -> None:
        await asyncio.gather(*(self._check(endpoint) for endpoint in self.endpoints))

    async def _check(self, endpoint: _Endpoint) -> None:
        before = set(endpoint.ready_models)
        try:
            timeout = max(0.5, min(self.health_interval, 2.0))
            if not await endpoint.client.is_server_ready(client_timeout=timeout):
                ready: set[str] = set()
            else:
                flags = await asyncio.gather(
                    *(endpoint.client.is_model_ready(m, client_timeout=timeout) for m in sorted(self.models))
                )
                ready = {m for m, ok in zip(sorted(self.models), flags, strict=True) if ok}
        except Exception:
            ready = set()
            await endpoint.reconnect()
        endpoint.ready_models = ready
        if ready != before:
            log.info("triton %s: ready models %s", endpoint.url, ", ".join(sorted(ready)) or "none")
            self._changed()

    def ready(self, model: str) -> bool:
        return any(model in e.ready_models for e in self.endpoints)

    def mark_down(self, endpoint: _Endpoint, model: str) -> None:
        if model in endpoint.ready_models:
            log.warning("triton %s: %s unavailable; down until a health check finds it", endpoint.url, model)
            endpoint.ready_models.discard(model)
            self._changed()

    def candidates(self, model: str) -> list[_Endpoint]:
        """The endpoints with `model` ready, starting at the next one in round-robin order."""
        ready = [e for e in self.endpoints if model in e.ready_models]
        if not ready:
            return []
        start = next(self._turn) % len(ready)
        return ready[start:] + ready[:start]

    async def info(self, endpoint: _Endpoint, model: str) -> _ModelInfo:
        """Input and output names, types and the max batch size, from the model's metadata and config."""
        if model not in self._info:
            metadata = await endpoint.client.get_model_metadata(model, as_json=True, client_timeout=5)
            config = await endpoint.client.get_model_config(model, as_json=True, client_timeout=5)

            def specs(entries: list[dict[str, Any]]) -> list[TensorSpec]:
                return [
                    TensorSpec(
                        name=e["name"],
                        dtype=np.dtype(triton_to_np_dtype(e["datatype"])).name,
                        shape=[int(d) if int(d) >= 0 else f"dim{i}" for i, d in enumerate(e["shape"])],
                    )
                    for e in entries
                ]

            self._info[model] = _ModelInfo(
                inputs=specs(metadata["inputs"]),
                outputs=specs(metadata["outputs"]),
                datatypes={e["name"]: e["datatype"] for e in metadata["inputs"]},
                max_batch_size=int(config["config"].get("max_batch_size", 0)),
            )
        return self._info[model]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for endpoint in self.endpoints:
            if endpoint.client is not None:
                with contextlib.suppress(Exception):
                    await endpoint.client.close()
                endpoint.client = None


class TritonBackend:
    """One model on the pool's Triton endpoints, as a Backend."""

    name = "triton"

    def __init__(self, pool: TritonPool, model: str) -> None:
        self.pool = pool
        self.model = model
        self.device = f"triton://{pool.describe()}"
        self.provider = f"triton:{model}"
        self._specs: _ModelInfo | None = None
        pool.models.add(model)

    @property
    def ready(self) -> bool:
        return self.pool.ready(self.model)

    async def start(self) -> None:
        await self.pool.start()

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._specs.inputs if self._specs else []

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._specs.outputs if self._specs else []

    async def run(self, inputs: Arrays, outputs: Sequence[str] | None = None) -> Arrays:
        tried: list[str] = []
        last: GatewayError | None = None
        for endpoint in self.pool.candidates(self.model):
            tried.append(endpoint.url)
            try:
                return await self._run_on(endpoint, inputs, outputs)
            except InferenceServerException as exc:
                error = map_error(exc, endpoint.url, self.model)
                if not isinstance(error, ModelNotReady):
                    raise error from exc
                self.pool.mark_down(endpoint, self.model)
                last = error
        detail = f" (tried {', '.join(tried)}: {last})" if tried else ""
        raise ModelNotReady(
            f"model {self.model} is not ready on any Triton endpoint ({self.pool.describe()}){detail}; "
            "retry when the gateway's health for this model is SERVING again"
        )

    async def _run_on(self, endpoint: _Endpoint, inputs: Arrays, outputs: Sequence[str] | None) -> Arrays:
        info = await self.pool.info(endpoint, self.model)
        self._specs = info
        names = list(outputs) if outputs is not None else [spec.name for spec in info.outputs]
        rows = len(next(iter(inputs.values())))
        step = info.max_batch_size or rows
        chunks = [
            {name: value[start : start + step] for name, value in inputs.items()}
            for start in range(0, rows, step)
        ]
        pieces = await asyncio.gather(*(self._infer(endpoint, info, chunk, names) for chunk in chunks))
        if len(pieces) == 1:
            return pieces[0]
        return {name: np.concatenate([p[name] for p in pieces]) for name in names}

    async def _infer(self, endpoint: _Endpoint, info: _ModelInfo, inputs: Arrays, names: list[str]) -> Arrays:
        requests = []
        for name, datatype in info.datatypes.items():
            if name not in inputs:
                raise TritonError(
                    f"triton model {self.model} wants input {name!r}, which this export does not make: the "
                    "Triton model comes from another export; rewrite it with `pgw triton repo` from this one"
                )
            value = np.ascontiguousarray(inputs[name], dtype=triton_to_np_dtype(datatype))
            tensor = InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value)
            requests.append(tensor)
        result = await endpoint.client.infer(
            self.model,
            requests,
            outputs=[InferRequestedOutput(name) for name in names],
            client_timeout=self.pool.timeout,
        )
        return {name: result.as_numpy(name) for name in names}

    async def close(self) -> None:
        self.pool.models.discard(self.model)
