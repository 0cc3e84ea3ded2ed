"""``/docs``: FastAPI's Swagger UI page, pointed at the Swagger UI 5 JS/CSS that the
``fastapi-offline`` package ships, served from this process (FastAPI's default page loads them
from a CDN and is blank without network)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = "/docs-assets"


def swagger_assets_dir() -> Path:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css (inside an installed package)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def install_docs(app: FastAPI) -> None:
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_assets_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )
