"""The one rule for reading an API key off a request, whatever the front: the value of the
HTTP ``Authorization`` header or of the gRPC ``authorization`` metadata entry must be
``Bearer <key>`` (RFC 6750; what OpenAI clients send). The scheme is case-insensitive; anything
else (a bare key, ``Basic ...``, ``Bearer`` with no key) counts as no key, so with keys on it
gets 401 / ``UNAUTHENTICATED`` and the message says what to send.

Pure string handling: knows nothing of HTTP, gRPC or the key ring.
"""

from __future__ import annotations

from typing import Iterable

AUTHORIZATION = "authorization"
SCHEME = "bearer"


def bearer_key(value: str | None) -> str | None:
    """The key in ``Bearer <key>``, or None when the value does not follow that rule."""
    if not value:
        return None
    scheme, _, key = value.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != SCHEME or not key or any(c.isspace() for c in key):
        return None
    return key


def credential_from_pairs(pairs: Iterable[tuple[str, str]] | None) -> str | None:
    """The key from header / metadata (name, value) pairs: the first ``authorization`` entry."""
    for name, value in pairs or ():
        if name.lower() == AUTHORIZATION:
            return bearer_key(value)
    return None
