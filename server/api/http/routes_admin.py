"""Models and adapters: GET /v1/models, vLLM's POST /v1/load_lora_adapter and
/v1/unload_lora_adapter, GET /v1/adapters and /v1/adapters/{name}, GET /v1/admin/consistency."""

from __future__ import annotations

from fastapi import APIRouter, Request

from loraplex.server.api.http.deps import credential_of, service_of

from loraplex.server.api.http.protocol import LoadLoraRequest, UnloadLoraRequest

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": await service_of(request).models(credential_of(request))}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, request: Request):
    info = await service_of(request).load_adapter(body.lora_name, body.lora_path, credential_of(request))
    return {"status": "loaded", "adapter": info}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request):
    info = await service_of(request).unload_adapter(body.lora_name, credential_of(request))
    status = "unloading" if info["state"] == "resident" else "unloaded"
    return {"status": status, "adapter": info}


@router.get("/v1/admin/consistency")
async def consistency(request: Request):
    """Admin: the registry's resident adapters against the engine's (``consistent``: they agree)."""
    return await service_of(request).consistency(credential_of(request))


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    return {"object": "list", "data": await service_of(request).adapters(credential_of(request))}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, request: Request):
    return service_of(request).describe_adapter(name, credential_of(request))
