"""The HTTP/JSON front: one ASGI app (FastAPI, served by uvicorn on the gRPC server's event loop) with
OpenAI-compatible embeddings (`openai.py`), a LibreTranslate-compatible API (`libretranslate.py`) and a JSON
route per unary rpc (`native.py`). Every route calls the task models or the servicer directly, with the
same registry, batchers, limits, API keys, admission and metrics as the gRPC service: no second copy of a
model and no hop through gRPC.

Each request passes, in this order: the body-size cap and disconnect watch (`BodyGuard`, below the app),
then in `Front.call` the request id, the API key, admission (the server-wide bound and shutdown), the
route's work, and the mapping of domain errors to the HTTP status and error body of the route's API.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.config import TlsConfig
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    UnknownModel,
)
from gateway.metrics import Metrics, Probe

log = logging.getLogger(__name__)
REQUEST_ID = "x-request-id"
# A body declared over the limit by at most this factor is read and dropped before the 413, so that a
# client still sending it hears the answer; a larger one gets the 413 and the connection closes unread.
DRAINED = 4


class Refused(GatewayError):
    """A refusal decided by the HTTP front (not by a task): its status goes out as it is."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # the gRPC status name it stands for, for the metrics


def unauthenticated() -> Refused:
    return Refused(401, "UNAUTHENTICATED", "missing or wrong API key: send `Authorization: Bearer <key>`")


class BodyTooLarge(Refused):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, "RESOURCE_EXHAUSTED", f"the request body exceeds this server's limit of {limit} bytes"
        )


def status_of(exc: BaseException) -> tuple[int, str]:
    """An error's HTTP status and the gRPC status name the same error has on the gRPC service."""
    if isinstance(exc, Refused):
        return exc.status, exc.code
    for kind, status, code in (
        (UnknownModel, 404, "INVALID_ARGUMENT"),
        (InvalidInput, 400, "INVALID_ARGUMENT"),
        (Overloaded, 429, "RESOURCE_EXHAUSTED"),
        (DeadlineExceeded, 504, "DEADLINE_EXCEEDED"),
        (ModelNotReady, 503, "UNAVAILABLE"),
    ):
        if isinstance(exc, kind):
            return status, code
    return 500, "INTERNAL"


def json_bytes(content: Any) -> bytes:
    """orjson: numpy arrays and floats serialize in C (an embedding reply is mostly floats)."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(content: Any, status: int = 200) -> Response:
    return Response(json_bytes(content), status_code=status, media_type="application/json")


class Dialect(Protocol):
    """How one API (OpenAI's, LibreTranslate's, ours) shapes its errors."""

    def error(self, status: int, code: str, message: str, request_id: str) -> Response: ...


class NativeErrors:
    """Our own routes: the gRPC status name and its message, as the gRPC service would send them."""

    def error(self, status: int, code: str, message: str, request_id: str) -> Response:
        return json_response({"error": {"code": code, "message": message, "request_id": request_id}}, status)


@dataclass
class HttpContext:
    """What the servicer asks of a gRPC context, for a call that came over HTTP: its deadline."""

    deadline: float | None = None  # time.monotonic() value
    request_id: str = ""

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)


def deadline_of(request: Request) -> float | None:
    """`X-Request-Timeout: <seconds>`, the HTTP stand-in for a gRPC deadline (none without it)."""
    value = request.headers.get("x-request-timeout")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidInput("X-Request-Timeout: a number of seconds, e.g. 2.5") from None
    if not 0 < seconds < 86400 * 365:
        raise InvalidInput("X-Request-Timeout: a number of seconds > 0")
    return time.monotonic() + seconds


Work = Callable[[HttpContext], Awaitable[Response]]


class Front:
    """What every route shares: the server's keys, admission and metrics, and the error mapping."""

    def __init__(self, metrics: Metrics, keys: ApiKeys, admission: Admission) -> None:
        self.metrics = metrics
        self.keys = keys
        self.admission = admission
        self._id_prefix, self._ids = uuid.uuid4().hex[:12], itertools.count()

    def request_id(self, request: Request) -> str:
        return str(request.headers.get(REQUEST_ID) or f"{self._id_prefix}-{next(self._ids)}")[:128]

    def authorized(self, request: Request, api_key: str | None = None) -> bool:
        """`Authorization: Bearer <key>`, or a key the API sends in its body (LibreTranslate's api_key)."""
        if not self.keys.enabled:
            return True
        if api_key:
            return self.keys.allows(f"Bearer {api_key}")
        return self.keys.allows(request.headers.get("authorization"))

    async def call(
        self,
        request: Request,
        route: str,
        dialect: Dialect,
        work: Work,
        *,
        authorize: Callable[[], Awaitable[bool]] | None = None,
    ) -> Response:
        """Serve one request: id, key (`authorize` when the key may be in the body), admission, then
        `work`; a domain error becomes the dialect's error body with its status."""
        request_id = self.request_id(request)
        with self.metrics.request(route) as outcome:
            try:
                allowed = await authorize() if authorize is not None else self.authorized(request)
                if not allowed:
                    raise unauthenticated()
                context = HttpContext(deadline_of(request), request_id)
                with self.admission.admit(), self.metrics.in_flight():
                    response = await work(context)
            except asyncio.CancelledError:  # the client went away
                outcome.code = "CANCELLED"
                raise
            except Exception as exc:
                status, outcome.code = status_of(exc)
                response = dialect.error(
                    status, outcome.code, self.message(exc, route, request_id), request_id
                )
        response.headers[REQUEST_ID] = request_id
        return response

    def message(self, exc: BaseException, route: str, request_id: str) -> str:
        if isinstance(exc, GatewayError):
            return str(exc)
        log.error("%s failed (request id %s)", route, request_id, exc_info=exc)
        return f"internal error (request id {request_id}); the server log has the details"

    def count_tokens(self, model: str, input_tokens: int, output_tokens: int = 0) -> None:
        self.metrics.count_tokens(model, input_tokens, output_tokens)


