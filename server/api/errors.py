"""THE one place mapping loraplex errors to HTTP status + OpenAI error JSON and to gRPC status
codes. Every front goes through these tables; user mistakes never map to 500 / UNKNOWN / INTERNAL."""

from __future__ import annotations

from loraplex.server.errors import (
    EngineFailure,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    AdapterExists,
    AdapterInvalid,
    AdapterNotFound,
    BaseModelError,
    LoraplexError,
    NotReady,
    Overloaded,
    RequestInvalid,
)

#: error class -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[type[LoraplexError], tuple[int, str]] = {
    Unauthenticated: (401, "AuthenticationError"),
    PermissionDenied: (403, "PermissionDeniedError"),
    RequestInvalid: (400, "BadRequestError"),
    AdapterInvalid: (400, "BadRequestError"),
    AdapterExists: (409, "ConflictError"),
    AdapterNotFound: (404, "NotFoundError"),
    Overloaded: (429, "RateLimitError"),
    NotReady: (503, "ServiceUnavailableError"),
    BaseModelError: (500, "InternalServerError"),
    EngineFailure: (500, "InternalServerError"),
}
RETRY_AFTER_SECONDS = 1


def http_status(exc: LoraplexError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500, "InternalServerError"


def openai_error_body(message: str, err_type: str, status: int, *, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code if code is not None else status}}


def http_error(exc: LoraplexError) -> tuple[int, dict, dict[str, str]]:
    """(status, body, headers) for a loraplex error."""
    status, err_type = http_status(exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return status, openai_error_body(exc.message, err_type, status, param=exc.param, code=exc.code), headers


#: error class -> gRPC status code name (grpc.StatusCode member)
GRPC_STATUS: dict[type[LoraplexError], str] = {
    Unauthenticated: "UNAUTHENTICATED",
    PermissionDenied: "PERMISSION_DENIED",
    RequestInvalid: "INVALID_ARGUMENT",
    AdapterInvalid: "FAILED_PRECONDITION",
    AdapterExists: "ALREADY_EXISTS",
    AdapterNotFound: "NOT_FOUND",
    Overloaded: "RESOURCE_EXHAUSTED",
    NotReady: "UNAVAILABLE",
    BaseModelError: "INTERNAL",
    EngineFailure: "INTERNAL",
}


def grpc_status(exc: LoraplexError):
    """(grpc.StatusCode, message) for a loraplex error."""
    import grpc

    for cls in type(exc).__mro__:
        if cls in GRPC_STATUS:
            message = exc.message if exc.param is None else f"{exc.message} (field: {exc.param})"
            return getattr(grpc.StatusCode, GRPC_STATUS[cls]), message
    return grpc.StatusCode.INTERNAL, exc.message
