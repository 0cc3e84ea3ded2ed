"""The console's routes: the page (``/ui``), its two static files, and a small JSON API under
``/ui/api`` for what the OpenAI-style API does not say (the store manifest, the training report
and loss curve of an adapter, who the key is, train-to-serve jobs).

Every route authenticates the ``Authorization: Bearer`` key through the service and shows only
the adapters that key may use. Adapter files are found by adapter name through the store
(``AdapterStore.existing``), never from a path the client gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from loraplex.server.api.http.deps import credential_of, service_of
from loraplex.server.errors import AdapterInvalid, AdapterNotFound, LoraplexError, PermissionDenied
from loraplex.server.mixes import MAX_MIX_WEIGHT
from loraplex.server.store import read_manifest
from loraplex.server.ui.training import TrainForm, TrainingJobs

STATIC = Path(__file__).parent / "static"
#: the only static files served (name -> media type); nothing else under /ui/static answers
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
REPORT_FILE = "training_report.json"
LOSS_PNG = "loss.png"
#: held-out predictions shown per adapter (the report may hold many more)
MAX_SAMPLES = 50

router = APIRouter(include_in_schema=False)


# ------------------------------------------------------------------ page
@router.get("/ui")
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/")
async def page_slash():
    return RedirectResponse("/ui")


@router.get("/ui/static/{name}")
async def static(name: str):
    media = STATIC_FILES.get(name)
    if media is None:
        raise AdapterNotFound(f"no console file {name!r}")
    return FileResponse(STATIC / name, media_type=media, headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------ session
@router.get("/ui/api/session")
async def session(request: Request):
    """Who the key is (401 for a wrong or missing key when keys are on) and what the page may offer."""
    service = service_of(request)
    key = service.authenticate(credential_of(request))
    admin = key is None or key.is_admin
    settings = service.settings
    return {
        "auth": service.keys.enabled,
        "key_name": key.name if key is not None else None,
        "admin": admin,
        "base": service.base_name,
        "backend": settings.backend,
        "max_model_len": settings.max_model_len,
        "training_allowed": bool(settings.ui_allow_training),
        # the playground's mix column keeps its sliders inside the server's limits (server/mixes.py)
        "max_mix_adapters": settings.max_mix_adapters,
        "max_mix_weight": MAX_MIX_WEIGHT,
    }


# ------------------------------------------------------------------ adapters
def _adapter_folder(service, name: str) -> Path | None:
    """The adapter's folder in the store, or None (an adapter that came with an ONNX export)."""
    try:
        return service.registry.store.existing(name)
    except (AdapterNotFound, AdapterInvalid):
        return None


def _manifest_fields(folder: Path | None) -> dict[str, Any]:
    if folder is None:
        return {"manifest": None}
    try:
        manifest = read_manifest(folder)
    except LoraplexError as exc:
        return {"manifest": None, "manifest_error": str(exc)}
    if manifest is None:
        return {"manifest": None}
    scores = manifest.metrics
    return {
        "manifest": {
            "task": manifest.task,
            "rank": manifest.rank,
            "alpha": manifest.alpha,
            "method": manifest.method,
            "target_modules": list(manifest.target_modules),
            "base_model_id": manifest.base_model_id,
            "created_at": manifest.created_at,
            "metric": scores.metric if scores else None,
            "base_score": scores.base if scores else None,
            "adapter_score": scores.adapter if scores else None,
            "eval_examples": scores.eval_examples if scores else 0,
        }
    }


@router.get("/ui/api/adapters")
async def adapters(request: Request):
    """GET /v1/adapters (registry state) joined with each adapter's store manifest."""
    service = service_of(request)
    rows = []
    for info in service.describe_adapters(credential_of(request)):
        folder = _adapter_folder(service, info["name"])
        row = {**info, **_manifest_fields(folder)}
        row.pop("path", None)  # the page names adapters, never paths
        row["has_report"] = folder is not None and (folder / REPORT_FILE).is_file()
        row["has_loss_png"] = folder is not None and (folder / LOSS_PNG).is_file()
        rows.append(row)
    return {"object": "list", "data": rows}


def _visible_folder(request: Request, name: str, filename: str) -> Path:
    service = service_of(request)
    service.describe_adapter(name, credential_of(request))  # 401 / same 404 as unknown for a key that may not use it
    folder = _adapter_folder(service, name)
    if folder is None or not (folder / filename).is_file():
        raise AdapterNotFound(f"adapter {name!r} has no {filename}")
    return folder / filename


@router.get("/ui/api/adapters/{name}/report")
async def report(name: str, request: Request):
    """The trainer's training_report.json: scores, config, loss history, held-out predictions."""
    path = _visible_folder(request, name, REPORT_FILE)
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterInvalid(f"{REPORT_FILE} of adapter {name!r} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterInvalid(f"{REPORT_FILE} of adapter {name!r} is not a JSON object")
    samples = data.get("eval_samples") if isinstance(data.get("eval_samples"), list) else []
    data["eval_samples"] = samples[:MAX_SAMPLES]
    data["eval_samples_total"] = len(samples)
    return JSONResponse(data)


@router.get("/ui/api/adapters/{name}/loss.png")
async def loss_png(name: str, request: Request):
    return FileResponse(_visible_folder(request, name, LOSS_PNG), media_type="image/png")


# ------------------------------------------------------------------ train-to-serve
def _jobs(request: Request) -> TrainingJobs:
    """The app's training jobs, after checking the feature is on and the key is an admin's."""
    service = service_of(request)
    if not service.settings.ui_allow_training:
        raise PermissionDenied("training from the console is off; start the server with --ui-allow-training to allow it")
    service.require_admin(credential_of(request))
    jobs = getattr(request.app.state, "ui_training", None)
    if jobs is None:
        jobs = request.app.state.ui_training = TrainingJobs(service.registry.store, base=service.settings.base, max_rank=service.settings.max_lora_rank)
    return jobs


@router.get("/ui/api/train/files")
async def train_files(request: Request):
    return {"data": _jobs(request).files()}


@router.post("/ui/api/train/upload")
async def train_upload(request: Request, filename: str):
    """The request body is the data file itself (.jsonl, .json or .csv), size-limited."""
    jobs = _jobs(request)
    body = await request.body()
    return await jobs.upload(filename, body)


@router.post("/ui/api/train")
async def train_start(form: TrainForm, request: Request):
    return await _jobs(request).start(form)


@router.get("/ui/api/train/jobs")
async def train_jobs(request: Request):
    return {"data": _jobs(request).describe()}


@router.post("/ui/api/train/jobs/{job_id}/stop")
async def train_stop(job_id: str, request: Request):
    """Stop a running job (the trainer is terminated; nothing reaches the store)."""
    return await _jobs(request).stop(job_id)


@router.get("/ui/favicon.ico")
async def favicon():
    return Response(status_code=204)
