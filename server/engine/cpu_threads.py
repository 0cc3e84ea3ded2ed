"""Which threads of the server process run torch's CPU work on an OpenMP team.

torch's CPU wheels parallelize with libgomp. libgomp gives every thread that opens a parallel
region its own pool of worker threads, kept for as long as that thread lives. While the process
holds more such threads than it has CPUs, libgomp stops spinning between regions in EVERY pool
(its "throttled" spin count: about a hundred iterations instead of a few hundred thousand), so
each of the hundreds of parallel regions of an engine step ends with the workers going to sleep
on a futex and the next one starts by waking them. A second pool appears as soon as any other
long-lived thread calls a parallel torch op: the asyncio executor thread that loaded the model
(it stays in the pool), the thread that reads an adapter's tensors, the LoRA refold thread.
Measured on a 2-core machine (docs/benchmarks.md, ninth engine-v2 session): one stream decoded
at 44 tok/s with the loading thread alive and 89 tok/s when that thread ran torch on one thread.

The rule, applied by the threads' owners:

- the engine thread runs torch with :data:`ENGINE_THREADS` threads (what torch chose on the
  thread that imported this module: the process's main thread in ``loraplex serve``);
- every other long-lived thread that may call torch (:func:`helper_executor`'s threads, the LoRA
  refold thread, the event loop's thread in ``loraplex serve``) calls :func:`helper_thread`
  first and runs torch on one thread, opening no team;
- work that wants every core for a while, off the engine thread (start-up's model load), runs on
  a thread of its own that ends (:func:`in_own_thread`): libgomp frees a thread's pool when the
  thread exits.

torch.set_num_threads sets the calling thread's OpenMP and MKL thread counts, and the default
that threads calling torch for the first time take up; so each thread above sets its own count
explicitly, and after setting ``ENGINE_THREADS`` on a thread the default is put back to one (on a
short-lived thread: setting it anywhere else would change that thread's own count), so a thread
nobody set up opens no team either. Threads that keep a second team for a while, knowingly:
``--compile-decode``'s compile thread (inductor sizes its kernels by its count; minutes, opt-in).
This module knows threads and torch's thread settings; nothing of models or requests.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

#: intra-op threads of the engine thread: torch's choice on the importing thread
#: (OMP_NUM_THREADS, else the machine's cores)
ENGINE_THREADS: int = torch.get_num_threads()


def engine_thread() -> None:
    """Call first on the engine thread: torch's intra-op work there uses ``ENGINE_THREADS``
    (and threads that never set their count keep defaulting to one)."""
    _set_own(ENGINE_THREADS)
    _default_to_one()


def _set_own(count: int) -> None:
    # torch applies its default to a thread lazily, on the thread's first parallel op or count
    # query; that first: otherwise a later default would overwrite the count set here
    torch.get_num_threads()
    torch.set_num_threads(count)


def _default_to_one() -> None:
    """torch's default count for threads that have not called it yet back to one, set on a
    thread that ends at once (its own count is the only other thing that changes)."""
    worker = threading.Thread(target=torch.set_num_threads, args=(1,), name="loraplex-threads-default")
    worker.start()
    worker.join()


def helper_thread() -> None:
    """Call first on a long-lived thread other than the engine's that may call torch: its torch
    work runs on this thread alone and never opens an OpenMP team (so the engine's team keeps
    spinning between regions)."""
    _set_own(1)


def helper_executor(name: str, max_workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch on one thread each (:func:`helper_thread`)."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name, initializer=helper_thread)


async def in_own_thread(fn: Callable[..., Any], *args: Any, name: str = "loraplex-start") -> Any:
    """``await fn(*args)`` on a new thread that ends when ``fn`` returns (its OpenMP pool, if it
    opened one, ends with it): for heavy one-off work that wants every core."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(future: asyncio.Future, outcome: tuple[bool, Any]) -> None:
        if future.cancelled():
            return
        ok, value = outcome
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    context = contextvars.copy_context()

    def target() -> None:
        engine_thread()  # every core, whatever default a helper left; the default stays one
        try:
            outcome: tuple[bool, Any] = (True, context.run(fn, *args))
        except BaseException as exc:  # handed to the awaiting task
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, done, outcome)
        except RuntimeError:  # the loop closed meanwhile (shutdown during start-up)
            pass

    # not a daemon: like asyncio.to_thread's, the interpreter waits for it at exit
    threading.Thread(target=target, name=name).start()
    return await done
