"""A LibreTranslate-compatible API (1.x): `POST /translate`, `GET /languages`, `POST /detect`,
`POST /translate_file` with `GET /download_file/<name>`, and `/frontend/settings`, for the clients,
browser extensions and CAT tools that already speak it (`libretranslatepy`, ...).

Bodies are JSON or form fields, as LibreTranslate takes them; the key comes as `api_key` or as
`Authorization: Bearer`. Language codes are LibreTranslate's (ISO 639-1 `en`, `zh-Hans`/`zh-Hant`, and
`zh`/`zt`/`pb` as older clients send them), mapped to FLORES-200; a language without an ISO 639-1 code is
listed by its FLORES-200 code, which is accepted too. Texts go through TranslateDocument (format `text` or
`html`): split into sentences by the server's SaT model, each sentence translated, whitespace and markup
kept; `alternatives` asks for n-best translations of each whole text (beam search) instead.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import PurePath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from gateway import langid
from gateway.auth import ApiKeys
from gateway.errors import GatewayError, InvalidInput, shown
from gateway.languages import flores200_codes, iso639_1_aliases
from gateway.offload import off_loop
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.registry import Registry
from gateway.servicer import PolyglotServicer
from gateway.tasks import translation as tr
from gateway.web.app import BodyTooLarge, Front, HttpContext, json_response, read_json

FieldsWork = Callable[[dict[str, Any], HttpContext], Awaitable[Response]]
ROUTES = ("/translate", "/languages", "/detect", "/translate_file", "/download_file", "/frontend")
# Codes LibreTranslate and its clients use that are no ISO 639-1 alias of ours
_EXTRA_CODES = {
    "zh": "zho_Hans",
    "zh-hans": "zho_Hans",
    "zh-cn": "zho_Hans",
    "zt": "zho_Hant",
    "zh-hant": "zho_Hant",
    "zh-tw": "zho_Hant",
    "pb": "por_Latn",
    "pt-br": "por_Latn",
    "no": "nob_Latn",
}
_OWN_CODES = {"zho_Hans": "zh-Hans", "zho_Hant": "zh-Hant"}  # FLORES -> the code /languages lists
FILE_FORMATS = {
    ".txt": pb.DOCUMENT_FORMAT_TEXT,
    ".md": pb.DOCUMENT_FORMAT_MARKDOWN,
    ".html": pb.DOCUMENT_FORMAT_HTML,
    ".htm": pb.DOCUMENT_FORMAT_HTML,
}
FILES_KEPT = 64  # translated files waiting to be downloaded, the oldest dropped first
FILE_SECONDS = 600.0  # how long a translated file can be downloaded


class LibreErrors:
    """LibreTranslate's error body, {"error": message}; a missing or wrong key is its 403."""

    def error(self, status: int, code: str, message: str, request_id: str) -> Response:
        return json_response({"error": message}, 403 if status == 401 else status)


ERRORS = LibreErrors()


@functools.cache
def _flores_to_code() -> dict[str, str]:
    codes = {flores: iso for iso, flores in iso639_1_aliases().items()}
    return codes | _OWN_CODES


def code_of(flores: str) -> str:
    """The code /languages lists for a FLORES-200 language."""
    return _flores_to_code().get(flores, flores)


def flores_of(code: str, available: Sequence[str]) -> str:
    """A LibreTranslate code (or a FLORES-200 one) as a FLORES-200 code the model knows, or
    InvalidInput in LibreTranslate's words."""
    wanted = code.strip()
    lowered = wanted.lower()
    by_lower = {c.lower(): c for c in available}
    found = by_lower.get(lowered) or _EXTRA_CODES.get(lowered) or iso639_1_aliases().get(lowered)
    if found is None and "-" in lowered:  # a regional tag: pt-PT, en-GB
        found = iso639_1_aliases().get(lowered.split("-", 1)[0])
    if found is None or found not in available:
        raise InvalidInput(f"{shown(wanted, 40)} is not supported")
    return found


@functools.cache
def language_name(flores: str) -> str:
    """English name, with the script where FLORES-200 has the language in several (Acehnese (Arabic))."""
    import langcodes

    language, script = flores.split("_", 1)
    scripts = sum(1 for code in flores200_codes() if code.startswith(f"{language}_"))
    tag = f"{language}-{script}" if scripts > 1 else language
    return str(langcodes.Language.get(tag).display_name())


class _Files:
    """Translated files until they are downloaded (or expire): in memory, a few at a time."""

    def __init__(self) -> None:
        self._files: collections.OrderedDict[str, tuple[float, str, bytes]] = collections.OrderedDict()

    def put(self, filename: str, data: bytes) -> str:
        self._expire()
        name = f"{secrets.token_urlsafe(16)}.{filename}"
        self._files[name] = (time.monotonic() + FILE_SECONDS, filename, data)
        while len(self._files) > FILES_KEPT:
            self._files.popitem(last=False)
        return name

    def take(self, name: str) -> tuple[str, bytes] | None:
        self._expire()
        found = self._files.get(name)
        return None if found is None else (found[1], found[2])

    def _expire(self) -> None:
        now = time.monotonic()
        for name in [n for n, (until, _, _) in self._files.items() if until <= now]:
            del self._files[name]


