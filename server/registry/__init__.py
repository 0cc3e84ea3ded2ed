"""The adapter registry: which adapters are resident, and the validation every adapter passes
before it may touch the model. Today this package holds the validation (``validation.py``);
the registry with states, LRU and refcounts lands with the serving core.

It knows the store format and the base's module shapes, never HTTP, gRPC or tokenization.
"""

from loraplex.server.registry.validation import BaseShapes, LoraModuleWeights, ValidatedAdapter, load_validated_adapter

__all__ = ["BaseShapes", "LoraModuleWeights", "ValidatedAdapter", "load_validated_adapter"]
