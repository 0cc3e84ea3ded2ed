"""The adapter registry: which adapters are resident, and the validation every adapter passes
before it may touch the model (``store/validation.py``, the gate at load, shared with the offline
ONNX exporter; re-exported here). ``registry.py`` holds states, LRU eviction, refcounts (a request's ``Lease``) and the
consistency of the registry's view with the engine's.

It knows the store format and the base's module shapes, never HTTP, gRPC or tokenization.
"""

from loraplex.server.registry.registry import AdapterEntry, AdapterRegistry, AdapterState, Lease
from loraplex.server.store.validation import BaseShapes, LoraModuleWeights, ValidatedAdapter, load_validated_adapter

__all__ = [
    "AdapterEntry",
    "AdapterRegistry",
    "AdapterState",
    "BaseShapes",
    "Lease",
    "LoraModuleWeights",
    "ValidatedAdapter",
    "load_validated_adapter",
]
