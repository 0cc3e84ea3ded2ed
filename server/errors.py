"""The one error hierarchy of loraplex.

Every error a user can cause derives from :class:`LoraplexError` and carries a message that
names the offending value and the limit it broke. This module knows nothing of HTTP or gRPC;
the API layers map these classes to status codes in one place each.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class: a user-facing error with a clear one-line message."""

    #: short machine-readable code (also used as the OpenAI error ``code``)
    code: str = "loraplex_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class BaseModelError(LoraplexError):
    """The base model is missing, unreadable or not what was expected."""

    code = "base_model_error"


class AdapterNotFound(LoraplexError):
    """No adapter of that name in the store (or not visible to the caller)."""

    code = "adapter_not_found"


class AdapterInvalid(LoraplexError):
    """An adapter exists but is refused: bad name, path, config, weights or base mismatch."""

    code = "adapter_invalid"


class AdapterExists(LoraplexError):
    """Publishing would replace an existing adapter and overwrite was not asked for."""

    code = "adapter_exists"


class RequestInvalid(LoraplexError):
    """A request (or a command line) has a value outside what is supported."""

    code = "invalid_request"


class Overloaded(LoraplexError):
    """The server's queue is full; retry later."""

    code = "overloaded"


class NotReady(LoraplexError):
    """The server is starting or shutting down."""

    code = "not_ready"


class Unauthenticated(LoraplexError):
    """No API key, or one that is not valid (unknown or revoked)."""

    code = "invalid_api_key"


class PermissionDenied(LoraplexError):
    """A valid key asked for something its role does not allow (admin routes)."""

    code = "permission_denied"


class RateLimited(Overloaded):
    """A key went over its requests or tokens per minute."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class EngineFailure(LoraplexError):
    """Generation of one request failed inside the engine (a server fault, never the user's)."""

    code = "engine_failure"


class ExportError(LoraplexError):
    """``loraplex export-onnx`` could not produce the model (the builder or a check failed)."""

    code = "export_failed"
