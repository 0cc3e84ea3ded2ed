"""The adapter registry: name -> state, LRU over idle resident adapters, refcounts.

States: ``available`` (in the store, not in memory) -> ``loading`` -> ``resident``; a refused
adapter is ``failed`` with its reason (and can be retried). An adapter serving a request is never
evicted or unloaded mid-request: ``unload`` of a busy adapter marks it and it leaves memory when
its last request finishes (requests in flight are never cut). Validation runs off the event loop;
the install into the engine runs on the engine thread between steps (``installer``).

Used from the asyncio event loop only. Knows nothing of HTTP, gRPC or tokenization.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Mapping, Protocol

from loraplex.server.errors import AdapterInvalid, AdapterNotFound, LoraplexError, Overloaded
from loraplex.server.registry.validation import BaseShapes, ValidatedAdapter, load_validated_adapter, resolve_adapter_path
from loraplex.server.store import AdapterStore
from loraplex.server.store.names import validate_adapter_name

class Installer(Protocol):
    """Puts adapters into / takes them out of the engine (on its thread, between steps)."""

    async def add(self, name: str, adapter: ValidatedAdapter) -> None: ...

    async def remove(self, name: str) -> None: ...


class AdapterState(str, Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    RESIDENT = "resident"
    FAILED = "failed"


@dataclass
class AdapterEntry:
    name: str
    path: Path
    state: AdapterState = AdapterState.AVAILABLE
    error: str | None = None
    adapter: ValidatedAdapter | None = None
    refcount: int = 0
    last_used: float = 0.0
    loaded_at: float | None = None
    load_seconds: float | None = None
    requests_served: int = 0
    unload_pending: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def describe(self) -> dict:
        info = {
            "name": self.name,
            "state": self.state.value,
            "path": str(self.path),
            "requests_served": self.requests_served,
            "running_requests": self.refcount,
            "loaded_at": self.loaded_at,
            "load_ms": round(self.load_seconds * 1000, 2) if self.load_seconds is not None else None,
            "last_error": self.error,
        }
        if self.adapter is not None:
            a = self.adapter
            info.update(
                rank=a.max_rank,
                target_modules=sorted({m.rsplit(".", 1)[-1] for m in a.module_names}),
                size_bytes=a.size_bytes,
                sha256=a.weights_sha256,
                base_fingerprint=a.manifest.base_fingerprint if a.manifest else None,
                task=a.manifest.task if a.manifest else None,
            )
        return info


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        base: BaseShapes,
        installer: Installer,
        *,
        max_loras: int,
        max_lora_rank: int,
        allow_external_paths: bool = False,
        on_event: Callable[[str, AdapterEntry], None] | None = None,
        exported: Mapping[str, Path] | None = None,
        validator: Callable[[Path, str], ValidatedAdapter] | None = None,
    ) -> None:
        self.store = store
        self.base = base
        self.installer = installer
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.allow_external_paths = allow_external_paths
        # adapters that come with the served model (``.onnx_adapter`` files of an ONNX export);
        # a store folder of the same name wins (it is the source those files were made from)
        self.exported = dict(exported or {})
        # the backend's gate (default: full validation of the tensors against the base shapes)
        self.validator = validator or (lambda path, name: load_validated_adapter(path, name, self.base, max_lora_rank=self.max_lora_rank))
        self.entries: dict[str, AdapterEntry] = {}
        self.on_event = on_event or (lambda kind, entry: None)
        self._install_lock = asyncio.Lock()
        self.evictions = 0

    # ------------------------------------------------------------ discovery
    def scan(self) -> None:
        """Register adapters present in the store; forget vanished ones that are not in memory."""
        in_store = set(self.store.names())
        present = in_store | set(self.exported)
        for name in present:
            if name not in self.entries:
                path = self.store.root / name if name in in_store else self.exported[name]
                self.entries[name] = AdapterEntry(name=name, path=path)
        for name in list(self.entries):
            entry = self.entries[name]
            if name not in present and entry.state != AdapterState.RESIDENT and entry.path.parent == self.store.root:
                del self.entries[name]

    def get(self, name: str) -> AdapterEntry:
        entry = self.entries.get(name)
        if entry is None:
            self.scan()
            entry = self.entries.get(name)
        if entry is None:
            raise AdapterNotFound(f"The model `{name}` does not exist.", param="model")
        return entry

    def resident(self) -> list[AdapterEntry]:
        return [e for e in self.entries.values() if e.state == AdapterState.RESIDENT]

    # ------------------------------------------------------------- loading
    async def load(self, name: str, path: str | None = None) -> AdapterEntry:
        """Validate and install ``name`` (from the store, or ``path``); idempotent when resident.

        The work runs in its own task, shielded: a caller that is cancelled (client disconnect,
        deadline) never leaves the registry and the engine out of step.
        """
        return await asyncio.shield(asyncio.ensure_future(self._load(name, path)))

    async def _load(self, name: str, path: str | None) -> AdapterEntry:
        validate_adapter_name(name)
        if path is not None:
            folder = resolve_adapter_path(self.store, name, path, allow_external=self.allow_external_paths)
            entry = self.entries.get(name)
            if entry is None or entry.path != folder:
                if entry is not None and entry.state == AdapterState.RESIDENT:
                    raise AdapterInvalid(f"adapter {name!r} is already loaded from {entry.path}; unload it first", param="lora_name")
                entry = self.entries[name] = AdapterEntry(name=name, path=folder)
        else:
            entry = self.get(name)
        async with entry.lock:
            if entry.state == AdapterState.RESIDENT:
                entry.unload_pending = False
                return entry
            entry.state, entry.error = AdapterState.LOADING, None
            started = time.perf_counter()
            try:
                validated = await asyncio.to_thread(self.validator, entry.path, name)
                async with self._install_lock:
                    await self._make_room(exclude=name)
                    await self.installer.add(name, validated)
                    entry.adapter = validated
                    entry.state = AdapterState.RESIDENT
            except LoraplexError as exc:
                entry.state, entry.error, entry.adapter = AdapterState.FAILED, str(exc), None
                self.on_event("failed", entry)
                raise
            except BaseException:
                if entry.state == AdapterState.LOADING:
                    entry.state = AdapterState.AVAILABLE
                raise
            entry.loaded_at = time.time()
            entry.load_seconds = time.perf_counter() - started
            entry.last_used = time.monotonic()
            self.on_event("loaded", entry)
            return entry

    async def _make_room(self, exclude: str) -> None:
        resident = [e for e in self.resident() if e.name != exclude]
        while len(resident) >= self.max_loras:
            idle = [e for e in resident if e.refcount == 0]
            if not idle:
                raise Overloaded(
                    f"all {len(resident)} resident adapters (--max-loras {self.max_loras}) are serving requests; retry later"
                )
            victim = min(idle, key=lambda e: e.last_used)
            # state first: a request arriving during the removal takes the load path, not the slot
            victim.state, victim.adapter = AdapterState.AVAILABLE, None
            await self.installer.remove(victim.name)
            resident.remove(victim)
            self.evictions += 1
            self.on_event("evicted", victim)

    async def unload(self, name: str) -> AdapterEntry:
        entry = self.get(name)
        if entry.state != AdapterState.RESIDENT:
            raise AdapterNotFound(f"adapter {name!r} is not loaded (state: {entry.state.value})", param="lora_name")
        if entry.refcount > 0:
            entry.unload_pending = True  # leaves memory when its last request finishes
            return entry
        await self._remove(entry)
        return entry

    async def _remove(self, entry: AdapterEntry) -> None:
        # state first (synchronously): a request arriving meanwhile reloads instead of using the slot
        entry.state, entry.adapter, entry.unload_pending = AdapterState.AVAILABLE, None, False
        await asyncio.shield(asyncio.ensure_future(self._remove_from_engine(entry.name)))
        self.on_event("unloaded", entry)

    async def _remove_from_engine(self, name: str) -> None:
        async with self._install_lock:
            await self.installer.remove(name)

    # ---------------------------------------------------------- per request
    async def acquire(self, name: str) -> AdapterEntry:
        """Make ``name`` resident (loading on demand) and count one request on it."""
        entry = self.get(name)
        if entry.state != AdapterState.RESIDENT:
            entry = await self.load(name)
        entry.refcount += 1
        entry.last_used = time.monotonic()
        return entry

    async def release(self, entry: AdapterEntry) -> None:
        entry.refcount -= 1
        entry.requests_served += 1
        entry.last_used = time.monotonic()
        if entry.refcount == 0 and entry.unload_pending and entry.state == AdapterState.RESIDENT:
            await self._remove(entry)

    async def refresh_changed(self) -> list[str]:
        """--watch: reload resident adapters whose weights were republished; returns their names."""
        from loraplex.server.store import ADAPTER_WEIGHTS, sha256_file

        changed = []
        for entry in self.resident():
            weights = entry.path if entry.path.is_file() else entry.path / ADAPTER_WEIGHTS
            try:
                current = await asyncio.to_thread(sha256_file, weights)
            except OSError:
                continue  # store folder removed: keep serving from memory until evicted
            if entry.adapter is not None and current != entry.adapter.weights_sha256 and entry.refcount == 0:
                await self._remove(entry)
                await self.load(entry.name)
                changed.append(entry.name)
        return changed
