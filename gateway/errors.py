"""The domain errors. The gRPC interceptor maps each to one status code; nothing below it knows gRPC."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class: the message is shown to the client, so it names the field and what to change."""


class InvalidInput(GatewayError):
    """The request (or a command's argument) is wrong: INVALID_ARGUMENT."""


class UnknownModel(InvalidInput):
    """The request names a model this server does not serve: INVALID_ARGUMENT (HTTP: 404)."""


class Overloaded(GatewayError):
    """A queue is full: RESOURCE_EXHAUSTED."""


class DeadlineExceeded(GatewayError):
    """The request's deadline passed before it could run: DEADLINE_EXCEEDED."""


class ModelNotReady(GatewayError):
    """The model or its backend cannot serve now: UNAVAILABLE."""


class ExportError(GatewayError):
    """An export step failed or a variant fell outside its accuracy bound."""


def shown(value: object, limit: int = 100) -> str:
    """A client's value quoted for an error message: its repr, cut to about `limit` characters, so that a
    huge bad value never makes a huge error."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f", {len(value)} characters" if isinstance(value, str) else ""
    return f"{text[: limit - 1]}…{size}"
