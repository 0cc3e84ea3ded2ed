"""The onnx backend's adapter gate: validation + conversion to ``.onnx_adapter``, remembered.

Every adapter goes through the same checks as on the torch backend (``load_validated_adapter``
against the base shapes the export recorded). A peft adapter is then converted into an
``.onnx_adapter`` file (``A^T``, ``(scale * B)^T``); an ``.onnx_adapter`` exported with the model
is used as it is. The outcome is stored in a cache keyed by everything the checks depend on:
the sha256 of the weights, the bytes of ``adapter_config.json`` and ``loraplex.json``, the base
fingerprint, the exported graph's LoRA modules and ``--max-lora-rank``. A second load of the
same bytes (after an eviction, an unload, a restart) is then a hash lookup plus onnxruntime-genai's
own load: the expensive part of conversion, onnxruntime's adapter writer, runs once per
adapter version. Any change to those inputs is a different key, so a hit is exactly what a full
validation would conclude.

On an int4 export the gate can also replay the held-out answers stored in the adapter's training
report (``agreement.py``): the fraction reproduced is kept in the record (and so costs nothing on
a hit), returned by ``agreement(name)`` and logged as a warning below its threshold.

Runs in worker threads; knows nothing of engines, HTTP or gRPC.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from loraplex.server import __version__
from loraplex.server.onnx.agreement import Agreement, PredictionReplay, report_path, warn_if_low
from loraplex.server.errors import AdapterInvalid
from loraplex.server.store.validation import BaseShapes, ValidatedAdapter, load_validated_adapter
from loraplex.server.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, read_manifest
from loraplex.server.store.onnx_adapter import ONNX_ADAPTER_SUFFIX, onnx_adapter_arrays, read_onnx_adapter, write_onnx_adapter
from loraplex.server.store.weights import sha256_file_memo


def default_adapter_cache(fingerprint: str) -> Path:
    """``<LORAPLEX_CACHE>/onnx-adapters/<base fingerprint>/``, or the same under the temp dir
    when the cache is read-only (a container image's baked-in cache)."""
    from loraplex.server.basemodel.cache import cache_root

    preferred = cache_root() / "onnx-adapters" / fingerprint
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    # a shared temp dir is only trusted when it is ours and closed to others (cache hits skip
    # validation: a planted file would be served); otherwise a private one for this process
    root = Path(tempfile.gettempdir()) / f"loraplex-onnx-adapters-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = root.lstat()
        if root.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{root} is not private to this user")
    except OSError:
        root = Path(tempfile.mkdtemp(prefix="loraplex-onnx-adapters-"))
    fallback = root / fingerprint
    fallback.mkdir(mode=0o700, exist_ok=True)
    return fallback


CACHE_FORMAT = 1  # bump when the record or the .onnx_adapter layout changes


def release_free_memory() -> None:
    """Ask glibc to return freed heap pages to the OS (a no-op elsewhere). Conversions run in
    worker threads whose malloc arenas otherwise keep their temporaries resident."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class OnnxAdapterGate:
    """``gate(path, name) -> ValidatedAdapter`` with ``artifact`` set to the file to load."""

    def __init__(self, base: BaseShapes, *, max_lora_rank: int, cache_dir: Path, replay: PredictionReplay | None = None) -> None:
        self.base = base
        self.replay = replay
        self._agreements: dict[str, Agreement | None] = {}
        self.max_lora_rank = max_lora_rank
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        modules = hashlib.sha256("\n".join(f"{m}:{s}" for m, s in sorted(base.linear_shapes.items())).encode()).hexdigest()
        # the code version is part of the key: a later fix to validation or conversion never
        # meets a record an older version wrote
        replayed = f"replay:{replay.precision}:{replay.threshold}" if replay is not None else "no-replay"
        self._context = f"{CACHE_FORMAT}|{__version__}|{base.fingerprint}|{modules}|{max_lora_rank}|{replayed}"

    def agreement(self, name: str) -> Agreement | None:
        """The last loaded version of ``name``: its stored held-out answers reproduced on this
        export, or None (no replay on this export, no stored answers, or not loaded)."""
        return self._agreements.get(name)

    def _key(self, path: Path) -> tuple[str, str, int] | None:
        """(cache key, weights sha256, weights size), or None when the folder is not even shaped
        like an adapter (the full validation then reports what is wrong)."""
        if path.is_file() and path.suffix == ONNX_ADAPTER_SUFFIX:
            weights, extra = path, b""
        else:
            weights = path / ADAPTER_WEIGHTS
            config = path / ADAPTER_CONFIG
            if not (weights.is_file() and config.is_file()):
                return None
            manifest = path / MANIFEST
            extra = config.read_bytes() + b"\0" + (manifest.read_bytes() if manifest.is_file() else b"")
        report = report_path(path)
        if self.replay is not None and report.is_file():  # the replayed answers are part of the result
            extra += b"\0" + report.read_bytes()
        sha = sha256_file_memo(weights)
        key = hashlib.sha256(self._context.encode() + b"\0" + sha.encode() + b"\0" + extra).hexdigest()[:40]
        return key, sha, weights.stat().st_size

    def __call__(self, path: Path, name: str) -> ValidatedAdapter:
        keyed = self._key(path)
        if keyed is not None:
            key, sha, size = keyed
            record, artifact = self.cache_dir / f"{key}.json", self.cache_dir / f"{key}{ONNX_ADAPTER_SUFFIX}"
            hit = self._from_record(record, artifact, path, name, sha, size)
            if hit is not None:
                return hit
        validated = load_validated_adapter(path, name, self.base, max_lora_rank=self.max_lora_rank)
        if keyed is None:  # pragma: no cover - load_validated_adapter has raised for such folders
            raise RuntimeError(f"adapter {name!r} validated without a weights file")
        if self._key(path) != keyed or validated.weights_sha256 != sha:
            # republished while we read it: what was validated may not be what the key names
            raise AdapterInvalid(f"adapter {name!r} changed while it was being loaded (republished?); load it again")
        agreement = None
        if path.is_file():
            artifact = path  # an exported .onnx_adapter: loaded as it is
            if self.replay is not None and report_path(path).is_file():
                agreement = self.replay(path, read_onnx_adapter(path))
        else:
            arrays = onnx_adapter_arrays(validated.modules)
            write_onnx_adapter(artifact, arrays)
            if self.replay is not None:
                agreement = self.replay(path, arrays)
            del arrays
        self._agreements[name] = agreement
        warn_if_low(name, agreement)
        self._write_record(record, artifact, validated, agreement)
        result = replace(validated, modules={}, artifact=artifact, summary_rank=validated.max_rank, summary_modules=validated.module_names)
        del validated
        release_free_memory()  # the conversion's temporaries (several times the adapter) go back to the OS
        return result

    def _from_record(self, record: Path, artifact: Path, path: Path, name: str, sha: str, size: int) -> ValidatedAdapter | None:
        try:
            data = json.loads(record.read_text())
            target = Path(data["artifact"])
            rank, modules = int(data["rank"]), tuple(str(m) for m in data["modules"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: validate again (and rewrite it)
        if not target.is_file() or (target != path and target != artifact):
            return None
        stored = data.get("agreement")
        try:
            agreement = Agreement(**stored) if isinstance(stored, dict) else None
        except TypeError:
            return None  # a record of another layout: validate again
        self._agreements[name] = agreement
        warn_if_low(name, agreement)
        return ValidatedAdapter(
            name=name,
            path=path,
            spec=None,
            manifest=read_manifest(path) if path.is_dir() else None,
            modules={},
            weights_sha256=sha,
            size_bytes=size,
            artifact=target,
            summary_rank=rank,
            summary_modules=modules,
        )

    def _write_record(self, record: Path, artifact: Path, validated: ValidatedAdapter, agreement: Agreement | None = None) -> None:
        data = {"artifact": str(artifact), "rank": validated.max_rank, "modules": list(validated.module_names), "weights_sha256": validated.weights_sha256,
                "agreement": None if agreement is None else {"samples": agreement.samples, "reproduced": agreement.reproduced,
                                                             "threshold": agreement.threshold, "precision": agreement.precision}}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.cache_dir)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, record)
