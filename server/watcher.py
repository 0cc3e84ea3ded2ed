"""``--watch``: poll the adapter store, register adapters published while running, and swap in
resident adapters that were republished, safely for any way of writing them.

``train-adapter`` (and ``AdapterStore.publish``) publish atomically: a hidden staging folder
renamed into place. Anything else (``cp``, ``rsync``, an editor, a half-finished upload) is
handled by these rules:

* the store entry's signature covers config, weights and manifest together (a config-only
  change counts), and a folder swapped in by rename (new inodes);
* a changed entry is looked at only once it is whole (``incomplete_reason``) and has kept the
  same signature for two polls in a row (nothing wrote to it for a whole interval);
* the new content is validated before anything changes; the resident copy keeps serving until
  the new one is installed (``AdapterRegistry.republish``); refused content is logged once and
  the old copy goes on serving; a vanished folder changes nothing (served from memory).

Knows the registry and the store's fingerprints; nothing of HTTP, engines or models.
"""

from __future__ import annotations

import asyncio
import logging

from loraplex.server.registry import AdapterRegistry
from loraplex.server.store.fingerprint import StoreSignature, incomplete_reason, signature

log = logging.getLogger("loraplex.watch")


class StoreWatcher:
    def __init__(self, registry: AdapterRegistry, interval: float) -> None:
        self.registry = registry
        self.interval = interval
        self._last_seen: dict[str, StoreSignature | None] = {}  # name -> signature at the previous poll
        self._refused: dict[str, StoreSignature] = {}  # name -> content already refused (logged once)

    async def run(self) -> None:
        """Poll forever (cancelled at shutdown); a failed poll is logged and the next one runs."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception:  # the watcher must never die
                log.exception("watch: store poll failed")

    async def poll(self) -> list[str]:
        """One look at the store; returns the names of adapters swapped for a new copy."""
        registry = self.registry
        before = set(registry.entries)
        registry.scan()
        added = sorted(set(registry.entries) - before)
        if added:
            log.info("watch: new adapters in the store: %s", ", ".join(added))
        swapped = []
        for entry in list(registry.resident()):
            name = entry.name
            now = await asyncio.to_thread(signature, entry.path)
            previous = self._last_seen.get(name)
            self._last_seen[name] = now
            if now is None or now == entry.store_signature:
                continue  # gone (keep serving from memory), or unchanged
            if now != previous or now == self._refused.get(name):
                continue  # still being written (changed since the last poll), or already refused
            reason = await asyncio.to_thread(incomplete_reason, entry.path)
            if reason is not None:
                self._refused[name] = now  # logged once; looked at again when it changes
                log.info("watch: adapter %s changed but is not complete (%s); still serving the resident copy", name, reason)
                continue
            try:
                outcome = await registry.republish(name, now)
            except Exception as exc:  # noqa: BLE001 - refused: the resident copy keeps serving
                self._refused[name] = now
                log.warning("watch: republished adapter %s refused, still serving the resident copy: %s", name, exc)
                continue
            self._refused.pop(name, None)
            if outcome == "swapped":  # logged by the registry's "republished" event
                swapped.append(name)
        for name in [n for n in self._last_seen if n not in registry.entries]:
            del self._last_seen[name]
        await registry.reap()
        return swapped


def start_watcher(registry: AdapterRegistry, interval: float) -> asyncio.Task:
    """The watcher as a background task of the running loop."""
    return asyncio.create_task(StoreWatcher(registry, interval).run())
