"""The adapter registry: which adapters are resident, and the validation every adapter passes
before it may touch the model. ``validation.py`` is the gate at load;
``registry.py`` holds states, LRU eviction and refcounts.

It knows the store format and the base's module shapes, never HTTP, gRPC or tokenization.
"""

from loraplex.server.registry.registry import AdapterEntry, AdapterRegistry, AdapterState
from loraplex.server.registry.validation import BaseShapes, LoraModuleWeights, ValidatedAdapter, load_validated_adapter

__all__ = [
    "AdapterEntry",
    "AdapterRegistry",
    "AdapterState",
    "BaseShapes",
    "LoraModuleWeights",
    "ValidatedAdapter",
    "load_validated_adapter",
]
