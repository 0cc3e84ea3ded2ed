"""``loraplex-export.json``: what ``loraplex export-onnx`` wrote, beside the onnxruntime-genai
files (``model.onnx``, ``genai_config.json``, tokenizer) that plain onnxruntime-genai reads.

It records the base (id + fingerprint), the precision, every swappable LoRA module with its
shape (so the onnx backend validates adapters without loading torch weights), and each exported
adapter: its ``.onnx_adapter`` file, that file's sha256 and the sha256 of the peft weights it
was made from. Knows nothing of engines or servers.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraplex.server.errors import AdapterInvalid, BaseModelError
from loraplex.server.store.names import validate_adapter_name
from loraplex.server.store.onnx_adapter import ONNX_ADAPTER_SUFFIX

EXPORT_MANIFEST = "loraplex-export.json"
FORMAT_VERSION = 1


class ExportedAdapter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    file: str  # a plain file name inside the model folder

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            validate_adapter_name(value)
        except AdapterInvalid as exc:
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("file")
    @classmethod
    def _inside_the_folder(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith(".") or not value.endswith(ONNX_ADAPTER_SUFFIX):
            raise ValueError(f"adapter file {value!r} must be a plain <name>{ONNX_ADAPTER_SUFFIX} file name inside the model folder")
        return value

    file_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_path: str
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # adapter_model.safetensors it was made from
    rank: int = Field(gt=0)
    modules: int = Field(gt=0)
    base_fingerprint: str | None = None  # from the adapter's own loraplex.json, when it has one


class ExportManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    format_version: int = FORMAT_VERSION
    base_model_id: str
    base_fingerprint: str
    precision: str
    builder_options: list[str] = Field(default_factory=list)
    lora_targets: str  # "all" (every Linear of every layer) or "union" (the adapters' modules)
    lora_modules: dict[str, tuple[int, int]]  # HF module name -> (in_features, out_features)
    adapters: list[ExportedAdapter] = Field(default_factory=list)
    stacked_graph: str | None = None  # the mixed-adapter batch variant of model.onnx (same weights file)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    loraplex_version: str = ""
    onnxruntime_genai_version: str = ""


def write_export_manifest(model_dir: Path, manifest: ExportManifest) -> Path:
    path = Path(model_dir) / EXPORT_MANIFEST
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path


def read_export_manifest(model_dir: str | Path) -> ExportManifest:
    """The manifest of an exported model folder; BaseModelError naming the problem otherwise."""
    folder = Path(model_dir)
    path = folder / EXPORT_MANIFEST
    if not folder.is_dir():
        raise BaseModelError(f"--model {folder}: no such folder (expected the output of loraplex export-onnx)")
    if not (folder / "genai_config.json").is_file():
        raise BaseModelError(f"--model {folder}: no genai_config.json (not an onnxruntime-genai model folder; run loraplex export-onnx)")
    if not path.is_file():
        raise BaseModelError(f"--model {folder}: no {EXPORT_MANIFEST} (export it with loraplex export-onnx, which records the base and its LoRA inputs)")
    try:
        return ExportManifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BaseModelError(f"{path}: invalid export manifest: {where}: {first['msg']}") from exc
    except ValueError as exc:
        raise BaseModelError(f"{path}: invalid export manifest ({exc})") from exc
