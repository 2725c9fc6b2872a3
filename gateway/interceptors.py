"""One place where every RPC is checked and accounted for, in this order: request id, API key (before
anything else looks at the request), admission (the server's bound on RPCs in flight, and shutdown), the
deadline, then the handler, whose domain errors become gRPC status codes here.

It wraps all four kinds of handler and refuses any other (fail closed); only the health service stays open
without a key, for probes. A request that does not parse is INVALID_ARGUMENT, not a crash in gRPC.
Metrics labels only ever take the names of served models: a client's string never becomes a label.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn

import grpc
from grpc import aio

from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, ModelNotReady, Overloaded
from gateway.metrics import Metrics, Outcome

log = logging.getLogger(__name__)

STATUS: dict[type[GatewayError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
}
REQUEST_ID = "x-request-id"
_OPEN_METHODS = ("/grpc.health.v1.Health/",)
_NO_MODEL = "-"  # the label of requests that name no model (and of those refused before anyone looked)
# A unary request is given up this long before its deadline (2% of the time left, within these bounds).
_DEADLINE_MARGIN_MIN, _DEADLINE_MARGIN_MAX = 0.005, 0.05


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code of a domain error; INTERNAL for anything else."""
    for kind, code in STATUS.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def client_message(exc: BaseException, request_id: str) -> str:
    """Domain errors speak to the client; anything else is logged by the caller and reported without
    internals."""
    if isinstance(exc, GatewayError):
        return str(exc)
    return f"internal error (request id {request_id}); the server log has the details"


