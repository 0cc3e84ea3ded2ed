"""Shared route dependencies."""

from __future__ import annotations

from fastapi import Request

from loraplex.server.errors import NotReady


def service_of(request: Request):
    """The service, or NotReady (503) while the base is still loading."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("the server is not ready yet (loading the base model)")
    return service


def credential_of(request: Request) -> str | None:
    """The API key from ``Authorization: Bearer <key>`` (None when absent)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
