"""The server process's fronts: the HTTP app whose lifespan boots the runtime in the background,
and the gRPC front started and stopped inside that lifespan, its health following ``Readiness``.
Also the entry points ``loraplex serve`` wires to signals (``begin_drain``, ``reload_keys``).

Construction is ``server/wiring.py``; start, warm-up, readiness, drain and stop are
``server/lifecycle.py``; the store watcher runs as a background task of the runtime. This module
knows the fronts and hands them the service; it does not answer requests itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from loraplex.server import lifecycle
from loraplex.server.engine import cpu_threads
from loraplex.server.api.http.app import create_app
from loraplex.server.readiness import Readiness
from loraplex.server.settings import ServerSettings
from loraplex.server.watcher import start_watcher
from loraplex.server.wiring import Runtime, build_runtime

log = logging.getLogger("loraplex.runtime")


def start_background(runtime: Runtime) -> None:
    """Tasks that live as long as the runtime (cancelled by ``lifecycle.stop_runtime``)."""
    if runtime.settings.watch:  # the store watcher: server/watcher.py
        runtime.background.append(start_watcher(runtime.registry, runtime.settings.watch_interval))


def _readiness(app) -> Readiness:
    return app.state.readiness


def begin_drain(app) -> None:
    """SIGTERM / SIGINT: readiness goes to draining at once (see ``lifecycle.begin_drain``);
    uvicorn and grpc then drain the requests in flight."""
    lifecycle.begin_drain(_readiness(app), app.state.holder.get("runtime"))


def reload_keys(app) -> None:
    """SIGHUP: re-read the API key file."""
    lifecycle.reload_keys(app.state.holder.get("runtime"))


async def _start_grpc(settings: ServerSettings, app, readiness: Readiness):
    """The gRPC front, NOT_SERVING until ready; its health follows every readiness change."""
    from loraplex.server.api.grpc.server import GrpcFront

    front = GrpcFront(lambda: getattr(app.state, "service", None), settings.host, settings.grpc_port)
    await front.start()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones

    def follow(ready: bool) -> None:
        task = loop.create_task(front.set_serving(ready))
        pending.add(task)
        task.add_done_callback(pending.discard)

    readiness.on_change(follow)
    return front


def create_server_app(settings: ServerSettings, on_fatal=None):
    """The HTTP app. It listens at once (/health answers, /ready is 503) while the base loads in
    a worker thread; a load failure is logged and ``on_fatal`` stops the process."""
    holder: dict[str, Runtime] = {}
    readiness = Readiness()

    async def boot(app) -> None:
        try:
            # Test hook: hold the "loading" phase open so probes can observe it (never set in production).
            await asyncio.sleep(float(os.environ.get("LORAPLEX_TEST_STARTUP_DELAY", "0")))
            # its own thread, which ends: loading uses every core, and no OpenMP pool outlives it
            runtime = await cpu_threads.in_own_thread(build_runtime, settings, readiness)
            holder["runtime"] = runtime
            app.state.metrics = runtime.metrics
            app.state.service = runtime.service
            await lifecycle.start_runtime(runtime)
            start_background(runtime)
        except Exception as exc:
            log.error("start-up failed: %s", exc)
            readiness.mark_failed(str(exc))
            app.state.fatal = str(exc)
            if on_fatal is not None:
                on_fatal(exc)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # asyncio.to_thread's threads (adapter reads, installs, grammar compiles) run torch on one
        # thread each: only the engine thread keeps an OpenMP team (engine/cpu_threads.py)
        asyncio.get_running_loop().set_default_executor(cpu_threads.helper_executor("loraplex-io"))
        grpc_front = await _start_grpc(settings, app, readiness) if settings.grpc_port else None
        app.state.grpc = grpc_front
        task = asyncio.create_task(boot(app))
        try:
            yield
        finally:
            task.cancel()
            readiness.begin_drain()
            if grpc_front is not None:
                await grpc_front.stop(grace=settings.shutdown_timeout + 2)
            if "runtime" in holder:
                lifecycle.stop_runtime(holder["runtime"])
            else:
                readiness.mark_stopped()

    app = create_app(None, None, lifespan=lifespan)
    app.state.holder = holder
    app.state.readiness = readiness
    return app
