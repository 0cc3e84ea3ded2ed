"""A server's life after it is built: start (engine thread, store scan, preloads), a real warm-up
forward, readiness, drain on shutdown, stop, and the reload signal for API keys.

Owns the moves of the one ``Readiness`` object (``server/readiness.py``); everything else only
reads it. Knows the runtime's parts (``server/wiring.py``) but no HTTP or gRPC: the fronts
follow readiness through ``Readiness.on_change``.
"""

from __future__ import annotations

import asyncio
import logging

from loraplex.server.readiness import Readiness
from loraplex.server.scheduler import EngineRequest, SamplingParams
from loraplex.server.wiring import Runtime

log = logging.getLogger("loraplex.runtime")


async def warm_up(runtime: Runtime) -> None:
    """One real one-token forward through the scheduler: /ready means the model really runs."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def emit(token, finish):  # engine thread
        if finish is not None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(finish))

    prompt = [runtime.tokenizer.bos_token_id or runtime.tokenizer.eos_token_id or 0]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    runtime.scheduler.submit(EngineRequest("warmup", prompt, None, params, emit))
    finish = await done
    if finish not in ("length", "stop"):
        raise RuntimeError(f"warm-up forward failed (finish reason {finish})")


async def preload(runtime: Runtime) -> None:
    """Load ``--preload`` adapters; a refused one is logged, never fatal."""
    for name in runtime.settings.preload:
        try:  # internal: no API key involved
            await runtime.registry.load(name)  # its load time is observed by the registry's "loaded" event
        except Exception as exc:  # noqa: BLE001 - one bad adapter must not stop the server
            log.error("preload of adapter %s failed: %s", name, exc)


async def start_runtime(runtime: Runtime) -> None:
    """Engine thread, store scan, preloads, warm-up, then ready (unless shutdown began meanwhile)."""
    runtime.scheduler.start()
    runtime.registry.scan()
    await preload(runtime)
    await warm_up(runtime)
    if runtime.readiness.mark_ready():
        print(runtime.banner(), flush=True)


def stop_runtime(runtime: Runtime) -> None:
    """Not ready any more, background tasks cancelled, engine thread stopped."""
    runtime.readiness.mark_stopped()
    for task in runtime.background:
        task.cancel()
    runtime.scheduler.stop()


def begin_drain(readiness: Readiness, runtime: Runtime | None) -> None:
    """Shutdown began: readiness goes to draining (/ready 503, gRPC health NOT_SERVING, new
    requests refused) at once; requests in flight go on, and those still running after
    ``--shutdown-timeout`` seconds end with finish reason "abort"."""
    if not readiness.begin_drain() or runtime is None:
        return
    try:
        asyncio.get_running_loop().call_later(runtime.settings.shutdown_timeout, runtime.service.abort_all)
    except RuntimeError:  # no running loop in this thread: nothing is in flight to abort
        pass


def reload_keys(runtime: Runtime | None) -> None:
    """SIGHUP: re-read the API key file (requests in flight are not affected); a broken file
    keeps the previous keys."""
    if runtime is None:
        return
    try:
        runtime.service.keys.reload()
        log.info("API keys reloaded")
    except Exception as exc:
        log.error("API key reload failed, keeping the previous keys: %s", exc)
