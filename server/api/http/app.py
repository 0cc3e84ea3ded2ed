"""Build the FastAPI app: routers, and exception handlers that route every error through the
one mapping in ``loraplex.server.api.errors`` (malformed JSON and schema errors are 400s,
never 500s)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.server import __version__
from loraplex.server.api.errors import http_error, openai_error_body
from loraplex.server.api.http import routes_admin, routes_openai, routes_ops
from loraplex.server.errors import LoraplexError

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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(openai_error_body(message, "BadRequestError", status), status_code=status)


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
            if path.startswith("/v1/"):
                for status, description in _ERROR_STATUSES.items():
                    responses.setdefault(status, {"description": description, "content": {"application/json": {"schema": ref}}})
            if path in ("/ready",):
                responses.setdefault("503", {"description": "Not ready yet"})
    app.openapi_schema = schema
    return schema


def create_app(service, metrics, lifespan=None) -> FastAPI:
    app = FastAPI(title="loraplex", version=__version__, docs_url="/docs", redoc_url=None, lifespan=lifespan)

    app.add_middleware(BodyLimitMiddleware)
    app.state.service = service
    app.state.metrics = metrics
    for router in (routes_openai.router, routes_admin.router, routes_ops.router):
        app.include_router(router)
    app.openapi = lambda: _openapi_with_errors(app)

    @app.exception_handler(LoraplexError)
    async def _loraplex_error(request: Request, exc: LoraplexError):
        status, body, headers = http_error(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            param = None
            message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if "input" in first and first.get("type") != "missing":
                message += f" (got {str(first['input'])[:100]!r})"
        return JSONResponse(openai_error_body(message, "BadRequestError", 400, param=param, code="invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # undecodable bodies, unknown routes, wrong methods: still OpenAI-shaped errors
        detail = exc.detail if isinstance(exc.detail, str) else "request error"
        if exc.status_code == 400:
            detail = f"request body could not be read: {detail}"
        body = openai_error_body(detail, "BadRequestError" if exc.status_code < 500 else "InternalServerError", exc.status_code)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(openai_error_body(f"internal error: {type(exc).__name__}", "InternalServerError", 500), status_code=500)

    return app