async def read_json(request: Request) -> Any:
    """The body as JSON, or InvalidInput saying why not."""
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}"[:200]) from None


# ---------------------------------------------------------------------------------------------- the app


def build_app(
    front: Front,
    routers: list[Any],
    probes: dict[str, Probe],
    dialect_of: Callable[[str], Dialect],
    max_body_bytes: int,
    components: dict[str, Any],
) -> ASGIApp:
    """The ASGI app: the routers, the probes, JSON bodies for every error FastAPI itself raises (unknown
    route, wrong method, unparsable parameters), under the body guard. `components`: schemas the routes'
    OpenAPI entries refer to (the proto's messages)."""
    from fastapi.openapi.utils import get_openapi

    from gateway import __version__

    app = FastAPI(title="Polyglot Gateway", version=__version__, openapi_url="/openapi.json", redoc_url=None)
    for router in routers:
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    for path, probe in probes.items():
        app.add_api_route(path, _probe_route(probe), methods=["GET"], include_in_schema=False)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        status = exc.status_code
        code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(status, "INVALID_ARGUMENT")
        message = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not served on {request.url.path}",
        }.get(status, str(exc.detail))
        request_id = front.request_id(request)
        response = dialect_of(request.url.path).error(status, code, message, request_id)
        if exc.headers:
            response.headers.update(exc.headers)
        response.headers[REQUEST_ID] = request_id
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid')}"[:300]
        request_id = front.request_id(request)
        response = dialect_of(request.url.path).error(400, "INVALID_ARGUMENT", message, request_id)
        response.headers[REQUEST_ID] = request_id
        return response

    return BodyGuard(app, max_body_bytes, dialect_of, front)


def _probe_route(probe: Probe) -> Callable[[], Awaitable[Response]]:
    async def answer() -> Response:
        ok, body = probe()
        return json_response(body, 200 if ok else 503)

    return answer


