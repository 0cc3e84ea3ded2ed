"""``loraplex.json``: what loraplex knows about an adapter beyond peft's own files.

The manifest is optional (a plain peft folder is a valid adapter); when present it records the
base fingerprint the adapter was trained on, the sha256 of its weights, how it was trained and
how it scored. A named mix (``loraplex adapters mix``, ``store/mix.py``) records its recipe in
``mix``. Unknown keys written by newer versions are kept on round-trip.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraplex.server.errors import AdapterInvalid

MANIFEST = "loraplex.json"
FORMAT_VERSION = 1


class EvalMetrics(BaseModel):
    """The chosen metric on the held-out split, for the base alone and with the adapter."""

    model_config = ConfigDict(frozen=True, extra="allow")

    metric: str
    base: float | None = None
    adapter: float | None = None
    eval_examples: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    base_eval_loss: float | None = None


class MixMember(BaseModel):
    """One member of a named mix as it was when the mix was written."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    weight: float
    rank: int = Field(gt=0)  # the member's largest module rank
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # config + weights + manifest (store/fingerprint.py)
    base_fingerprint: str | None = None  # from the member's manifest (None: a plain peft folder)


class MixRecipe(BaseModel):
    """How a named mix was made: its members with their weights, combined by rank concatenation
    (``cat``: A stacked, B scaled by weight and the member's own LoRA scale)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    combination: Literal["cat"] = "cat"
    members: tuple[MixMember, ...] = Field(min_length=1)

    @property
    def label(self) -> str:
        return "+".join(f"{m.name}:{m.weight:g}" if float(f"{m.weight:g}") == m.weight else f"{m.name}:{m.weight!r}" for m in self.members)


class AdapterManifest(BaseModel):
    """The loraplex manifest (``loraplex.json``) of one adapter."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format_version: int = FORMAT_VERSION
    name: str
    task: str | None = None
    base_model_id: str
    base_fingerprint: str
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    target_modules: tuple[str, ...]
    method: str = "lora"
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training_args: dict[str, Any] = Field(default_factory=dict)
    metrics: EvalMetrics | None = None
    mix: MixRecipe | None = None  # set for a named mix (method "mix")
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    loraplex_version: str = ""


def write_manifest(adapter_dir: str | Path, manifest: AdapterManifest) -> Path:
    path = Path(adapter_dir) / MANIFEST
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(adapter_dir: str | Path) -> AdapterManifest | None:
    """The manifest, or None when the folder has none (a plain peft adapter)."""
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return AdapterManifest.model_validate(raw)
    except (ValueError, UnicodeDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()
        raise AdapterInvalid(f"{path}: invalid manifest ({' '.join(first[:3])})") from exc
