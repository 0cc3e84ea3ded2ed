"""Assemble a server from ``ServerSettings``: base model (loaded once), engine, scheduler thread,
adapter registry, service, metrics and the HTTP app with its start-up / shut-down sequence.

Start-up: scan the store, preload adapters, run one real one-token forward (warm-up), then
/ready turns 200. Shut-down: stop the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from loraplex.server.api.http.app import create_app
from loraplex.server.auth import KeyRing
from loraplex.server.backends import BACKENDS
from loraplex.server.basemodel import BaseModelRef
from loraplex.server.engine.engine import EngineRequest
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.metrics import ServerMetrics
from loraplex.server.registry import AdapterRegistry
from loraplex.server.scheduler import Scheduler
from loraplex.server.service import GenerationService
from loraplex.server.settings import ServerSettings
from loraplex.server.store import AdapterStore

log = logging.getLogger("loraplex.runtime")


@dataclass
class Runtime:
    settings: ServerSettings
    ref: BaseModelRef
    backend: str
    tokenizer: Any
    engine: Any
    scheduler: Scheduler
    registry: AdapterRegistry
    service: GenerationService
    metrics: ServerMetrics
    app: Any = None
    background: list = field(default_factory=list)

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


def build_runtime(settings: ServerSettings) -> Runtime:
    backend = BACKENDS[settings.backend](settings)
    ref, tokenizer, engine = backend.ref, backend.tokenizer, backend.engine
    scheduler = Scheduler(engine, max_queue=settings.max_queue)
    metrics = ServerMetrics(vllm_compat=settings.vllm_metrics)

    def on_event(kind: str, entry) -> None:
        if kind == "evicted":
            metrics.evictions.inc()
        elif kind == "failed":
            metrics.load_failures.labels(entry.name).inc()
            log.warning("adapter %s refused: %s", entry.name, entry.error)
        else:
            log.info("adapter %s %s", entry.name, kind)

    registry = AdapterRegistry(
        AdapterStore(settings.adapters_dir),
        backend.shapes,
        backend.make_installer(scheduler),
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        allow_external_paths=settings.allow_external_adapter_paths,
        on_event=on_event,
        exported=backend.exported,
        validator=backend.validator,
    )
    service = GenerationService(
        tokenizer=tokenizer,
        scheduler=scheduler,
        registry=registry,
        metrics=metrics,
        settings=settings,
        base_name=settings.served_model_name or ref.id,
        base_fingerprint=ref.fingerprint,
        keys=KeyRing(settings.api_keys_file, settings.api_key),
    )
    metrics.bind(
        running=lambda: engine.num_running,
        waiting=lambda: scheduler.num_waiting,
        kv_usage=engine.kv_usage,
        resident=service.resident_count,
    )
    scheduler.on_step = lambda: engine.num_running and metrics.batch_size.observe(engine.num_running)
    return Runtime(settings, ref, backend.description, tokenizer, engine, scheduler, registry, service, metrics)


async def _warm_up(runtime: Runtime) -> None:
    """One real one-token forward through the scheduler: /ready means the model really runs."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def emit(token, finish):
        if finish is not None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(finish))

    prompt = [runtime.tokenizer.bos_token_id or runtime.tokenizer.eos_token_id or 0]
    runtime.scheduler.submit(EngineRequest("warmup", prompt, None, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), emit))
    finish = await done
    if finish not in ("length", "stop"):
        raise RuntimeError(f"warm-up forward failed (finish reason {finish})")


async def _watch(runtime: Runtime) -> None:
    while True:
        await asyncio.sleep(runtime.settings.watch_interval)
        try:
            before = set(runtime.registry.entries)
            runtime.registry.scan()
            added = sorted(set(runtime.registry.entries) - before)
            if added:
                log.info("watch: new adapters in the store: %s", ", ".join(added))
            for name in await runtime.registry.refresh_changed():
                log.info("watch: reloaded republished adapter %s", name)
        except Exception:  # the watcher must never die
            log.exception("watch: store poll failed")


