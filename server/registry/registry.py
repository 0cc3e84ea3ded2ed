"""The adapter registry: name -> state, LRU over idle resident adapters, refcounts, and the one
place that decides what the engine holds.

States: ``available`` (in the store, not in memory) -> ``loading`` -> ``resident``; a refused
adapter is ``failed`` with its reason (and is retried by the next request).

Rules (each one closes a race that gave 500s; docs/reliability.md):

* A request pins its adapter (``refcount``) *before* anything is awaited, and holds the pin
  through the load: a concurrent load can never evict an adapter that a request is about to use.
* Every change to what the engine holds (install, evict, unload, swap) runs under one lock, and
  the registry's view changes only after the engine confirmed: an eviction the engine refuses
  leaves the victim resident in both. ``check_consistent`` compares the two.
* Only idle adapters (no pin) are evicted, and only once the newcomer has validated. When every
  slot is busy, a load waits for a release up to ``wait_timeout`` seconds, then answers
  ``Overloaded`` (429); an overload is never recorded as the adapter's failure.
* A republished adapter (``republish``, from the store watcher) is validated first and installed
  as a new engine copy beside the old one; requests switch to it at once, requests already
  running finish on the old copy, which leaves the engine when its last one releases. The
  resident copy keeps serving when the new one is refused. Never unload first.
* A weighted mix (``acquire_many``) holds all its members or none. Members that must be loaded
  are loaded by one mix at a time (``_mix_lock``): a mix holding some of its members while it
  waits for a slot is the only holder that is not a running request, so two mixes can never
  wait on each other's slots.

Engine copies are named ``<adapter>`` or, while an older copy is still in use, ``<adapter>@<n>``
('@' is not allowed in adapter names). Used from the asyncio event loop only. Knows nothing of
HTTP, gRPC or tokenization.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Mapping, Protocol, Sequence

from loraplex.server.errors import AdapterInvalid, AdapterNotFound, LoraplexError, Overloaded, RequestInvalid
from loraplex.server.store.validation import BaseShapes, ValidatedAdapter, load_validated_adapter, resolve_adapter_path
from loraplex.server.store import AdapterStore
from loraplex.server.store.fingerprint import StoreSignature, content_digest, signature
from loraplex.server.store.names import validate_adapter_name

log = logging.getLogger("loraplex.registry")


class Installer(Protocol):
    """Puts adapters into / takes them out of the engine (on its thread, between steps)."""

    async def add(self, name: str, adapter: ValidatedAdapter) -> None: ...

    async def remove(self, name: str) -> None: ...


class AdapterState(str, Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    RESIDENT = "resident"
    FAILED = "failed"


@dataclass(eq=False)
class EngineCopy:
    """One installed copy of an adapter in the engine, and the requests running on it."""

    engine_name: str
    adapter: ValidatedAdapter
    users: int = 0


@dataclass(eq=False)
class Lease:
    """One request's hold on an adapter: the engine copy it runs on (``engine_name`` goes into the
    engine request). Given back with ``AdapterRegistry.release``."""

    entry: "AdapterEntry"
    copy: EngineCopy
    released: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def engine_name(self) -> str:
        return self.copy.engine_name


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: Path
    state: AdapterState = AdapterState.AVAILABLE
    error: str | None = None
    refcount: int = 0  # requests holding or waiting for this adapter (pins)
    last_used: float = 0.0
    loaded_at: float | None = None
    load_seconds: float | None = None
    requests_served: int = 0
    unload_pending: bool = False
    copy: EngineCopy | None = None  # what new requests run on (set while resident)
    retiring: list[EngineCopy] = field(default_factory=list)  # older copies still in use
    evicting: bool = False  # an eviction is being settled with the engine (install lock held)
    store_signature: StoreSignature | None = None  # the store entry as it was when this copy validated
    content: str | None = None  # content digest of that store entry
    load_task: asyncio.Future | None = field(default=None, repr=False)
    copies_made: int = 0

    @property
    def adapter(self) -> ValidatedAdapter | None:
        return self.copy.adapter if self.copy is not None else None

    @property
    def usable(self) -> bool:
        return self.state == AdapterState.RESIDENT and self.copy is not None and not self.evicting

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


def _consume(task: asyncio.Future) -> None:
    """Done-callback: a background task's exception is logged by its owner, never 'never retrieved'."""
    if not task.cancelled():
        task.exception()


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
        wait_timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.base = base
        self.installer = installer
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.allow_external_paths = allow_external_paths
        self.wait_timeout = wait_timeout
        # adapters that come with the served model (``.onnx_adapter`` files of an ONNX export);
        # a store folder of the same name wins (it is the source those files were made from)
        self.exported = dict(exported or {})
        # the backend's gate (default: full validation of the tensors against the base shapes)
        self.validator = validator or (lambda path, name: load_validated_adapter(path, name, self.base, max_lora_rank=self.max_lora_rank))
        self.entries: dict[str, AdapterEntry] = {}
        # events: loaded (entry.load_seconds set), failed (entry.error set), evicted, unloaded, republished
        self.on_event = on_event or (lambda kind, entry: None)
        self._install_lock = asyncio.Lock()  # every change to what the engine holds
        self._mix_lock = asyncio.Lock()  # one mix at a time loads members while holding others
        self._slot_freed = asyncio.Event()  # replaced at each signal: waiters keep the one they saw
        self._background: set[asyncio.Future] = set()
        self._removals: set[asyncio.Future] = set()  # old copies and pending unloads on their way out
        self.evictions = 0
        self.overloads = 0

    # ------------------------------------------------------------ discovery
    def scan(self, in_store: Iterable[str] | None = None) -> None:
        """Register adapters present in the store; forget vanished ones that are idle and not in
        memory. ``in_store``: the store's names when the caller listed them already (the catalog
        lists them in a worker thread, so this runs on the event loop without touching the disk)."""
        in_store = set(self.store.names() if in_store is None else in_store)
        present = in_store | set(self.exported)
        for name in present:
            if name not in self.entries:
                path = self.store.root / name if name in in_store else self.exported[name]
                self.entries[name] = AdapterEntry(name=name, path=path)
        for name in list(self.entries):
            entry = self.entries[name]
            if (
                name not in present
                and entry.state in (AdapterState.AVAILABLE, AdapterState.FAILED)
                and entry.refcount == 0
                and (entry.load_task is None or entry.load_task.done())
                and entry.path.parent == self.store.root
            ):
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

    # ---------------------------------------------------------- per request
    async def acquire(self, name: str) -> Lease:
        """Pin ``name``, make it resident (loading on demand, waiting up to ``wait_timeout`` for a
        slot) and count one request on its current engine copy."""
        entry = self.get(name)
        entry.refcount += 1  # pinned before any await: no concurrent load may evict it now
        try:
            while not entry.usable:
                await self._ensure_resident(entry)
        except BaseException:
            self._unpin(entry)
            raise
        copy = entry.copy
        assert copy is not None
        copy.users += 1
        entry.last_used = time.monotonic()
        return Lease(entry, copy)

    async def acquire_many(self, names: Sequence[str], *, wait: float | None = None) -> list[Lease]:
        """Leases on every adapter of a weighted mix, in ``names`` order: all members resident
        and pinned, or (on any error, or when cancelled) none pinned.

        When every member is already usable they are pinned at once (no await). Otherwise the
        mix waits its turn for ``_mix_lock`` (at most ``wait`` seconds, default
        ``--adapter-wait-timeout``, then Overloaded), pins every member and loads the missing ones
        on demand with exactly ``acquire``'s rules (validation, eviction of idle adapters, each
        load waiting at most ``--adapter-wait-timeout`` for a slot, then Overloaded: 429, never
        the adapter's failure). RequestInvalid (400) for no names, a name twice, or
        more members than ``--max-loras`` (they could never be resident together);
        AdapterNotFound for an unknown member (before anything is pinned)."""
        names = list(names)
        if not names:
            raise RequestInvalid("a mix needs at least one adapter", param="adapters")
        twice = [name for name, count in Counter(names).items() if count > 1]
        if twice:
            raise RequestInvalid(f"a mix names adapter {twice[0]!r} twice", param="adapters")
        if len(names) > self.max_loras:
            raise RequestInvalid(
                f"the mix combines {len(names)} adapters but at most {self.max_loras} can be resident at once (--max-loras {self.max_loras})",
                param="adapters",
            )
        entries = [self.get(name) for name in names]
        if all(entry.usable for entry in entries):
            return [self._lease(entry) for entry in entries]
        limit = self.wait_timeout if wait is None else wait
        try:
            await asyncio.wait_for(self._mix_lock.acquire(), limit)
        except TimeoutError:
            self.overloads += 1
            raise Overloaded(
                f"the mix {'+'.join(names)} waited {limit:g}s (--adapter-wait-timeout) while other mixes loaded their adapters "
                f"(--max-loras {self.max_loras}): retry later"
            ) from None
        try:
            for entry in entries:
                entry.refcount += 1  # pinned: a member loaded first is not evicted for a later one
            try:
                while not all(entry.usable for entry in entries):
                    for entry in entries:
                        while not entry.usable:
                            await self._ensure_resident(entry)  # Overloaded after --adapter-wait-timeout without a slot
            except BaseException:
                for entry in entries:
                    self._unpin(entry)
                raise
        finally:
            self._mix_lock.release()
        # every member pinned above and usable: count one request on each current copy
        leases = []
        for entry in entries:
            copy = entry.copy
            assert copy is not None
            copy.users += 1
            entry.last_used = time.monotonic()
            leases.append(Lease(entry, copy))
        return leases

    def _lease(self, entry: AdapterEntry) -> Lease:
        """Pin a usable entry and count one request on its current copy (no await)."""
        entry.refcount += 1
        copy = entry.copy
        assert copy is not None
        copy.users += 1
        entry.last_used = time.monotonic()
        return Lease(entry, copy)

    async def release_many(self, leases: Sequence[Lease]) -> None:
        """Give back every lease of a mix (each once; safe to call again)."""
        for lease in leases:
            await self.release(lease)

    async def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        entry, copy = lease.entry, lease.copy
        copy.users -= 1
        entry.requests_served += 1
        entry.last_used = time.monotonic()
        if copy.users == 0 and copy in entry.retiring:
            self._spawn(self._retire(entry, copy), removal=True)
        self._unpin(entry)
        if entry.refcount == 0 and entry.unload_pending and entry.state == AdapterState.RESIDENT:
            try:  # the request itself is done: a failed removal must not turn it into an error
                await asyncio.shield(self._spawn(self._unload_now(entry), removal=True))
            except Exception as exc:  # noqa: BLE001 - it stays resident, in both views
                log.warning("pending unload of adapter %s failed (it stays resident): %s", entry.name, exc)

    def _unpin(self, entry: AdapterEntry) -> None:
        entry.refcount -= 1
        if entry.refcount == 0:
            self._signal()

    def _signal(self) -> None:
        """An adapter became idle or left: loads waiting for a slot look again."""
        self._slot_freed.set()
        self._slot_freed = asyncio.Event()

    def _spawn(self, coro, *, removal: bool = False) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        for group in (self._background, self._removals) if removal else (self._background,):
            group.add(task)
            task.add_done_callback(group.discard)
        task.add_done_callback(_consume)
        return task

    # ------------------------------------------------------------- loading
    async def load(self, name: str, path: str | None = None) -> AdapterEntry:
        """Validate and install ``name`` (from the store, or ``path``); idempotent when resident
        (and then it cancels a pending unload)."""
        validate_adapter_name(name)
        if path is not None:
            folder = resolve_adapter_path(self.store, name, path, allow_external=self.allow_external_paths)
            entry = self.entries.get(name)
            if entry is None or entry.path != folder:
                if entry is not None and (entry.state != AdapterState.AVAILABLE and entry.state != AdapterState.FAILED or entry.refcount):
                    raise AdapterInvalid(f"adapter {name!r} is already loaded from {entry.path}; unload it first", param="lora_name")
                entry = self.entries[name] = AdapterEntry(name=name, path=folder)
        else:
            entry = self.get(name)
        entry.refcount += 1  # pinned while loading, like a request: not evicted before we return
        try:
            while not entry.usable:
                await self._ensure_resident(entry)
            entry.unload_pending = False
        finally:
            self._unpin(entry)
        return entry

    async def _ensure_resident(self, entry: AdapterEntry) -> None:
        """Join (or start) the entry's one load. The load runs in its own task, shielded: a caller
        that is cancelled (client disconnect, deadline) never leaves it half done."""
        task = entry.load_task
        if task is None or task.done():
            task = entry.load_task = self._spawn(self._load(entry))
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and entry.load_task is task:
                entry.load_task = None

    async def _load(self, entry: AdapterEntry) -> None:
        while entry.evicting:  # an eviction of this adapter is being settled: see how it ends
            async with self._install_lock:
                pass
        if entry.usable:
            return
        entry.state, entry.error = AdapterState.LOADING, None
        try:
            started = time.perf_counter()
            before, validated, digest = await self._validate_settled(entry)
            validate_seconds = time.perf_counter() - started
        except LoraplexError as exc:
            entry.state, entry.error = AdapterState.FAILED, str(exc)
            self.on_event("failed", entry)
            raise
        except Exception as exc:
            entry.state = AdapterState.FAILED
            entry.error = f"validation failed unexpectedly: {type(exc).__name__}: {exc}"
            self.on_event("failed", entry)
            raise
        except BaseException:  # cancelled (shutdown)
            entry.state = AdapterState.AVAILABLE
            raise
        try:
            install_seconds = await self._install_new(entry, validated)
        except asyncio.CancelledError:
            entry.state = AdapterState.AVAILABLE
            raise
        except Overloaded:
            entry.state = AdapterState.AVAILABLE  # not the adapter's fault: no error, no event
            self.overloads += 1
            raise
        except BaseException as exc:
            entry.state = AdapterState.FAILED
            entry.error = f"the engine refused it: {type(exc).__name__}: {exc}"
            if isinstance(exc, Exception):
                self.on_event("failed", entry)
            raise
        entry.store_signature, entry.content = before, digest
        entry.loaded_at = time.time()
        entry.load_seconds = validate_seconds + install_seconds  # slot waiting not included
        entry.last_used = time.monotonic()
        self.on_event("loaded", entry)

    async def _validate_settled(self, entry: AdapterEntry, attempts: int = 3):
        """Validate the store entry as one whole: when it changed while being read (a republish
        landed between reading the config and the weights), read it again."""
        for attempt in range(attempts):
            before = signature(entry.path)
            validated = await asyncio.to_thread(self.validator, entry.path, entry.name)
            digest = await asyncio.to_thread(self._digest, entry.path)
            if signature(entry.path) == before:
                break
            log.info("adapter %s changed in the store while being validated; reading it again", entry.name)
        return before, validated, digest

    @staticmethod
    def _digest(path: Path) -> str | None:
        try:
            return content_digest(path)
        except OSError:
            return None

    async def _install_new(self, entry: AdapterEntry, validated: ValidatedAdapter) -> float:
        """Find a slot (evicting the least recently used idle adapter, or waiting for one to go
        idle until ``wait_timeout``) and install; returns the seconds the install took."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while True:
            freed = self._slot_freed  # any release from now on sets this one
            async with self._install_lock:
                others = [e for e in self.resident() if e is not entry]
                if len(others) >= self.max_loras:
                    for victim in sorted(others, key=lambda e: e.last_used):
                        if victim.refcount == 0 and victim.usable and await self._evict(victim):
                            others.remove(victim)
                            break
                if len(others) < self.max_loras:
                    started = time.perf_counter()
                    await self._add_copy(entry, validated)
                    entry.state = AdapterState.RESIDENT
                    return time.perf_counter() - started
                busy = len(others)
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(freed.wait(), remaining)
            except TimeoutError:
                raise Overloaded(
                    f"all {busy} adapter slots (--max-loras {self.max_loras}) are serving requests for other adapters; "
                    f"no slot freed within --adapter-wait-timeout {self.wait_timeout:g}s: retry later"
                ) from None

    async def _add_copy(self, entry: AdapterEntry, validated: ValidatedAdapter) -> EngineCopy:
        """Install lock held: put ``validated`` into the engine under a fresh copy name."""
        in_use = {c.engine_name for c in entry.retiring} | ({entry.copy.engine_name} if entry.copy else set())
        engine_name = entry.name
        while engine_name in in_use:
            entry.copies_made += 1
            engine_name = f"{entry.name}@{entry.copies_made}"
        try:
            await self.installer.add(engine_name, validated)
        except BaseException:
            try:  # leave nothing half-installed behind
                await self.installer.remove(engine_name)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.exception("removing the failed install of %s from the engine failed", engine_name)
            raise
        # keep what describes the copy, not its tensors: the engine holds the weights now (the
        # validated fp32 tensors were ~1x the adapter file of RSS per resident adapter)
        summary = dataclasses.replace(validated, modules={}, summary_rank=validated.max_rank, summary_modules=validated.module_names)
        copy = EngineCopy(engine_name, summary)
        entry.copy = copy
        return copy

    async def _evict(self, victim: AdapterEntry) -> bool:
        """Install lock held, victim idle: take it out of the engine, then out of the registry.
        False (victim still resident in both) when the engine refuses."""
        victim.evicting = True
        try:
            await self.installer.remove(victim.copy.engine_name)
        except Exception as exc:  # noqa: BLE001 - the engine says no: it stays resident, in both
            log.warning("eviction of adapter %s refused by the engine (it stays resident): %s", victim.name, exc)
            return False
        else:
            victim.copy, victim.state = None, AdapterState.AVAILABLE
            self.evictions += 1
            self.on_event("evicted", victim)
            return True
        finally:
            victim.evicting = False

    # ------------------------------------------------------------- unloading
    async def unload(self, name: str) -> AdapterEntry:
        entry = self.get(name)
        if entry.state != AdapterState.RESIDENT:
            raise AdapterNotFound(f"adapter {name!r} is not loaded (state: {entry.state.value})", param="lora_name")
        if entry.refcount > 0:
            entry.unload_pending = True  # leaves memory when its last request finishes
            return entry
        await asyncio.shield(self._spawn(self._unload_now(entry), removal=True))
        return entry

    async def _unload_now(self, entry: AdapterEntry) -> None:
        async with self._install_lock:
            if entry.state != AdapterState.RESIDENT or entry.refcount > 0 or entry.copy is None:
                return  # reloaded or picked up by a request meanwhile: keep it
            entry.evicting = True
            try:
                await self.installer.remove(entry.copy.engine_name)
            finally:
                entry.evicting = False
            entry.copy, entry.state, entry.unload_pending = None, AdapterState.AVAILABLE, False
        self._signal()
        self.on_event("unloaded", entry)

    async def _retire(self, entry: AdapterEntry, copy: EngineCopy) -> None:
        """An older copy's last request finished: it leaves the engine."""
        async with self._install_lock:
            if copy not in entry.retiring or copy.users:
                return
            try:
                await self.installer.remove(copy.engine_name)
            except Exception as exc:  # noqa: BLE001 - stays listed as retiring; retried by reap()
                log.warning("removing the old copy %s of adapter %s failed (retried later): %s", copy.engine_name, entry.name, exc)
                return
            entry.retiring.remove(copy)

    async def reap(self) -> None:
        """Retry removing old copies that nothing uses any more (a removal the engine refused)."""
        for entry in list(self.entries.values()):
            for copy in [c for c in entry.retiring if c.users == 0]:
                await self._retire(entry, copy)

    # ------------------------------------------------------------ republish
    async def republish(self, name: str, seen: StoreSignature) -> str:
        """--watch: the resident adapter ``name``'s store entry changed and has stayed ``seen``
        for two polls. Validate the new content and swap it in (old copy serves until then).

        Returns what happened: "swapped", "unchanged" (same bytes), "unstable" (changed again
        while being read), "skipped" (no longer resident). Raises AdapterInvalid (or another
        error) when the new content is refused; the resident copy keeps serving.
        """
        entry = self.entries.get(name)
        if entry is None or not entry.usable:
            return "skipped"
        started = time.perf_counter()
        digest = await asyncio.to_thread(self._digest, entry.path)
        if digest is not None and digest == entry.content:
            entry.store_signature = seen
            return "unchanged"
        validated = await asyncio.to_thread(self.validator, entry.path, name)
        if signature(entry.path) != seen or await asyncio.to_thread(self._digest, entry.path) != digest:
            return "unstable"
        validate_seconds = time.perf_counter() - started
        async with self._install_lock:
            if not entry.usable:
                return "skipped"
            if digest is not None and digest == entry.content:  # reloaded from the new content meanwhile
                entry.store_signature = seen
                return "unchanged"
            old = entry.copy
            started = time.perf_counter()
            await self._add_copy(entry, validated)  # the old copy stays until the new one is in
            install_seconds = time.perf_counter() - started
            entry.store_signature, entry.content = seen, digest
            entry.error = None
            if old.users:
                entry.retiring.append(old)  # running requests finish on it; it leaves with the last
            else:
                try:
                    await self.installer.remove(old.engine_name)
                except Exception as exc:  # noqa: BLE001 - retried by reap()
                    log.warning("removing the old copy %s of adapter %s failed (retried later): %s", old.engine_name, name, exc)
                    entry.retiring.append(old)
        entry.loaded_at = time.time()
        entry.load_seconds = validate_seconds + install_seconds
        self.on_event("republished", entry)
        return "swapped"

    # ---------------------------------------------------------- consistency
    async def check_consistent(self, engine_names: Callable[[], Awaitable[list[str]]]) -> dict:
        """Compare what the registry believes the engine holds with what it holds
        (``engine_names``: the engine's resident adapters, asked on its thread), with no
        install, eviction or removal in progress. ``consistent`` is False on any difference,
        more resident adapters than --max-loras, or a negative count. Every change to what the
        engine holds happens under the install lock, so under it the two views must be equal.
        Removals already on their way (an old copy whose last request just finished) settle first."""
        if self._removals:
            await asyncio.gather(*list(self._removals), return_exceptions=True)
        async with self._install_lock:
            actual = sorted(await engine_names())
            expected = sorted(
                [e.copy.engine_name for e in self.entries.values() if e.state == AdapterState.RESIDENT and e.copy is not None]
                + [c.engine_name for e in self.entries.values() for c in e.retiring]
            )
            problems = []
            for e in self.entries.values():
                if (e.state == AdapterState.RESIDENT) != (e.copy is not None):
                    problems.append(f"{e.name}: state {e.state.value} but copy {e.copy.engine_name if e.copy else None}")
                if e.refcount < 0 or (e.copy is not None and e.copy.users < 0):
                    problems.append(f"{e.name}: negative count (refcount {e.refcount})")
            resident = len(self.resident())
            if resident > self.max_loras:
                problems.append(f"{resident} adapters resident, above --max-loras {self.max_loras}")
            return {
                "consistent": actual == expected and not problems,
                "registry": expected,
                "engine": actual,
                "missing_in_engine": sorted(set(expected) - set(actual)),
                "unknown_to_registry": sorted(set(actual) - set(expected)),
                "problems": problems,
                "resident": resident,
                "max_loras": self.max_loras,
                "pinned": {e.name: e.refcount for e in self.entries.values() if e.refcount},
                "evictions": self.evictions,
                "overloads": self.overloads,
            }
