"""GET /health (process alive), /ready (base loaded and a real forward succeeded), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraplex.server.api.http.deps import credential_of

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    service = getattr(request.app.state, "service", None)
    readiness = getattr(request.app.state, "readiness", None)  # the one Readiness (server/readiness.py)
    if service is None or not service.ready:
        phase = readiness.phase.value if readiness is not None else "loading"
        return JSONResponse({"status": phase}, status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready", "base": service.base_name, "fingerprint": service.base_fingerprint}


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}})
async def metrics(request: Request):
    service = getattr(request.app.state, "service", None)
    if service is not None and service.settings.metrics_require_key:
        service.authenticate(credential_of(request))
    registry = getattr(request.app.state, "metrics", None)
    return Response(registry.render() if registry is not None else b"", media_type=CONTENT_TYPE_LATEST)
