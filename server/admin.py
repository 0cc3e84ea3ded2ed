"""Adapter administration for admin keys: load (from the store, or an allowed path), unload
(deferred while requests use it), and the registry-vs-engine consistency check.

The registry does the work and owns the rules; this module checks the role and keeps the
adapter activity gauge fresh. Knows nothing of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loraplex.server.access import Access
from loraplex.server.metrics import AdapterActivity
from loraplex.server.registry import AdapterRegistry
from loraplex.server.scheduler import Scheduler


class AdapterAdmin:
    def __init__(self, access: Access, registry: AdapterRegistry, scheduler: Scheduler, activity: AdapterActivity) -> None:
        self.access, self.registry, self.scheduler, self.activity = access, registry, scheduler, activity

    async def load(self, name: str, path: str | None, credential: str | None) -> dict[str, Any]:
        self.access.require_admin(credential)
        try:
            entry = await self.registry.load(name, path)  # its load time is observed by the registry's "loaded" event
        finally:
            self.activity.publish()
        return entry.describe()

    async def unload(self, name: str, credential: str | None) -> dict[str, Any]:
        self.access.require_admin(credential)
        entry = await self.registry.unload(name)
        self.activity.publish()
        return entry.describe()

    async def consistency(self, credential: str | None) -> dict[str, Any]:
        """Do the registry and the engine agree on the resident adapters? (asked with no install
        or eviction in progress; the engine answers on its own thread)"""
        self.access.require_admin(credential)

        async def engine_names() -> list[str]:
            return await asyncio.wrap_future(self.scheduler.call(lambda engine: list(engine.resident_adapters)))

        return await self.registry.check_consistent(engine_names)
