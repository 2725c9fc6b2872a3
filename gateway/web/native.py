"""Our own JSON routes, made from the proto so that the two never drift: `POST /v1/<rpc>` for every unary
rpc of `polyglot.v1.Polyglot` (`/v1/translate`, `/v1/classify`, `/v1/segment`, `/v1/embed`,
`/v1/fill-mask`, `/v1/detect-language`, `/v1/translate-document`, `/v1/list-models`), and `POST
/v1/translate-tokens` as server-sent events. A body is the rpc's request message in proto3 JSON (field
names as in the proto or in lowerCamelCase, enums by name); a reply is its response message, field names
as in the proto, every field present. The OpenAPI document gives each body's schema, made from the proto
descriptors.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from gateway.errors import InvalidInput
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.servicer import PolyglotServicer
from gateway.web.app import (
    Front,
    HttpContext,
    NativeErrors,
    json_bytes,
    json_response,
    read_json,
    status_of,
)

ERRORS = NativeErrors()
SERVICE = pb.DESCRIPTOR.services_by_name["Polyglot"]
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_INT64: {"type": ["integer", "string"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["integer", "string"], "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def path_of(method: MethodDescriptor) -> str:
    """/v1/fill-mask for FillMask."""
    return "/v1/" + re.sub(r"(?<!^)(?=[A-Z])", "-", method.name).lower()


def unary_methods() -> list[MethodDescriptor]:
    return [m for m in SERVICE.methods if not m.client_streaming and not m.server_streaming]


def _message_class(descriptor: Descriptor) -> type[Message]:
    return getattr(pb, descriptor.name)  # type: ignore[no-any-return]


def parse(data: Any, descriptor: Descriptor) -> Message:
    """A request message from its proto3 JSON, or InvalidInput naming what does not fit."""
    if not isinstance(data, dict):
        raise InvalidInput(f"the request body must be a JSON object: a {descriptor.full_name}")
    try:
        return json_format.ParseDict(data, _message_class(descriptor)(), max_recursion_depth=32)
    except json_format.ParseError as exc:
        raise InvalidInput(str(exc)[:300]) from None


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}  # fmt: skip
_FLOATS = {FieldDescriptor.TYPE_FLOAT: np.float32, FieldDescriptor.TYPE_DOUBLE: np.float64}


def dump(message: Message) -> dict[str, Any]:
    """A reply as proto3 JSON values (what `json_format.MessageToDict` gives with the proto's field names
    and every field without presence), made for orjson: repeated numbers become numpy arrays, serialized in
    C, where MessageToDict formats each float in Python (32 vectors of 768: 50 ms)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = _repeated(field, value)
        else:
            out[field.name] = _single(field, value)
    return out


def _repeated(field: Any, values: Any) -> Any:
    if field.message_type is not None:
        return [dump(item) for item in values]
    kind = _FLOATS.get(field.type)
    if kind is not None:
        array = np.asarray(values, dtype=kind)
        return array if np.isfinite(array).all() else [_number(float(v)) for v in array]
    return [_single(field, item) for item in values]


def _single(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return dump(value)
    if field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type in _INT64:
        return str(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    kind = _FLOATS.get(field.type)
    if kind is not None:
        return kind(value) if math.isfinite(value) else _number(value)
    return value


def _number(value: float) -> Any:
    """proto3 JSON spells the floats JSON has no numbers for."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def schemas() -> dict[str, Any]:
    """OpenAPI component schemas of every message the unary rpcs take or give (and those inside)."""
    found: dict[str, Any] = {}

    def visit(descriptor: Descriptor) -> None:
        if descriptor.full_name in found:
            return
        properties: dict[str, Any] = {}
        found[descriptor.full_name] = {"type": "object", "properties": properties}
        for field in descriptor.fields:
            if field.message_type is not None:
                visit(field.message_type)
                item: dict[str, Any] = {"$ref": f"#/components/schemas/{field.message_type.full_name}"}
            elif field.enum_type is not None:
                item = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
            else:
                item = dict(_SCALARS.get(field.type, {}))
            properties[field.name] = {"type": "array", "items": item} if field.is_repeated else item

    for method in SERVICE.methods:
        visit(method.input_type)
        visit(method.output_type)
    return found


def router(front: Front, servicer: PolyglotServicer) -> APIRouter:
    api = APIRouter(tags=["polyglot.v1 as JSON"])
    for method in unary_methods():
        _add_unary(api, front, servicer, method)
    _add_tokens(api, front, servicer)
    return api


def _body_schema(method: MethodDescriptor) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{method.input_type.full_name}"}
                }
            },
        },
        "responses": {
            "200": {
                "description": method.output_type.name,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{method.output_type.full_name}"}
                    }
                },
            }
        },
    }


def _add_unary(api: APIRouter, front: Front, servicer: PolyglotServicer, method: MethodDescriptor) -> None:
    handler = getattr(servicer, method.name)
    route = f"POST {path_of(method)}"

    async def endpoint(request: Request) -> Response:
        async def work(context: HttpContext) -> Response:
            message = parse(await read_json(request), method.input_type)
            reply = await handler(message, context)
            _count(front, reply)
            return json_response(dump(reply))

        return await front.call(request, route, ERRORS, work)

    api.add_api_route(
        path_of(method),
        endpoint,
        methods=["POST"],
        name=method.name,
        summary=f"{method.name} ({SERVICE.full_name})",
        openapi_extra=_body_schema(method),
    )


def _count(front: Front, reply: Message) -> None:
    fields = reply.DESCRIPTOR.fields_by_name
    if "usage" in fields and reply.HasField("usage"):
        model = getattr(reply, "model", "") or "-"
        front.count_tokens(model, reply.usage.input_tokens, reply.usage.output_tokens)  # type: ignore[attr-defined]


def _add_tokens(api: APIRouter, front: Front, servicer: PolyglotServicer) -> None:
    """TranslateTokens as server-sent events: one `data:` line per TranslateTokensResponse."""
    method = SERVICE.methods_by_name["TranslateTokens"]
    route = "POST /v1/translate-tokens"

    async def endpoint(request: Request) -> Response:
        async def work(context: HttpContext) -> Response:
            message = parse(await read_json(request), method.input_type)
            events = servicer.TranslateTokens(message, context)  # type: ignore[arg-type]
            first = await anext(events, None)  # errors before the first token still get their status

            async def stream() -> AsyncIterator[bytes]:
                event = first
                try:
                    while event is not None:
                        if event.HasField("result"):
                            _count(front, event.result)
                        yield b"data: " + json_bytes(dump(event)) + b"\n\n"
                        event = await anext(events, None)
                except Exception as exc:  # the status line went out with the first event: say it here
                    _, code = status_of(exc)
                    error = {"code": code, "message": front.message(exc, route, context.request_id)}
                    yield b"event: error\ndata: " + json_bytes({"error": error}) + b"\n\n"
                finally:
                    close = getattr(events, "aclose", None)  # an async generator: its rows leave the engine
                    if close is not None:
                        await close()

            return StreamingResponse(stream(), media_type="text/event-stream")

        return await front.call(request, route, ERRORS, work)

    api.add_api_route(
        "/v1/translate-tokens",
        endpoint,
        methods=["POST"],
        name="TranslateTokens",
        summary="TranslateTokens as server-sent events",
        openapi_extra=_body_schema(method),
    )
