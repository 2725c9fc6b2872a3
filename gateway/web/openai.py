"""OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models`, for the `openai` client,
LangChain, LlamaIndex and whatever else speaks OpenAI's API.

Vectors are mean-pooled and normalized to length 1, as OpenAI's are (a dot product is the cosine): the
same numbers as `Embed` with `normalize: true`. `input` is a string, a list of strings, or token arrays,
which must be ids of the model's own tokenizer (tiktoken's ids mean nothing to it: with LangChain, set
`check_embedding_ctx_length=False` so that it sends text). A text over the model's input limit is refused,
as OpenAI refuses one over its context length.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.errors import InvalidInput, UnknownModel, shown
from gateway.registry import Registry
from gateway.tasks import embedding as emb
from gateway.web.app import Front, HttpContext, json_response, read_json

ROUTES = ("/v1/embeddings", "/v1/models")
_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


class OpenAIErrors:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def error(self, status: int, code: str, message: str, request_id: str) -> Response:
        kind, short = _TYPES.get(status, ("server_error", None))
        if status == 405:
            kind, short = "invalid_request_error", "method_not_allowed"
        return json_response(
            {"error": {"message": message, "type": kind, "param": None, "code": short}}, status
        )


ERRORS = OpenAIErrors()


class EmbeddingsBody(BaseModel):
    """The fields of OpenAI's embeddings request; others (`user`, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def router(front: Front, registry: Registry) -> APIRouter:
    api = APIRouter(tags=["OpenAI-compatible"])
    schema = EmbeddingsBody.model_json_schema()

    @api.post(
        "/v1/embeddings",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        },
        summary="Embeddings, as OpenAI's API serves them",
    )
    async def embeddings(request: Request) -> Response:
        async def work(context: HttpContext) -> Response:
            body = _parsed(await read_json(request))
            served = registry.resolve("embedding", body.model)
            model = served.model
            assert isinstance(model, emb.EmbeddingModel)
            if body.dimensions is not None and body.dimensions != model.dimensions:
                raise InvalidInput(
                    f"dimensions: {served.name} makes vectors of {model.dimensions} dimensions and cannot "
                    f"shorten them to {body.dimensions}; leave dimensions out"
                )
            texts, tokens = _inputs(body.input)
            if tokens is not None:
                result = await model.embed_tokens(
                    emb.EmbedTokensInput(
                        tokens, "mean", normalize=True, truncate=False, deadline=context.deadline
                    )
                )
            else:
                result = await model.embed(
                    emb.EmbedInput(texts, "mean", normalize=True, truncate=False, deadline=context.deadline)
                )
            used = result.usage.input_tokens
            front.count_tokens(served.name, used)
            return json_response(
                {
                    "object": "list",
                    "data": _vectors([e.values for e in result.embeddings], body.encoding_format),
                    "model": served.name,
                    "usage": {"prompt_tokens": used, "total_tokens": used},
                }
            )

        return await front.call(request, "POST /v1/embeddings", ERRORS, work)

    @api.get("/v1/models", summary="The served models, as OpenAI's API lists them")
    async def models(request: Request) -> Response:
        async def work(context: HttpContext) -> Response:
            listed = [
                {
                    "id": entry.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "polyglot-gateway",
                    "task": entry.task,
                }
                for entry in registry.all()
            ]
            return json_response({"object": "list", "data": listed})

        return await front.call(request, "GET /v1/models", ERRORS, work)

    @api.get("/v1/models/{name}", summary="One served model")
    async def one_model(request: Request, name: str) -> Response:
        async def work(context: HttpContext) -> Response:
            entry = next((e for e in registry.all() if e.name == name), None)
            if entry is None:
                raise UnknownModel(f"model: unknown model {shown(name)}")
            return json_response(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "polyglot-gateway",
                    "task": entry.task,
                }
            )

        return await front.call(request, "GET /v1/models", ERRORS, work)

    return api


def _parsed(data: Any) -> EmbeddingsBody:
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object with `input` and `model`")
    try:
        return EmbeddingsBody.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else "body"
        if where == "input":
            raise InvalidInput(
                "input: a string, a list of strings, or a list of token arrays (lists of integers)"
            ) from None
        raise InvalidInput(f"{where}: {first['msg']}"[:300]) from None


def _inputs(given: str | list[str] | list[int] | list[list[int]]) -> tuple[list[str], list[list[int]] | None]:
    """Texts, or token arrays."""
    if isinstance(given, str):
        return [given], None
    if not given:
        raise InvalidInput("input: at least one text or token array is required")
    texts = [item for item in given if isinstance(item, str)]
    if len(texts) == len(given):
        return texts, None
    ids = [item for item in given if isinstance(item, int)]
    if len(ids) == len(given):
        return [], [ids]
    return [], [item for item in given if isinstance(item, list)]


def _vectors(values: list[np.ndarray], encoding: str) -> list[dict[str, Any]]:
    """OpenAI's data items; base64 is the little-endian float32 bytes, as its client decodes them."""
    if encoding == "base64":
        return [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode(),
            }
            for i, v in enumerate(values)
        ]
    return [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)]
