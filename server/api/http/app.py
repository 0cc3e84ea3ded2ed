"""Build the FastAPI app: routers, and exception handlers that route every error through the
one mapping in ``loraplex.server.api.errors`` (malformed JSON and schema errors are 400s,
never 500s; unknown routes and methods keep OpenAI's error shape). An unexpected exception is
answered by ``FaultMiddleware`` with a clean 500 naming the request id, without closing the
keep-alive connection. Error bodies are always encodable (a lone surrogate in a user value is
written as a JSON escape)."""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.server import __version__
from loraplex.server.api.errors import http_error, status_error_body
from loraplex.server.api.http import routes_admin, routes_openai, routes_ops
from loraplex.server.errors import LoraplexError
from loraplex.server import ui

log = logging.getLogger("loraplex.http")


#: request bodies above this are refused with 413 before they are read into memory
MAX_BODY_BYTES = 4 * 1024 * 1024
#: JSON nested deeper than this is refused with 400 (the parser's recursion is never reached)
MAX_JSON_DEPTH = 64


def _json_depth_exceeds(raw: bytes, limit: int) -> bool:
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class BodyLimitMiddleware:
    """Pure ASGI: refuse bodies over ``MAX_BODY_BYTES`` (413) or JSON nested deeper than
    ``MAX_JSON_DEPTH`` (400) before the app parses them, then replay the body to the app and pass
    every later ``receive()`` through, so handlers still see ``http.disconnect`` (Starlette's
    ``@app.middleware("http")`` hides it: a client leaving while its request is queued went
    unnoticed)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _error(413, f"request body is {int(declared)} bytes; the limit is {MAX_BODY_BYTES}")(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body arrived
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await _error(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")(scope, receive, send)
                return
        if _json_depth_exceeds(body, MAX_JSON_DEPTH):
            await _error(400, f"request JSON is nested deeper than {MAX_JSON_DEPTH} levels")(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect when the client goes away

        await self.app(scope, replay, send)


class ErrorJSONResponse(JSONResponse):
    """JSON that always encodes: user values with lone surrogates become ``\\udXXX`` escapes."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSONResponse(status_error_body(status, message), status_code=status, headers=headers)


def request_id_of(scope) -> str:
    """The id a route chose for this request (``request.state.request_id``), else the client's
    ``X-Request-Id``, else a fresh one (stored, so every later log line uses the same id)."""
    state = scope.setdefault("state", {})
    if not state.get("request_id"):
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"")[:128].decode("latin-1")
        state["request_id"] = given or f"req-{uuid.uuid4().hex}"
    return state["request_id"]


class FaultMiddleware:
    """Pure ASGI, innermost around the app: an exception no handler took is logged once with the
    request id and answered with a clean OpenAI-shaped 500; the connection stays open for the
    next request (Starlette's catch-all handler re-raises, and uvicorn then closes the
    connection). A fault after the response started can only end that response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the one catch-all of the HTTP front
            rid = request_id_of(scope)
            log.error("request %s (%s %s) failed: %s: %s", rid, scope.get("method"), scope.get("path"), type(exc).__name__, exc, exc_info=exc)
            if started:
                return  # the status line is out: the response ends here (uvicorn closes it)
            await _error(500, f"internal error in request {rid}: {type(exc).__name__} (see the server log)", {"X-Request-Id": rid})(scope, receive, send)


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
_ERROR_STATUSES = {
    "400": "Invalid request (the message names the value and the limit)",
    "401": "Missing or invalid API key",
    "403": "The key's role does not allow this",
    "404": "Unknown model or adapter",
    "409": "Conflict",
    "413": "Request body too large",
    "429": "Queue full or rate limited (see Retry-After)",
    "500": "A fault inside the server (logged with the request id)",
    "503": "Not ready (loading or shutting down)",
}


def _openapi_with_errors(app: FastAPI) -> dict:
    """FastAPI's schema, with our real error responses (OpenAI error JSON) instead of its 422."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schema.setdefault("components", {}).setdefault("schemas", {})["OpenAIError"] = _ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/OpenAIError"}
    for path, methods in schema.get("paths", {}).items():
        for operation in methods.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info"):
                for status, description in _ERROR_STATUSES.items():
                    responses.setdefault(status, {"description": description, "content": {"application/json": {"schema": ref}}})
            if path in ("/ready",):
                responses.setdefault("503", {"description": "Not ready yet"})
    app.openapi_schema = schema
    return schema


def create_app(service, metrics, lifespan=None) -> FastAPI:
    app = FastAPI(title="loraplex", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)  # /docs: offline, from loraplex.server.ui

    app.add_middleware(FaultMiddleware)  # inner: sees what the handlers did not take
    app.add_middleware(BodyLimitMiddleware)
    app.state.service = service
    app.state.metrics = metrics
    for router in (routes_openai.router, routes_admin.router, routes_ops.router):
        app.include_router(router)
    ui.install(app)  # the web console at /ui and Swagger UI at /docs with local assets
    app.openapi = lambda: _openapi_with_errors(app)

    @app.exception_handler(LoraplexError)
    async def _loraplex_error(request: Request, exc: LoraplexError):
        status, body, headers = http_error(exc)
        return ErrorJSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body" and not _is_union_tag(p)]
        param = ".".join(loc) or None
        kind = first.get("type")
        if kind == "json_invalid":
            param = None
            message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        elif kind == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param} (loraplex refuses fields it does not honour; see docs/api.md)"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if "input" in first and kind != "missing":
                message += f" (got {_shown(first['input'])})"
        return ErrorJSONResponse(status_error_body(400, message, param=param, code="invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # undecodable bodies, unknown routes, wrong methods: still OpenAI-shaped errors
        status = exc.status_code
        if status == 404:
            message = f"unknown route: {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = exc.detail if isinstance(exc.detail, str) else "request error"
            if status == 400:
                message = f"request body could not be read: {message}"
        return _error(status, message, getattr(exc, "headers", None))

    return app


def _is_union_tag(part) -> bool:
    """pydantic puts the union member's name in an error's location (``stop.list[str].0``)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


def _shown(value) -> str:
    text = ascii(value)
    return text if len(text) <= 100 else text[:97] + "..."
