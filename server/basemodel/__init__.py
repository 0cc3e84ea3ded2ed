"""Which base model, where its files are, its fingerprint, and how it is loaded.

Shared by training, serving and export so that "the base" means one thing everywhere.
This package knows nothing about adapters, requests or training.
"""

from loraplex.server.basemodel.embedded import EMBEDDED_BASE_ID, embedded_gguf_path
from loraplex.server.basemodel.fingerprint import compute_fingerprint
from loraplex.server.basemodel.loading import QUANTIZATIONS, load_base_model, load_tokenizer
from loraplex.server.basemodel.resolve import BaseModelRef, resolve_base

__all__ = [
    "EMBEDDED_BASE_ID",
    "QUANTIZATIONS",
    "BaseModelRef",
    "compute_fingerprint",
    "embedded_gguf_path",
    "load_base_model",
    "load_tokenizer",
    "resolve_base",
]