async def start_runtime(runtime: Runtime) -> None:
    """Engine thread, store scan, preloads (a refused one is logged, never fatal), warm-up, ready."""
    runtime.scheduler.start()
    runtime.registry.scan()
    for name in runtime.settings.preload:
        try:  # internal: no API key involved
            entry = await runtime.registry.load(name)
            if entry.load_seconds is not None:
                runtime.metrics.load_seconds.observe(entry.load_seconds)
        except Exception as exc:  # noqa: BLE001 - one bad adapter must not stop the server
            log.error("preload of adapter %s failed: %s", name, exc)
    await _warm_up(runtime)
    runtime.service._update_lora_info()
    runtime.service.ready = True
    print(runtime.banner(), flush=True)
    if runtime.settings.watch:
        runtime.background.append(asyncio.create_task(_watch(runtime)))


def stop_runtime(runtime: Runtime) -> None:
    runtime.service.ready = False
    for task in runtime.background:
        task.cancel()
    runtime.scheduler.stop()


def begin_drain(app) -> None:
    """Shutdown has begun: /ready and gRPC health go NOT_SERVING and new requests get 503 /
    UNAVAILABLE at once; requests in flight go on (uvicorn and grpc then drain them)."""
    service = getattr(app.state, "service", None)
    if service is not None and not getattr(app.state, "draining", False):
        app.state.draining = True
        service.ready = False
        try:  # in-flight requests get --shutdown-timeout seconds, then end with finish reason "abort"
            asyncio.get_running_loop().call_later(service.settings.shutdown_timeout, service.abort_all)
        except RuntimeError:
            pass
    grpc_front = getattr(app.state, "grpc", None)
    if grpc_front is not None:
        try:
            asyncio.get_running_loop().create_task(grpc_front.set_serving(False))
        except RuntimeError:  # no running loop in this thread: the lifespan shutdown sets it
            pass


def reload_keys(app) -> None:
    """SIGHUP: re-read the API key file (requests in flight are not affected)."""
    service = getattr(app.state, "service", None)
    if service is not None:
        try:
            service.keys.reload()
            log.info("API keys reloaded")
        except Exception as exc:  # a broken file keeps the previous keys
            log.error("API key reload failed, keeping the previous keys: %s", exc)


def create_server_app(settings: ServerSettings, on_fatal=None):
    """The HTTP app. It listens at once (/health answers, /ready is 503) while the base loads in
    a worker thread; a load failure is logged and ``on_fatal`` stops the process."""
    holder: dict[str, Runtime] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        grpc_front = None
        if settings.grpc_port:
            from loraplex.server.api.grpc.server import GrpcFront

            grpc_front = GrpcFront(lambda: getattr(app.state, "service", None), settings.host, settings.grpc_port)
            await grpc_front.start()  # NOT_SERVING until the base is loaded and warm
            app.state.grpc = grpc_front

        async def boot():
            try:
                # Test hook: hold the "loading" phase open so probes can observe it (never set in production).
                await asyncio.sleep(float(os.environ.get("LORAPLEX_TEST_STARTUP_DELAY", "0")))
                runtime = await asyncio.to_thread(build_runtime, settings)
                holder["runtime"] = runtime
                app.state.metrics = runtime.metrics
                app.state.service = runtime.service
                await start_runtime(runtime)
                if grpc_front is not None:
                    await grpc_front.set_serving(True)
            except Exception as exc:
                log.error("start-up failed: %s", exc)
                app.state.fatal = str(exc)
                if on_fatal is not None:
                    on_fatal(exc)

        task = asyncio.create_task(boot())
        try:
            yield
        finally:
            task.cancel()
            if "runtime" in holder:
                holder["runtime"].service.ready = False
            if grpc_front is not None:
                await grpc_front.stop(grace=settings.shutdown_timeout + 2)
            if "runtime" in holder:
                stop_runtime(holder["runtime"])

    app = create_app(None, None, lifespan=lifespan)
    app.state.holder = holder
    return app
