"""Where loraplex keeps derived files (the materialized base model, fingerprint memo).

``LORAPLEX_CACHE`` overrides the default ``~/.cache/loraplex``; read at call time, never at import.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    env = os.environ.get("LORAPLEX_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "loraplex"
