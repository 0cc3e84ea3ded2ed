"""Turn what a user typed (``--model_name_or_path`` / ``--base``) into a local model folder.

Accepted: nothing / ``embedded`` / ``SmolLM2-135M-Instruct`` (the embedded base), a local
Hugging Face model folder, or a hub id (downloaded by huggingface_hub where the user has
network; never in tests). The result carries the fingerprint adapters record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.server.basemodel.embedded import EMBEDDED_ALIASES, EMBEDDED_BASE_ID, materialize_embedded_base
from loraplex.server.basemodel.fingerprint import compute_fingerprint
from loraplex.server.errors import BaseModelError


@dataclass(frozen=True)
class BaseModelRef:
    """A resolved base model: a served name, a local folder and its fingerprint."""

    id: str
    path: Path
    fingerprint: str

    @property
    def is_embedded(self) -> bool:
        return self.id == EMBEDDED_BASE_ID


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        )
    except Exception as exc:  # network, auth, missing repo: one clear line
        raise BaseModelError(
            f"base model {repo_id!r} is not a local folder and could not be fetched from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            "pass a local Hugging Face model folder or omit it for the embedded base"
        ) from exc
    return Path(folder)


def resolve_base(model_name_or_path: str | Path | None = None) -> BaseModelRef:
    """Resolve a base model reference; raises BaseModelError with one clear line."""
    value = "" if model_name_or_path is None else str(model_name_or_path)
    if value.strip() in EMBEDDED_ALIASES:
        folder = materialize_embedded_base()
        return BaseModelRef(EMBEDDED_BASE_ID, folder, compute_fingerprint(folder))
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BaseModelError(f"base model path {path} is a file; expected a Hugging Face model folder with config.json")
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"base model folder {path} has no config.json; expected a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files)"
            )
        return BaseModelRef(path.resolve().name, path.resolve(), compute_fingerprint(path))
    if _looks_like_hub_id(value):
        folder = _download_from_hub(value)
        return BaseModelRef(value, folder, compute_fingerprint(folder))
    raise BaseModelError(
        f"base model {value!r} not found: no such folder, and not a hub id of the form owner/name; "
        "expected a Hugging Face model folder (config.json, *.safetensors, tokenizer files)"
    )
