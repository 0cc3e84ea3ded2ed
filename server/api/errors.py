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

#: error class -> (HTTP status, OpenAI-style error type)
HTTP_STATUS: dict[type[LoraplexError], tuple[int, str]] = {
    Unauthenticated: (401, "authentication_error"),
    PermissionDenied: (403, "permission_error"),
    RequestInvalid: (400, "invalid_request_error"),
    AdapterInvalid: (400, "invalid_request_error"),
    AdapterExists: (409, "conflict_error"),
    AdapterNotFound: (404, "not_found_error"),
    Overloaded: (429, "rate_limit_error"),
    NotReady: (503, "service_unavailable_error"),
    BaseModelError: (500, "server_error"),
    EngineFailure: (500, "server_error"),
}
#: HTTP status -> (error type, code) for errors that are not loraplex errors (routing, body limits)
STATUS_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limited"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable_error", "service_unavailable"),
}
RETRY_AFTER_SECONDS = 1


def http_status(exc: LoraplexError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500, "server_error"


def openai_error_body(message: str, err_type: str, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape; ``code`` is always a string (the status's default when not given)."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code if code is not None else STATUS_TYPES.get(status, ("", f"http_{status}"))[1]}}


def status_error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The error body for a bare HTTP status (unknown route, wrong method, body limits, faults)."""
    err_type, default_code = STATUS_TYPES.get(status, ("invalid_request_error" if status < 500 else "server_error", f"http_{status}"))
    return openai_error_body(message, err_type, status, param=param, code=code or default_code)


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
