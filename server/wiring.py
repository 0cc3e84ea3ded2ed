"""Build one server's object graph from ``ServerSettings``: the backend (base, tokenizer, engine:
``BACKENDS`` in ``server/backends.py``), the scheduler that owns the engine, the adapter
registry over the store, the metrics and the service the fronts call.

Construction only: nothing here starts a thread, reads a socket, answers a request or decides
when the server is ready (``server/lifecycle.py`` does that). Knows no HTTP or gRPC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from loraplex.server.auth import KeyRing
from loraplex.server.backends import BACKENDS
from loraplex.server.basemodel import BaseModelRef
from loraplex.server.metrics import ServerMetrics
from loraplex.server.readiness import Readiness
from loraplex.server.registry import AdapterRegistry
from loraplex.server.scheduler import Scheduler
from loraplex.server.service import GenerationService
from loraplex.server.settings import ServerSettings
from loraplex.server.store import AdapterStore

log = logging.getLogger("loraplex.runtime")


@dataclass
class Runtime:
    """Everything one server process is made of (built once, started by the lifecycle)."""

    settings: ServerSettings
    ref: BaseModelRef
    backend: str
    tokenizer: Any
    engine: Any
    scheduler: Scheduler
    registry: AdapterRegistry
    service: GenerationService
    metrics: ServerMetrics
    readiness: Readiness
    background: list = field(default_factory=list)  # asyncio tasks the lifecycle cancels at stop

    def banner(self) -> str:
        names = sorted(self.registry.entries)
        grpc = f", gRPC on {self.settings.host}:{self.settings.grpc_port}" if self.settings.grpc_port else ", gRPC off"
        return (
            f"loraplex: ready. HTTP on http://{self.settings.host}:{self.settings.port}{grpc}\n"
            f"  base: {self.ref.id} (fingerprint {self.ref.fingerprint}, {self.ref.path})\n"
            f"  backend: {self.backend}; max batch {self.settings.max_batch_size}, "
            f"max model len {self.settings.max_model_len}, max loras {self.settings.max_loras}\n"
            f"  adapters in {self.settings.adapters_dir}: {', '.join(names) if names else '(none)'}"
        )


def adapter_event_sink(metrics: ServerMetrics) -> Callable[[str, Any], None]:
    """The registry's ``on_event``: evictions and refusals counted, every change logged."""

    def on_event(kind: str, entry) -> None:
        if kind == "evicted":
            metrics.evictions.inc()
        elif kind == "failed":
            metrics.load_failures.labels(entry.name).inc()
            log.warning("adapter %s refused: %s", entry.name, entry.error)
        elif kind in ("loaded", "republished"):  # every load path: API, preload, on demand, --watch
            if entry.load_seconds is not None:
                metrics.load_seconds.observe(entry.load_seconds)
            log.info("adapter %s %s", entry.name, kind)
        else:
            log.info("adapter %s %s", entry.name, kind)

    return on_event


def build_runtime(settings: ServerSettings, readiness: Readiness | None = None) -> Runtime:
    """Load the base and assemble the server (slow: runs in a worker thread at start-up)."""
    readiness = readiness or Readiness()
    backend = BACKENDS[settings.backend](settings)
    engine = backend.engine
    metrics = ServerMetrics(vllm_compat=settings.vllm_metrics)
    scheduler = Scheduler(engine, max_queue=settings.max_queue, on_step=lambda: metrics.observe_batch(engine.num_running))
    registry = AdapterRegistry(
        AdapterStore(settings.adapters_dir),
        backend.shapes,
        backend.make_installer(scheduler),
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        allow_external_paths=settings.allow_external_adapter_paths,
        on_event=adapter_event_sink(metrics),
        exported=backend.exported,
        validator=backend.validator,
        wait_timeout=settings.adapter_wait_timeout,
    )
    service = GenerationService(
        tokenizer=backend.tokenizer,
        scheduler=scheduler,
        registry=registry,
        metrics=metrics,
        settings=settings,
        base_name=settings.served_model_name or backend.ref.id,
        base_fingerprint=backend.ref.fingerprint,
        keys=KeyRing(settings.api_keys_file, settings.api_key),
        readiness=readiness,
    )
    metrics.bind(
        running=lambda: engine.num_running,
        waiting=lambda: scheduler.num_waiting,
        kv_usage=lambda: engine.stats().kv_usage,
        resident=service.resident_count,
    )
    return Runtime(settings, backend.ref, backend.description, backend.tokenizer, engine, scheduler, registry, service, metrics, readiness)