def router(front: Front, registry: Registry, servicer: PolyglotServicer, keys: ApiKeys) -> APIRouter:
    api = APIRouter(tags=["LibreTranslate-compatible"])
    files = _Files()

    def translator() -> tuple[str, tr.TranslationModel]:
        served = registry.resolve("translation", "")
        assert isinstance(served.model, tr.TranslationModel)
        return served.name, served.model

    async def fields(request: Request) -> dict[str, Any]:
        """The body's fields: a JSON object, or form fields (urlencoded or multipart)."""
        if request.headers.get("content-type", "").startswith("application/json"):
            data = await read_json(request)
            if not isinstance(data, dict):
                raise InvalidInput("Invalid request: the body must be a JSON object")
            return data
        try:
            form = await request.form()
        except GatewayError:  # the body cap
            raise
        except HTTPException as exc:  # Starlette's word for a form that does not parse
            raise InvalidInput(f"Invalid request: {exc.detail}") from None
        return dict(form.items())

    async def call(request: Request, route: str, work: FieldsWork, keyed: bool = True) -> Response:
        """Through the front; the key may be the `api_key` field, so the body is read before it is
        checked (within the size cap)."""
        body: dict[str, Any] = {}

        async def authorize() -> bool:
            nonlocal body
            try:
                body = await fields(request)
            except BodyTooLarge:
                raise
            except GatewayError:
                body = {}
                if front.authorized(request):
                    raise
                return False
            if not keyed:
                return True
            key = body.get("api_key")
            return front.authorized(request, key if isinstance(key, str) and key else None)

        async def run(context: HttpContext) -> Response:
            return await work(body, context)

        return await front.call(request, route, ERRORS, run, authorize=authorize)

    @api.post("/translate", summary="Translate text or HTML, as LibreTranslate does")
    async def translate(request: Request) -> Response:
        async def work(body: dict[str, Any], context: HttpContext) -> Response:
            name, model = translator()
            q = _required(body, "q")
            batch = isinstance(q, list)
            texts = q if batch else [q]
            if not all(isinstance(t, str) for t in texts):
                raise InvalidInput("Invalid request: q must be a string or a list of strings")
            model.limits.check(texts)
            languages = model.info.languages
            source = str(_required(body, "source"))
            target = flores_of(str(_required(body, "target")), languages)
            auto = source.strip().lower() == "auto"
            source_code = "auto" if auto else flores_of(source, languages)
            text_format = str(body.get("format") or "text")
            if text_format not in ("text", "html"):
                raise InvalidInput(f"{shown(text_format, 40)} format is not supported")
            alternatives = _count(body.get("alternatives", 0))
            if alternatives and text_format != "text":
                raise InvalidInput("alternatives are given for format text only")
            if alternatives:
                reply = await _n_best(servicer, name, texts, source_code, target, alternatives, context)
                front.count_tokens(name, reply.usage.input_tokens, reply.usage.output_tokens)
                translated = [t.hypotheses[0].text if t.hypotheses else "" for t in reply.translations]
                others: list[list[str]] | None = [
                    [h.text for h in t.hypotheses[1:]] for t in reply.translations
                ]
            else:
                kind = pb.DOCUMENT_FORMAT_HTML if text_format == "html" else pb.DOCUMENT_FORMAT_TEXT
                replies = await asyncio.gather(
                    *(
                        servicer.TranslateDocument(
                            pb.TranslateDocumentRequest(
                                document=text,
                                format=kind,
                                source_lang=source_code,
                                target_lang=target,
                                model=name,
                            ),
                            context,
                        )
                        for text in texts
                    )
                )
                translated, others = [r.document for r in replies], None
                for done in replies:
                    front.count_tokens(name, done.usage.input_tokens, done.usage.output_tokens)
            answer: dict[str, Any] = {"translatedText": translated if batch else translated[0]}
            if others is not None:
                answer["alternatives"] = others if batch else others[0]
            if auto:
                detected = await off_loop(sum(map(len, texts)), _detected, texts)
                answer["detectedLanguage"] = detected if batch else detected[0]
            return json_response(answer)

        return await call(request, "POST /translate", work)

    @api.api_route(
        "/languages",
        methods=["GET", "POST"],
        summary="Languages and their targets, as LibreTranslate lists them",
    )
    async def languages(request: Request) -> Response:
        try:
            _, model = translator()
        except GatewayError:
            return json_response([])
        codes = [code_of(flores) for flores in model.info.languages]
        listed = [
            {"code": code, "name": language_name(flores), "targets": codes}
            for code, flores in zip(codes, model.info.languages, strict=True)
        ]
        return json_response(listed)

    @api.post("/detect", summary="Detect the language of a text, as LibreTranslate does")
    async def detect(request: Request) -> Response:
        async def work(body: dict[str, Any], context: HttpContext) -> Response:
            q = _required(body, "q")
            if not isinstance(q, str):
                raise InvalidInput("Invalid request: q must be a string")
            servicer.limits.check([q])
            found = await off_loop(len(q), langid.identifier().detect, q, 3)
            return json_response([_candidate(c.language, c.iso, c.probability) for c in found.candidates])

        return await call(request, "POST /detect", work)

    @api.post("/translate_file", summary="Translate a .txt, .md or .html file, as LibreTranslate does")
    async def translate_file(request: Request) -> Response:
        async def work(body: dict[str, Any], context: HttpContext) -> Response:
            name, model = translator()
            upload = body.get("file")
            if upload is None or not hasattr(upload, "read"):
                raise InvalidInput("Invalid request: missing file parameter")
            filename = PurePath(str(upload.filename or "")).name
            if not filename:
                raise InvalidInput("Invalid request: empty file")
            kind = FILE_FORMATS.get(PurePath(filename).suffix.lower())
            if kind is None:
                raise InvalidInput(
                    f"Invalid request: file format not supported; send one of {', '.join(FILE_FORMATS)}"
                )
            source = str(_required(body, "source"))
            source_code = (
                "auto" if source.strip().lower() == "auto" else flores_of(source, model.info.languages)
            )
            target = flores_of(str(_required(body, "target")), model.info.languages)
            try:
                text = (await upload.read()).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput("Invalid request: the file is not UTF-8 text") from None
            reply = await servicer.TranslateDocument(
                pb.TranslateDocumentRequest(
                    document=text, format=kind, source_lang=source_code, target_lang=target, model=name
                ),
                context,
            )
            front.count_tokens(name, reply.usage.input_tokens, reply.usage.output_tokens)
            stored = files.put(filename, reply.document.encode("utf-8"))
            return json_response(
                {"translatedFileUrl": f"{str(request.base_url).rstrip('/')}/download_file/{stored}"}
            )

        return await call(request, "POST /translate_file", work)

    @api.get("/download_file/{stored}", summary="A file /translate_file translated")
    async def download_file(request: Request, stored: str) -> Response:
        found = files.take(stored)
        if found is None:
            return ERRORS.error(404, "NOT_FOUND", "no such file: it was never made, or it expired", "")
        filename, data = found
        disposition = f"attachment; filename*=UTF-8''{_quoted(filename)}"
        return Response(
            data, media_type="application/octet-stream", headers={"content-disposition": disposition}
        )

    @api.get("/frontend/settings", summary="What LibreTranslate's clients ask before they translate")
    async def settings(request: Request) -> Response:
        try:
            _, model = translator()
            limit, first = model.limits.max_chars, code_of(model.info.languages[0])
        except GatewayError:
            limit, first = -1, "en"
        return json_response(
            {
                "charLimit": limit,
                "frontendTimeout": 500,
                "apiKeys": keys.enabled,
                "keyRequired": keys.enabled,
                "suggestions": False,
                "filesTranslation": True,
                "supportedFilesFormat": list(FILE_FORMATS),
                "language": {
                    "source": {"code": "auto", "name": "Auto Detect"},
                    "target": {"code": first, "name": first},
                },
            }
        )

    return api


