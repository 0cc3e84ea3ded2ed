"""Who may do what, for both fronts: the API key behind a credential (``KeyRing``), which models a
key may see and use (a key that may not use a model gets the same answer as for a model that
does not exist), the admin role, and per-key rate admission and token accounting.

The fronts read the credential off their transport with ``auth.credentials`` (one rule: ``Bearer
<key>``) and hand the key string here. Knows the key ring; nothing of HTTP, gRPC, models or the
engine.

A weighted mix (``authorize_mix``) needs the key's right to every member; a refusal is 403 naming
the member (the check runs before the registry is asked, so it tells nothing about whether the
member exists).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraplex.server.auth import ApiKey, KeyRing
from loraplex.server.errors import AdapterNotFound, PermissionDenied

if TYPE_CHECKING:
    from loraplex.server.mixes import MixSpec


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

    def authorize_mix(self, key: ApiKey | None, spec: "MixSpec") -> None:
        """Every member of the mix must be usable by the key (the base's own right is not needed:
        a mix is adapters over the base, like any adapter). PermissionDenied (403) naming the first
        member the key may not use."""
        if key is None:
            return
        for name in spec.names:
            if not key.may_use(name):
                raise PermissionDenied(
                    f"the API key {key.name!r} may not use adapter {name!r}, a member of the mix {spec.label}",
                    param=spec.field,
                )

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
