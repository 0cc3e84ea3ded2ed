"""API keys: the key file format (hashes only), the key ring the server checks against, and
per-key rate limits. Knows nothing of HTTP or gRPC: the fronts pass the raw credential string."""

from loraplex.server.auth.keys import ApiKey, KeyFile, KeyRing, hash_secret

__all__ = ["ApiKey", "KeyFile", "KeyRing", "hash_secret"]
