"""The catalog: which models and adapters a caller sees (``/v1/models``, ``/v1/adapters``, gRPC
``ListAdapters`` / ``GetAdapter``): the bare base under its served name, then every adapter of the
store (and those shipped with an exported model) with its state.

The store listing is a directory scan: it runs in a worker thread, never on the event loop, is
shared by callers that ask at the same time, and is reused for ``max_age`` seconds; the
registry's states (resident, loading ...) are read live. A request naming an adapter the
listing has not seen yet still finds it (the registry looks it up on a miss).

Knows the registry and the access rules; nothing of HTTP, gRPC or the engine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loraplex.server.access import Access
from loraplex.server.auth import ApiKey
from loraplex.server.registry import AdapterRegistry

#: seconds a store listing is reused (a burst of /v1/models calls costs one directory scan)
CATALOG_MAX_AGE = 1.0


class Catalog:
    def __init__(self, registry: AdapterRegistry, *, base_name: str, created: int, max_model_len: int | None = None, max_age: float = CATALOG_MAX_AGE) -> None:
        self.registry = registry
        self.max_model_len = max_model_len  # every adapter shares the base's context
        self.base_name = base_name
        self.created = created
        self.max_age = max_age
        self._scanned_at: float | None = None
        self._scan: asyncio.Future | None = None

    async def refresh(self) -> None:
        """Bring the registry's list up to date with the store (one scan at a time, off the loop)."""
        if self._scanned_at is not None and time.monotonic() - self._scanned_at < self.max_age:
            return
        if self._scan is None or self._scan.done():
            self._scan = asyncio.ensure_future(self._rescan())
        await asyncio.shield(self._scan)

    async def _rescan(self) -> None:
        started = time.monotonic()
        names = await asyncio.to_thread(self.registry.store.names)
        self.registry.scan(in_store=names)  # event loop: the registry's entries change only here
        self._scanned_at = started

    async def models(self, key: ApiKey | None) -> list[dict[str, Any]]:
        await self.refresh()
        base = {"id": self.base_name, "object": "model", "created": self.created, "owned_by": "loraplex", "root": self.base_name, "parent": None, "max_model_len": self.max_model_len}
        models = [base]
        for name, entry in sorted(self.registry.entries.items()):
            models.append(
                {"id": name, "object": "model", "created": self.created, "owned_by": "loraplex", "root": str(entry.path), "parent": self.base_name, "state": entry.state.value, "max_model_len": self.max_model_len}
            )
        return [m for m in models if Access.visible(key, m["id"])]

    async def adapters(self, key: ApiKey | None) -> list[dict[str, Any]]:
        await self.refresh()
        return [self._describe(name, entry) for name, entry in sorted(self.registry.entries.items()) if Access.visible(key, name)]

    def adapter(self, name: str) -> dict[str, Any]:
        return self._describe(name, self.registry.get(name))

    def _describe(self, name: str, entry) -> dict[str, Any]:
        info = entry.describe()
        # the onnx gate of an int4 export replays each adapter's stored held-out answers on the
        # export (server/onnx/agreement.py); read duck-typed: the catalog knows nothing of onnx
        agreement = getattr(self.registry.validator, "agreement", None)
        if agreement is not None:
            found = agreement(name)  # None until converted, or without stored answers
            info["export_agreement"] = None if found is None else found.as_dict()
        return info