def _required(body: dict[str, Any], name: str) -> Any:
    value = body.get(name)
    if value is None or value == "" or value == []:
        raise InvalidInput(f"Invalid request: missing {name} parameter")
    return value


def _count(value: Any) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise InvalidInput("Invalid request: alternatives must be a whole number") from None
    if not 0 <= count < tr.MAX_BEAMS:
        raise InvalidInput(f"Invalid request: alternatives must be between 0 and {tr.MAX_BEAMS - 1}")
    return count


def _candidate(flores: str, iso: str, probability: float) -> dict[str, Any]:
    """LibreTranslate's detection: its confidence is a percentage."""
    return {"confidence": round(100 * probability, 1), "language": code_of(flores) if flores else iso}


def _detected(texts: list[str]) -> list[dict[str, Any]]:
    found = []
    for detection in langid.identifier().detect_all(texts, 1):
        best = detection.best
        found.append(
            _candidate(best.language, best.iso, best.probability) if best else _candidate("", "", 0.0)
        )
    return found


async def _n_best(
    servicer: PolyglotServicer,
    model: str,
    texts: list[str],
    source: str,
    target: str,
    alternatives: int,
    context: HttpContext,
) -> pb.TranslateResponse:
    """Each text's translations, best first: the best and `alternatives` more (beam search)."""
    beams = alternatives + 1
    return await servicer.Translate(
        pb.TranslateRequest(
            texts=texts,
            source_lang=source,
            target_lang=target,
            model=model,
            options=pb.TranslateOptions(beam_size=beams, num_return=beams),
        ),
        context,
    )


def _quoted(filename: str) -> str:
    from urllib.parse import quote

    return quote(filename, safe="")
