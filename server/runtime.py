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
from typing import Any, Callable

from loraplex.server.api.http.app import create_app
from loraplex.server.auth import KeyRing
from loraplex.server.basemodel import BaseModelRef, load_base_model, load_tokenizer, resolve_base
from loraplex.server.errors import BaseModelError
from loraplex.server.engine.engine import Engine, EngineRequest
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.metrics import ServerMetrics
from loraplex.server.registry import AdapterRegistry, BaseShapes
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


def _eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return sorted(ids)


@dataclass
class Backend:
    """What a serving backend contributes: the base, its tokenizer, an engine, what adapters are
    validated against, adapters shipped with the model, and how adapters get into the engine."""

    ref: BaseModelRef
    tokenizer: Any
    engine: Any  # a RowEngine: the torch Engine or the OnnxEngine
    shapes: BaseShapes
    description: str
    make_installer: Callable[[Scheduler], Any]
    exported: dict = field(default_factory=dict)
    validator: Callable | None = None  # the registry's gate; None = full validation on every load


def _torch_backend(settings: ServerSettings) -> Backend:
    ref = resolve_base(settings.base)
    device, quantize = settings.resolved_device(), settings.resolved_quantize()
    tokenizer = load_tokenizer(ref)
    model = load_base_model(ref, quantize=quantize, device=device)
    shapes = BaseShapes.from_model(model, ref.fingerprint)  # before the engine wraps the Linear layers
    engine = Engine(
        model,
        eos_token_ids=_eos_ids(tokenizer, model),
        max_batch_size=settings.max_batch_size,
        max_model_len=settings.max_model_len,
        device=device,
    )

    def make_installer(scheduler: Scheduler):
        class EngineInstaller:
            async def add(self, name, adapter):
                modules = adapter.modules
                # Fast path: a free slot that fits is written from a worker thread while decoding goes on.
                if await asyncio.to_thread(engine.add_adapter_in_place, name, modules):
                    return
                await asyncio.wrap_future(scheduler.call(lambda e: e.add_adapter(name, modules)))

            async def remove(self, name):
                await asyncio.wrap_future(scheduler.call(lambda e: e.remove_adapter(name)))

        return EngineInstaller()

    return Backend(ref, tokenizer, engine, shapes, f"torch, quantization {quantize} on {device}", make_installer)


def _onnx_backend(settings: ServerSettings) -> Backend:
    from pathlib import Path

    from loraplex.server.onnx.engine import OnnxEngine, genai_eos_ids
    from loraplex.server.onnx.gate import OnnxAdapterGate, default_adapter_cache
    from loraplex.server.onnx.manifest import read_export_manifest
    from loraplex.server.onnx.stacked import StackedOnnxEngine
    from loraplex.server.store.onnx_adapter import OnnxAdapterTensors

    folder = Path(settings.model).expanduser().resolve()
    manifest = read_export_manifest(folder)
    ref = BaseModelRef(manifest.base_model_id, folder, manifest.base_fingerprint)
    tokenizer = load_tokenizer(ref)
    eos = sorted(set(genai_eos_ids(folder)) | set(_eos_ids(tokenizer, None)))
    limits = dict(eos_token_ids=eos, max_batch_size=settings.max_batch_size, max_model_len=settings.max_model_len)
    mixed = settings.onnx_batching == "mixed"
    if mixed and not (manifest.stacked_graph and (folder / manifest.stacked_graph).is_file()):
        raise BaseModelError(f"--model {folder} has no mixed-batch graph (exported by an older loraplex?): re-export it, or pass --onnx-batching per-request")
    engine = StackedOnnxEngine(folder, manifest.stacked_graph, **limits) if mixed else OnnxEngine(folder, **limits)
    shapes = BaseShapes(
        fingerprint=manifest.base_fingerprint,
        linear_shapes={m: tuple(v) for m, v in manifest.lora_modules.items()},
        missing_module_hint=f"has no LoRA input in the exported model {folder} (re-export with --lora_targets all)",
    )

    def make_installer(scheduler: Scheduler):
        class OnnxInstaller:
            async def add(self, name, adapter):
                # the gate has validated and converted it; the tensors are read off the engine thread
                if mixed:  # read off the engine thread; the engine copies the views into its stacks
                    tensors = await asyncio.to_thread(OnnxAdapterTensors, adapter.artifact)
                    await asyncio.wrap_future(scheduler.call(lambda e: e.add_adapter_arrays(name, tensors.arrays())))
                else:  # its own og.Adapters container: no shared state, decoding goes on meanwhile
                    await asyncio.to_thread(engine.load_adapter_file, name, adapter.artifact)

            async def remove(self, name):
                await asyncio.wrap_future(scheduler.call(lambda e: e.remove_adapter(name)))

        return OnnxInstaller()

    exported = {a.name: folder / a.file for a in manifest.adapters}
    batching = "mixed-adapter batches" if mixed else "one onnxruntime-genai Generator per request"
    description = f"onnx ({manifest.precision} export, {batching}) on cpu"
    gate = OnnxAdapterGate(shapes, max_lora_rank=settings.max_lora_rank, cache_dir=default_adapter_cache(manifest.base_fingerprint))
    return Backend(ref, tokenizer, engine, shapes, description, make_installer, exported, validator=gate)


#: --backend -> how to build it
BACKENDS: dict[str, Callable[[ServerSettings], Backend]] = {"torch": _torch_backend, "onnx": _onnx_backend}


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
