"""The scheduler: the one thread that owns the engine. Requests wait in a bounded queue and are
admitted into the engine while it has a free row; the engine's own token budget spreads their
prefill over the next steps. Commands (adapter installs) run between steps. Talks to the engine
only through the ``Engine`` protocol (``engine/protocol.py``): ``admit`` and ``step``.

Other threads only call ``submit``, ``cancel`` and ``call``; the engine is never touched
concurrently, and no other thread writes the engine's objects: a cancellation is a command the
engine thread applies before its next step. Knows nothing of text or HTTP.

A request with forks (n > 1) takes ``1 + len(forks)`` engine rows and is admitted only when the
engine has that many free (first come, first served: it is not overtaken). A request cancelled
while queued leaves the queue; its forks that are not cancelled stay, the first of them taking
its place (cancelling one choice never ends the others).

Hooks (``after_pass``) run on the engine thread at the end of every pass of its loop (commands,
admission, one ``engine.step()``), whatever happened in it: the service delivers everything the
engine emitted during the pass to the event loop in one wakeup there (``on_engine_thread`` tells
an emit callback that such a hook will run). A hook that raises is logged; the engine goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from loraplex.server.engine import cpu_threads
from loraplex.server.engine.protocol import Engine
from loraplex.server.engine.rows import (
    ALL_FEATURES,
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineRequest,
    TokenConstraint,
    TokenLogprob,
    promote_forks,
)
from loraplex.server.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams
from loraplex.server.errors import Overloaded

#: what callers of the scheduler use of the engine's types (the service imports them from here,
#: never from the engine: import contract "service-via-scheduler")
__all__ = [
    "Scheduler",
    "EngineRequest",
    "SamplingParams",
    "TokenLogprob",
    "TokenConstraint",
    "ALL_FEATURES",
    "MAX_TOP_LOGPROBS",
    "FINISH_CANCELLED",
    "FINISH_ERROR",
    "FINISH_LENGTH",
    "FINISH_STOP",
]

log = logging.getLogger("loraplex.scheduler")


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue: int, on_step: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.waiting: deque[EngineRequest] = deque()
        self.commands: deque[tuple[Callable[[Engine], Any], Future]] = deque()
        self.cancels: deque[tuple[EngineRequest, str]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.steps = 0
        self.on_step = on_step  # engine thread, after every step (the batch-size metric)
        self._after_pass: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def after_pass(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` on the engine thread at the end of every pass of its loop (after the
        step; also after a pass that only ran commands or cancellations). A hook that raises is
        logged; the engine goes on."""
        self._after_pass.append(hook)

    def on_engine_thread(self) -> bool:
        """True when called from the engine thread (inside a pass: its ``after_pass`` hooks run
        before the thread waits again)."""
        return threading.get_ident() == self._thread.ident

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def features(self) -> frozenset[str]:
        """The per-request features the engine honours (``rows.ALL_FEATURES`` names); the service
        refuses a request using any other."""
        return frozenset(getattr(self.engine, "features", frozenset()))

    def submit(self, request: EngineRequest) -> None:
        with self._cv:
            free_rows = self.engine.max_batch_size - self.engine.num_running
            if len(self.waiting) >= self.max_queue + max(0, free_rows):  # waiting beyond the running batch
                raise Overloaded(f"queue full: {len(self.waiting)} requests waiting (--max-queue {self.max_queue}); retry later")
            self.waiting.append(request)
            self._cv.notify_all()

    def call(self, fn: Callable[[Engine], Any]) -> Future:
        """Run ``fn(engine)`` on the engine thread between two steps."""
        future: Future = Future()
        with self._cv:
            self.commands.append((fn, future))
            self._cv.notify_all()
        return future

    def cancel(self, request: EngineRequest, reason: str) -> None:
        """End ``request`` (queued or running) with finish reason ``reason`` before the next step;
        safe from any thread, idempotent, a no-op once the request has finished."""
        with self._cv:
            self.cancels.append((request, reason))
            self._cv.notify_all()

    def _apply_cancels(self) -> None:
        with self._cv:
            cancels = list(self.cancels)
            self.cancels.clear()
        for request, reason in cancels:  # engine thread: the only writer of these flags
            if not request.cancelled:
                request.cancel_reason = reason
                request.cancelled = True

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _has_work(self) -> bool:
        return bool(self.commands or self.cancels or self.waiting or self.engine.num_running)

    def _loop(self) -> None:
        cpu_threads.engine_thread()  # the process's one OpenMP team (engine/cpu_threads.py)
        while True:
            with self._cv:
                while not self._stop and not self._has_work():
                    self._cv.wait(timeout=0.5)
                if self._stop:
                    break
                commands = list(self.commands)
                self.commands.clear()
            try:
                self._pass(commands)
            finally:
                for hook in self._after_pass:
                    try:
                        hook()
                    except Exception:  # a delivery or metrics hook must never stop the engine thread
                        log.exception("after-pass hook failed")

    def _pass(self, commands: list[tuple[Callable[[Engine], Any], Future]]) -> None:
        self._apply_cancels()
        self._drop_cancelled_waiting()
        for fn, future in commands:
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:  # the caller gets the error; the engine goes on
                future.set_exception(exc)
        self._admit()
        if self.engine.num_running:
            try:
                self.engine.step()
            except Exception:
                log.exception("engine step failed; ending the running requests")
                self.engine.fail_all(FINISH_ERROR)
        self.steps += 1
        if self.on_step is not None:
            self.on_step()

    def _drop_cancelled_waiting(self) -> None:
        """Requests cancelled or timed out while still queued leave the queue at once (their
        live forks stay, the first taking the cancelled request's place)."""
        with self._cv:
            if not any(r.cancelled for r in self.waiting):
                return
            dropped = [r for r in self.waiting if r.cancelled]
            self.waiting = deque(r if not r.cancelled else promote_forks(r) for r in self.waiting)
            self.waiting = deque(r for r in self.waiting if r is not None)
        for request in dropped:
            request.emit(None, request.cancel_reason)

    def _admit(self) -> None:
        """Waiting requests, oldest first, while the engine has their rows; the engine paces
        their prefill."""
        while True:
            with self._cv:
                if not self.waiting:
                    return
                request = self.waiting[0]
                if not request.cancelled and request.rows > self.engine.max_batch_size:
                    self.waiting.popleft()
                    log.error("request %s needs %d rows; the engine has %d (max_batch_size)", request.request_id, request.rows, self.engine.max_batch_size)
                    for member in (request, *request.forks):
                        member.emit(None, FINISH_ERROR)
                    continue
                if not request.cancelled and not self.engine.has_capacity(request.rows):
                    return
                self.waiting.popleft()
            if request.cancelled:
                request.emit(None, request.cancel_reason)
                promoted = promote_forks(request)
                if promoted is not None:
                    with self._cv:
                        self.waiting.appendleft(promoted)
                continue
            if request.on_admit is not None:
                try:
                    request.on_admit()
                except Exception:  # a metrics hook must never stop the engine thread
                    log.exception("admission hook failed for request %s", request.request_id)
            try:
                self.engine.admit(request)
            except Exception:
                log.exception("admission failed for request %s", request.request_id)
                for member in (request, *request.forks):
                    member.emit(None, FINISH_ERROR)
