"""Shared route dependencies."""

from __future__ import annotations

from fastapi import Request

from loraplex.server.auth.credentials import bearer_key
from loraplex.server.errors import NotReady


def service_of(request: Request):
    """The service, or NotReady (503) while the base is still loading."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("the server is not ready yet (loading the base model)")
    return service


def credential_of(request: Request) -> str | None:
    """The API key from ``Authorization: Bearer <key>`` (the rule both fronts share:
    ``auth.credentials``); None when absent or not in that form."""
    return bearer_key(request.headers.get("authorization"))
