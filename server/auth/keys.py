"""API keys.

The key file (YAML) stores, per key: ``name``, ``role`` (``admin`` or ``user``), ``adapters``
(names or glob patterns; the bare base is matched by its served name; ``*`` = all), optional
``requests_per_minute`` / ``tokens_per_minute``, ``revoked``, ``created_at``, a short ``prefix``
of the secret (to recognise a key) and ``sha256`` of the secret. Secrets themselves are never
stored: ``loraplex keys add`` prints one once. Lookups hash the presented secret and compare it
with every stored hash in constant time (``hmac.compare_digest``, no early exit).

``KeyRing`` re-reads the file when its mtime changes (checked at most once a second) or on
``reload()`` (SIGHUP); a reload swaps the whole key list at once, so requests are never dropped.
``LORAPLEX_API_KEY`` gives the simple single-key mode: one admin key for everything.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from loraplex.server.errors import PermissionDenied, RateLimited, RequestInvalid, Unauthenticated

ROLES = ("admin", "user")
SECRET_PREFIX = "lpx-"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    role: str
    adapters: tuple[str, ...]
    sha256: str
    prefix: str = ""
    created_at: str = ""
    revoked: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.adapters)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class KeyFile:
    """Read and edit a key file; writes are atomic (temp file + rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> list[ApiKey]:
        if not self.path.exists():
            return []
        try:
            raw = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RequestInvalid(f"{self.path}: not valid YAML ({exc})") from exc
        entries = raw.get("keys", []) if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise RequestInvalid(f"{self.path}: expected a mapping with a 'keys:' list")
        keys = []
        for i, entry in enumerate(entries):
            adapters = entry.get("adapters") if isinstance(entry, dict) else None
            if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
                raise RequestInvalid(f"{self.path}: keys[{i}].adapters must be a list of names or glob patterns, got {adapters!r}")
            try:
                key = ApiKey(**{**entry, "adapters": tuple(adapters)})
            except TypeError as exc:
                raise RequestInvalid(f"{self.path}: keys[{i}] is malformed ({exc})") from exc
            if key.role not in ROLES or len(key.sha256) != 64:
                raise RequestInvalid(f"{self.path}: keys[{i}] ({key.name!r}) needs role admin|user and a sha256 hash")
            keys.append(key)
        return keys

    def save(self, keys: list[ApiKey]) -> None:
        data = {"keys": [{**asdict(k), "adapters": list(k.adapters)} for k in keys]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("# loraplex API keys: hashes only (loraplex keys add|list|revoke)\n" + yaml.safe_dump(data, sort_keys=False))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    def add(self, name: str, role: str, adapters: list[str], *, requests_per_minute: int | None = None, tokens_per_minute: int | None = None) -> tuple[str, ApiKey]:
        if role not in ROLES:
            raise RequestInvalid(f"role {role!r} is not one of {', '.join(ROLES)}", param="role")
        if not name or any(k.name == name for k in self.load()):
            raise RequestInvalid(f"key name {name!r} is empty or already used in {self.path}", param="name")
        if not adapters:
            raise RequestInvalid("give the adapters the key may use (names or globs, '*' for all)", param="adapters")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            name=name,
            role=role,
            adapters=tuple(adapters),
            sha256=hash_secret(secret),
            prefix=secret[: len(SECRET_PREFIX) + 6],
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        self.save(self.load() + [key])
        return secret, key

    def revoke(self, name: str) -> ApiKey:
        keys = self.load()
        for i, key in enumerate(keys):
            if key.name == name:
                keys[i] = ApiKey(**{**asdict(key), "revoked": True})
                self.save(keys)
                return keys[i]
        raise RequestInvalid(f"no key named {name!r} in {self.path}", param="name")


@dataclass
class _Usage:
    requests: deque = field(default_factory=deque)  # timestamps
    tokens: deque = field(default_factory=deque)  # (timestamp, count)


class KeyRing:
    """What the server checks credentials against; ``enabled`` is False when no keys are set."""

    WINDOW = 60.0

    def __init__(self, key_file: str | Path | None = None, single_key: str | None = None) -> None:
        self.file = KeyFile(key_file) if key_file else None
        self.single_key = single_key
        self._keys: list[ApiKey] = []
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}
        self.reload()

    @property
    def enabled(self) -> bool:
        return self.file is not None or bool(self.single_key)

    def reload(self) -> None:
        keys = self.file.load() if self.file else []
        if self.single_key:
            keys.append(ApiKey(name="default", role="admin", adapters=("*",), sha256=hash_secret(self.single_key)))
        self._keys = keys  # one assignment: readers see the old list or the new one
        self._mtime = self._file_mtime()

    def _file_mtime(self) -> float | None:
        try:
            return self.file.path.stat().st_mtime if self.file else None
        except OSError:
            return None

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.file is None or now - self._checked < 1.0:
            return
        self._checked = now
        if self._file_mtime() != self._mtime:
            try:
                self.reload()
            except Exception:  # a half-written or broken file: keep the previous keys, retry later
                self._mtime = None

    def authenticate(self, credential: str | None) -> ApiKey | None:
        """The key for a credential (None when auth is off); Unauthenticated otherwise."""
        if not self.enabled:
            return None
        self._reload_if_changed()
        if not credential:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        digest = hash_secret(credential)
        found = None
        for key in self._keys:  # compare with every key: timing does not reveal which one matched
            if hmac.compare_digest(digest, key.sha256) and not key.revoked:
                found = key
        if found is None:
            raise Unauthenticated("invalid API key")
        return found

    @staticmethod
    def require_admin(key: ApiKey | None) -> None:
        if key is not None and not key.is_admin:
            raise PermissionDenied(f"key {key.name!r} has role {key.role!r}; this needs role 'admin'")

    def admit(self, key: ApiKey | None) -> None:
        """Count one request against the key's per-minute limits (RateLimited when over)."""
        if key is None or (key.requests_per_minute is None and key.tokens_per_minute is None):
            return
        now = time.monotonic()
        with self._lock:
            usage = self._usage.setdefault(key.name, _Usage())
            while usage.requests and now - usage.requests[0] > self.WINDOW:
                usage.requests.popleft()
            while usage.tokens and now - usage.tokens[0][0] > self.WINDOW:
                usage.tokens.popleft()
            if key.requests_per_minute is not None and len(usage.requests) >= key.requests_per_minute:
                wait = self.WINDOW - (now - usage.requests[0])
                raise RateLimited(f"key {key.name!r} is over its limit of {key.requests_per_minute} requests per minute", retry_after=wait)
            used = sum(n for _, n in usage.tokens)
            if key.tokens_per_minute is not None and used >= key.tokens_per_minute:
                wait = self.WINDOW - (now - usage.tokens[0][0])
                raise RateLimited(f"key {key.name!r} used {used} tokens in the last minute; its limit is {key.tokens_per_minute}", retry_after=wait)
            usage.requests.append(now)

    def record_tokens(self, key: ApiKey | None, tokens: int) -> None:
        if key is None or key.tokens_per_minute is None:
            return
        with self._lock:
            self._usage.setdefault(key.name, _Usage()).tokens.append((time.monotonic(), tokens))
