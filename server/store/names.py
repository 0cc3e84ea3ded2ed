"""Adapter names: ``[A-Za-z0-9._-]{1,64}``, not starting with a dot (dot-prefixed folders are
the store's staging, trash and checkpoint areas)."""

from __future__ import annotations

import re

from loraplex.server.errors import AdapterInvalid

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_NAME_LENGTH = 64


def validate_adapter_name(name: object) -> str:
    """Return ``name`` if valid, else raise AdapterInvalid naming the value and the rule."""
    if not isinstance(name, str):
        raise AdapterInvalid(f"adapter name must be a string, got {type(name).__name__}", param="name")
    if len(name) > MAX_NAME_LENGTH:
        raise AdapterInvalid(
            f"adapter name {name[:80]!r} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}", param="name"
        )
    if not NAME_PATTERN.fullmatch(name):
        bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        detail = f"characters {''.join(bad)!r} are" if bad else "an empty name is"
        raise AdapterInvalid(
            f"adapter name {name!r} is invalid: {detail} not allowed (allowed: A-Z a-z 0-9 . _ -, 1 to 64 characters)",
            param="name",
        )
    if name.startswith("."):
        raise AdapterInvalid(f"adapter name {name!r} is invalid: it must not start with '.'", param="name")
    return name
