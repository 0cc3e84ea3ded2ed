"""The web console: ``/ui`` (one HTML page, one JS file, one CSS file, shipped in the wheel) and
``/docs`` (Swagger UI with its assets served from the ``swagger-ui-bundle`` package, so the API
explorer works without network).

It is a front like the HTTP API: it reads the service through its public methods and the
adapter store by adapter name only, and knows nothing of the engine or the scheduler.
"""

from __future__ import annotations

from fastapi import FastAPI

from loraplex.server.ui.docs import install_docs
from loraplex.server.ui.routes import router


def install(app: FastAPI) -> None:
    """Add the console and the offline ``/docs`` to ``app`` (created with ``docs_url=None``)."""
    app.include_router(router)
    install_docs(app)


__all__ = ["install", "router"]
