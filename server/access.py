"""Who may do what, for both fronts: the API key behind a credential (``KeyRing``), which models a
key may see and use (a key that may not use a model gets the same answer as for a model that
does not exist), the admin role, and per-key rate admission and token accounting.

The fronts read the credential off their transport with ``auth.credentials`` (one rule: ``Bearer
<key>``) and hand the key string here. Knows the key ring; nothing of HTTP, gRPC, models or the
engine.
"""

from __future__ import annotations

from loraplex.server.auth import ApiKey, KeyRing
from loraplex.server.errors import AdapterNotFound


class Access:
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def authenticate(self, credential: str | None) -> ApiKey | None:
        """The caller's key (None when keys are off); Unauthenticated for none or a wrong one."""
        return self.keys.authenticate(credential)

    @staticmethod
    def visible(key: ApiKey | None, model: str) -> bool:
        return key is None or key.may_use(model)

    def authorize_model(self, key: ApiKey | None, model: str) -> None:
        if not self.visible(key, model):
            raise AdapterNotFound(f"The model `{model}` does not exist.", param="model")

    def require_admin(self, credential: str | None) -> ApiKey | None:
        key = self.authenticate(credential)
        self.keys.require_admin(key)
        return key

    def admit(self, key: ApiKey | None) -> None:
        """One request against the key's per-minute limits (RateLimited when over)."""
        self.keys.admit(key)

    def record_tokens(self, key: ApiKey | None, tokens: int) -> None:
        if key is not None:
            self.keys.record_tokens(key, tokens)