@dataclass(frozen=True)
class Undecodable:
    """What a request that does not parse becomes, so that the interceptor can answer INVALID_ARGUMENT."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return Undecodable(f"{type(exc).__name__}: {exc}"[:200])

    return deserialize


def _refuse_undecodable(request: Any, rpc: str, index: int | None = None) -> None:
    if isinstance(request, Undecodable):
        where = "the request" if index is None else f"message {index} of the stream"
        log.warning("%s: %s is not a valid protobuf message (%s)", rpc, where, request.error)
        raise InvalidInput(f"{where} is not a valid {rpc} request message: it does not parse")


class GatewayInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        metrics: Metrics,
        keys: ApiKeys | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.metrics = metrics
        self.keys = keys or ApiKeys()
        self.admission = admission or Admission(max_in_flight=1 << 30)
        # Request ids: a random prefix per process and a counter (uuid4 per request costs a system call).
        self._id_prefix, self._ids = uuid.uuid4().hex[:12], itertools.count()

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
        kinds: dict[str, tuple[Callable[..., grpc.RpcMethodHandler], Callable[[str, Any], Any]]] = {
            "unary_unary": (grpc.unary_unary_rpc_method_handler, self._unary_unary),
            "unary_stream": (grpc.unary_stream_rpc_method_handler, self._unary_stream),
            "stream_unary": (grpc.stream_unary_rpc_method_handler, self._stream_unary),
            "stream_stream": (grpc.stream_stream_rpc_method_handler, self._stream_stream),
        }
        for kind, (make, wrap) in kinds.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return make(
                    wrap(rpc, behavior),
                    request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
        log.error("%s: a handler of an unknown kind is refused", method)
        return grpc.unary_unary_rpc_method_handler(self._refused)

    async def _refused(self, request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not served")

    # ------------------------------------------------------------------------------------------ checks

    def _count_tokens(self, label: str, response: Any) -> None:
        """Every reply carries its usage; count it under the reply's model (a served model's name)."""
        descriptor = getattr(response, "DESCRIPTOR", None)
        if descriptor is not None and "usage" in descriptor.fields_by_name and response.HasField("usage"):
            usage = response.usage
            model = getattr(response, "model", "") or label
            self.metrics.count_tokens(model, usage.input_tokens, usage.output_tokens)

    @contextmanager
    def _admitted(self, rpc: str, context: aio.ServicerContext, outcome: Outcome) -> Iterator[str]:
        """Request id and API key first; then admission and the deadline; yields the request id."""
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get(REQUEST_ID) or f"{self._id_prefix}-{next(self._ids)}")[:128]
        context.set_trailing_metadata(((REQUEST_ID, request_id),))
        if not self.keys.allows(metadata.get("authorization")):
            outcome.code = "UNAUTHENTICATED"
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong API key: send `authorization: Bearer <key>`",
            )
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the request reached the server")
        with self.admission.admit(), self.metrics.in_flight():
            yield request_id

    def _status(self, exc: BaseException, rpc: str, request_id: str) -> tuple[grpc.StatusCode, str]:
        """The call's status and message for an error."""
        if isinstance(exc, _Abort):
            return exc.code, exc.details
        code = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed (request id %s)", rpc, request_id, exc_info=exc)
        return code, client_message(exc, request_id)

    # ---------------------------------------------------------------------------------------- handlers

    def _unary_unary(
        self, rpc: str, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
            async with _Guard(self, rpc, context) as guard:
                _refuse_undecodable(request, rpc)
                async with _answer_before_deadline(context):
                    response = await behavior(request, context)
                self._count_tokens(guard.outcome.model, response)
                return response

        return wrapped

    def _unary_stream(
        self, rpc: str, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Guard(self, rpc, context) as guard:
                _refuse_undecodable(request, rpc)
                async for response in behavior(request, context):
                    self._count_tokens(guard.outcome.model, response)
                    yield response

        return wrapped

    def _stream_unary(
        self, rpc: str, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapped(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
            async with _Guard(self, rpc, context, labelled=False):
                response = await behavior(_checked(requests, rpc), context)
                self._count_tokens(_NO_MODEL, response)
                return response

        return wrapped

    def _stream_stream(
        self, rpc: str, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Guard(self, rpc, context, labelled=False):
                async for response in behavior(_checked(requests, rpc), context):
                    self._count_tokens(_NO_MODEL, response)
                    yield response

        return wrapped


class _Guard:
    """One RPC from arrival to status: metrics around it all, then request id, key, admission and deadline
    (`GatewayInterceptor._admitted`); on the way out, domain errors become statuses, and a call that was
    cancelled is counted as CANCELLED or DEADLINE_EXCEEDED. Never swallows an exception."""

    def __init__(
        self, interceptor: GatewayInterceptor, rpc: str, context: aio.ServicerContext, labelled: bool = True
    ) -> None:
        self.interceptor, self.rpc, self.context = interceptor, rpc, context
        self.request_id = ""
        self._stack = ExitStack()
        self.outcome = self._stack.enter_context(interceptor.metrics.request(rpc))
        # A stream's requests may name different models: the stream itself is labelled "-".
        self.labelled = labelled

    async def __aenter__(self) -> _Guard:
        try:
            self.request_id = self._stack.enter_context(
                self.interceptor._admitted(self.rpc, self.context, self.outcome)
            )
        except Exception as exc:
            await self._fail(exc)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if isinstance(exc, aio.AbortError):
                self.outcome.code = _aborted(self.context)
            elif isinstance(exc, asyncio.CancelledError):  # the client went away, or its deadline passed
                remaining = self.context.time_remaining()
                expired = remaining is not None and remaining <= 0
                self.outcome.code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
            elif isinstance(exc, Exception):
                await self._fail(exc)
        finally:
            self._close()

    def _close(self) -> None:
        if not self.labelled:
            self.outcome.model = _NO_MODEL
        self._stack.close()

    async def _fail(self, exc: BaseException) -> NoReturn:
        """Record the error's status (metrics, admission released), then send it: a client that has its
        status finds the call already counted."""
        try:
            code, details = self.interceptor._status(exc, self.rpc, self.request_id)
            self.outcome.code = code.name
        finally:
            self._close()
        await self.context.abort(code, details)
        raise RuntimeError("context.abort returned")  # it raises AbortError


@asynccontextmanager
async def _answer_before_deadline(context: aio.ServicerContext) -> AsyncIterator[None]:
    """Give up a unary request just before its deadline and say so (DEADLINE_EXCEEDED with a message):
    left to gRPC, the deadline would cancel the call, which the client may see as a bare CANCELLED."""
    remaining = context.time_remaining()
    if remaining is None:
        yield
        return
    margin = min(_DEADLINE_MARGIN_MAX, max(_DEADLINE_MARGIN_MIN, remaining * 0.02))
    timeout = asyncio.timeout(max(remaining - margin, 0))
    try:
        async with timeout:
            yield
    except TimeoutError:
        if not timeout.expired():
            raise
        raise DeadlineExceeded(
            "the request did not finish within its deadline; retry with a longer deadline or fewer texts"
        ) from None


class _Abort(Exception):
    """A refusal decided here (not a domain error): its code and details go to the client as they are."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _aborted(context: aio.ServicerContext) -> str:
    code = context.code()
    return str(code.name) if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _checked(requests: AsyncIterator[Any], rpc: str) -> AsyncIterator[Any]:
    """The stream's messages; one that does not parse ends the stream with INVALID_ARGUMENT."""
    index = 0
    async for request in requests:
        _refuse_undecodable(request, rpc, index)
        yield request
        index += 1
