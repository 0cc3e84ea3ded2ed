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
