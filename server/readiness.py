"""``Readiness``: the one answer to "may this server take requests now?".

A server goes ``loading -> ready -> draining -> stopped``; a start-up failure goes to ``failed``.
Only the lifecycle (``server/lifecycle.py``) moves it; /ready, gRPC health and the service read
it, and the gRPC front subscribes to its changes. Draining is one-way: a server that began
shutting down while still loading never turns ready.

Knows nothing of HTTP, gRPC, models or the service. Used from the event-loop thread only (the
signal handler that starts a drain runs there too).
"""

from __future__ import annotations

import enum
from typing import Callable


class Phase(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


#: phase -> the phases it may move to
_NEXT = {
    Phase.LOADING: {Phase.READY, Phase.DRAINING, Phase.STOPPED, Phase.FAILED},
    Phase.READY: {Phase.DRAINING, Phase.STOPPED},
    Phase.DRAINING: {Phase.STOPPED},
    Phase.FAILED: {Phase.STOPPED},
    Phase.STOPPED: set(),
}


class Readiness:
    def __init__(self) -> None:
        self._phase = Phase.LOADING
        self.error: str | None = None  # why start-up failed (phase FAILED)
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def ready(self) -> bool:
        """True only between a successful warm-up and the start of shutdown."""
        return self._phase is Phase.READY

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(ready)`` whenever ``ready`` flips (not called for the current state)."""
        self._listeners.append(listener)

    def _move(self, phase: Phase) -> bool:
        if phase not in _NEXT[self._phase]:
            return False
        was = self.ready
        self._phase = phase
        if self.ready != was:
            for listener in list(self._listeners):
                listener(self.ready)
        return True

    def mark_ready(self) -> bool:
        """Warm-up succeeded; False (and no change) when shutdown began meanwhile."""
        return self._move(Phase.READY)

    def begin_drain(self) -> bool:
        """Shutdown began: stop taking new work. True the first time only."""
        return self._move(Phase.DRAINING)

    def mark_failed(self, error: str) -> bool:
        if self._move(Phase.FAILED):
            self.error = error
            return True
        return False

    def mark_stopped(self) -> bool:
        return self._move(Phase.STOPPED)
