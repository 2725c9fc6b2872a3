"""One place where domain errors become gRPC status codes, API keys are checked, request ids are stamped and
per-rpc metrics are recorded.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from grpc import aio

from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, ModelNotReady, Overloaded
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

STATUS: dict[type[GatewayError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
}
REQUEST_ID = "x-request-id"
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code of a domain error; INTERNAL for anything else."""
    for kind, code in STATUS.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def client_message(exc: BaseException, request_id: str) -> str:
    """Domain errors speak to the client; anything else is logged here and reported without internals."""
    if isinstance(exc, GatewayError):
        return str(exc)
    return f"internal error (request id {request_id}); the server log has the details"


ModelLabel = Callable[[str, Any], str]  # (rpc name, request message) -> model label for metrics


class GatewayInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics, model_label: ModelLabel, api_key: str | None = None) -> None:
        self.metrics = metrics
        self.model_label = model_label
        self.api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_OPEN_METHODS):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(rpc, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _count_tokens(self, rpc: str, request: Any, response: Any) -> None:
        """Every reply carries its usage; count it under the request's model."""
        if "usage" in response.DESCRIPTOR.fields_by_name and response.HasField("usage"):
            usage = response.usage
            self.metrics.count_tokens(self.model_label(rpc, request), usage.input_tokens, usage.output_tokens)

    def _start(self, context: aio.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get(REQUEST_ID) or uuid.uuid4().hex)
        context.set_trailing_metadata(((REQUEST_ID, request_id),))
        return request_id

    async def _authorize(self, context: aio.ServicerContext) -> None:
        if self.api_key is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {self.api_key}":
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong API key: send `authorization: Bearer <key>`",
            )

    @asynccontextmanager
    async def _guard(self, rpc: str, label: str, context: aio.ServicerContext) -> AsyncIterator[None]:
        """Request id, API key, per-rpc metrics, and domain errors turned into status codes."""
        request_id = self._start(context)
        with self.metrics.request(rpc, label) as outcome:
            try:
                await self._authorize(context)
                yield
            except aio.AbortError:
                outcome.code = context.code().name if context.code() else "UNKNOWN"
                raise
            except Exception as exc:
                code = status_of(exc)
                outcome.code = code.name
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed (request id %s)", rpc, request_id)
                await context.abort(code, client_message(exc, request_id))

    def _unary(self, rpc: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
            async with self._guard(rpc, self.model_label(rpc, request), context):
                response = await behavior(request, context)
                self._count_tokens(rpc, request, response)
            return response

        return wrapped

    def _stream(
        self, rpc: str, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._guard(rpc, "stream", context):
                async for response in behavior(requests, context):
                    self._count_tokens(rpc, response, response)
                    yield response

        return wrapped
