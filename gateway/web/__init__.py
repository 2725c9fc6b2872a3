"""HTTP/JSON beside gRPC: `app.py` the shared front and the uvicorn server, `openai.py` OpenAI-compatible
embeddings, `libretranslate.py` a LibreTranslate-compatible API, `native.py` a JSON route per rpc."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from gateway.admission import Admission
    from gateway.auth import ApiKeys
    from gateway.metrics import Metrics, Probe
    from gateway.registry import Registry
    from gateway.servicer import PolyglotServicer


def build_http_app(
    servicer: PolyglotServicer,
    registry: Registry,
    metrics: Metrics,
    keys: ApiKeys,
    admission: Admission,
    probes: dict[str, Probe],
    max_body_bytes: int,
) -> ASGIApp:
    """The whole HTTP API on the same servicer, registry, keys, admission and metrics as gRPC."""
    from gateway.web import libretranslate, native, openai
    from gateway.web.app import Dialect, Front, build_app

    front = Front(metrics, keys, admission)

    def dialect_of(path: str) -> Dialect:
        if path.startswith(openai.ROUTES):
            return openai.ERRORS
        if path.startswith(libretranslate.ROUTES):
            return libretranslate.ERRORS
        return native.ERRORS

    app = build_app(
        front,
        [
            openai.router(front, registry),
            libretranslate.router(front, registry, servicer, keys),
            native.router(front, servicer),
        ],
        probes,
        dialect_of,
        max_body_bytes,
        native.schemas(),
    )
    return app