class BodyGuard:
    """Below the app: refuses a body over `limit` bytes (413, by Content-Length before reading, or as it
    streams in), and cancels the request's work when its client disconnects, so that a caller that left
    holds no place in a batch."""

    def __init__(self, app: ASGIApp, limit: int, dialect_of: Callable[[str], Dialect], front: Front) -> None:
        self.app = app
        self.limit = limit
        self.dialect_of = dialect_of
        self.front = front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            if declared.isdigit() and int(declared) <= DRAINED * self.limit:
                await self._drain(receive)  # read and dropped: the client, still sending, hears the 413
            await self._refuse(scope, receive, send)
            return
        body_read = asyncio.Event()
        gone = asyncio.Event()
        answered = False
        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            if body_read.is_set():  # after the body: only the disconnect is left to hear
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                if not message.get("more_body", False):
                    body_read.set()
            elif message["type"] == "http.disconnect":
                gone.set()
                body_read.set()
            return message

        async def send_watched(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not body_read.is_set():
                await drain()  # a body the route did not read (a GET with a form): closing unread resets
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        async def drain() -> None:
            dropped = 0
            while not body_read.is_set() and dropped <= DRAINED * self.limit:
                message = await receive()
                if message["type"] == "http.request":
                    dropped += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        body_read.set()
                else:
                    gone.set()
                    body_read.set()

        work = asyncio.ensure_future(self.app(scope, receive_capped, send_watched))

        async def watch() -> None:
            await body_read.wait()
            if not gone.is_set():
                message = await receive()
                if message["type"] != "http.disconnect":
                    return
                gone.set()
            if not answered:
                work.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await work
        except asyncio.CancelledError:
            if not gone.is_set():
                raise  # cancelled from outside (shutdown), not by the client leaving
        finally:
            watcher.cancel()
            if not work.done():  # this request's handling was itself cancelled (shutdown)
                work.cancel()

    async def _drain(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        exc = BodyTooLarge(self.limit)
        request_id = self.front.request_id(request)
        response = self.dialect_of(scope["path"]).error(413, exc.code, str(exc), request_id)
        response.headers[REQUEST_ID] = request_id
        response.headers["connection"] = "close"  # the body may be unread: the connection ends
        await response(scope, receive, send)


# ------------------------------------------------------------------------------------------- the server


class _Server(uvicorn.Server):
    """uvicorn on a loop it does not own: the gateway handles the signals and the shutdown order."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


class HttpServer:
    """uvicorn serving `app` on host:port (0: a free port), with the gateway's TLS files, if any."""

    def __init__(
        self, app: ASGIApp, host: str, port: int, tls: TlsConfig | None, grace: float, max_connections: int
    ) -> None:
        options: dict[str, Any] = {}
        if tls is not None:
            options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
            if tls.client_ca is not None:
                options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.host = host
        self.port = port
        self.config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,  # request lines name paths only, but the gateway logs no requests
            server_header=False,
            timeout_graceful_shutdown=max(int(grace), 1),
            limit_concurrency=max_connections,  # beyond it: 503 at once, nothing read
            **options,
        )
        self._server = _Server(self.config)
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host.strip("[]") else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY on the connections of such a socket only. Without it,
        # Nagle's algorithm held each reply's body behind its headers for the client's delayed ACK:
        # +43 ms a request (bench/http.py).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host.strip("[]"), self.port))
        except OSError as exc:
            sock.close()
            raise InvalidInput(
                f"cannot listen for HTTP on {self.host}:{self.port}: {exc.strerror}; is another server "
                "using the port? (http_port 0 turns HTTP off)"
            ) from exc
        sock.listen(2048)
        sock.setblocking(False)
        return sock

    def bind(self) -> int:
        """Take the port (before the models load, so that a taken port fails at once); returns it."""
        if self._socket is None:
            self._socket = self._bind()
            self.port = int(self._socket.getsockname()[1])
        return self.port

    async def start(self) -> int:
        """Listen and serve; returns the bound port."""
        self.bind()
        assert self._socket is not None
        self.config.load()
        self._server.lifespan = self.config.lifespan_class(self.config)
        await self._server.startup(sockets=[self._socket])
        self._task = asyncio.create_task(self._run(), name="http")
        return self.port

    async def _run(self) -> None:
        await self._server.main_loop()

    async def stop(self) -> None:
        """Stop listening, let the requests in flight finish (within the grace), close the connections."""
        if self._task is None:  # bound, never started
            if self._socket is not None:
                self._socket.close()
            return
        self._server.should_exit = True
        await self._task
        self._task = None
        await self._server.shutdown(sockets=[self._socket] if self._socket else None)
