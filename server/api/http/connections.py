"""Connection hygiene for the HTTP front: uvicorn's h11 protocol with three bounds it lacks.

- header timeout: a connection must deliver a complete request head within ``header_timeout``
  seconds of opening (or of its previous response); a slow or half-sent head gets 408 and is
  closed (uvicorn's keep-alive timer is disarmed by the first byte, so a slowloris client is
  otherwise held forever).
- body timeout: once the head is in, the whole body must arrive within ``body_timeout`` seconds;
  otherwise 408 (if no response started) and the connection is closed.
- connection cap: beyond ``max_connections`` open connections a new one gets an immediate 503
  (OpenAI error JSON, ``Retry-After: 1``) and is closed.

``timeout_keep_alive`` (idle time between requests) stays uvicorn's own setting. This module
knows uvicorn and h11 and nothing of the API's routes.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from loraplex.server.api.errors import status_error_body

log = logging.getLogger("loraplex.http")


def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps(status_error_body(status, message)).encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    return head.encode("latin-1") + body


def guarded_protocol(*, header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An ``H11Protocol`` subclass for ``uvicorn.Config(http=...)``; 0 turns a bound off."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: str = ""

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if max_connections and len(self.connections) > max_connections:
                log.warning("refused a connection: %d open, the limit is %d (--http-max-connections)", len(self.connections) - 1, max_connections)
                transport.write(_raw_response(503, "Service Unavailable", f"too many connections: the limit is {max_connections}", "retry-after: 1\r\n"))
                transport.close()
                return
            self._arm("head")

        def _arm(self, phase: str) -> None:
            self._disarm()
            timeout = header_timeout if phase == "head" else body_timeout
            if timeout:
                self._phase = phase
                self._deadline = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._phase = ""

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            phase, limit = ("request head", header_timeout) if self._phase == "head" else ("request body", body_timeout)
            client = "%s:%d" % self.client if self.client else "client"
            log.info("closed a connection from %s: the %s did not arrive within %gs", client, phase, limit)
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_raw_response(408, "Request Timeout", f"the {phase} did not arrive within {limit:g}s"))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def _follow(self) -> None:
            """Move the deadline with h11's view of the client: head -> body -> done."""
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body")
            elif state is not h11.IDLE:
                self._disarm()  # the whole request is in (DONE) or the connection is ending

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._follow()
                if self.conn.their_state is h11.IDLE:
                    self._arm("head")  # the next request's head

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
