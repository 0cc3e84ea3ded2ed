"""The adapter store: its on-disk format and the rules for names, paths and publication.

An adapter is a folder ``<store>/<name>/`` holding peft's standard files
(``adapter_config.json`` + ``adapter_model.safetensors``) and optionally loraplex's
``loraplex.json`` manifest, which adds to peft's files and never replaces them. Any plain peft
LoRA folder is a valid store entry. Dot-prefixed entries are staging/trash/checkpoint folders and
are never adapters. ``fingerprint.py`` tells whether an entry changed, settled and is whole
(for ``--watch``); ``validation.py`` checks an entry against a base's Linear shapes and reads its
weights (the gate at load, for the server and the offline exporter alike). This package knows
nothing of engines, servers or training loops (it looks at a model's module names and shapes
only).
"""

from loraplex.server.store.layout import AdapterStore, ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST
from loraplex.server.store.manifest import AdapterManifest, read_manifest, write_manifest
from loraplex.server.store.names import validate_adapter_name
from loraplex.server.store.peft_config import LoraSpec, read_lora_spec
from loraplex.server.store.weights import sha256_file

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "MANIFEST",
    "AdapterManifest",
    "AdapterStore",
    "LoraSpec",
    "read_lora_spec",
    "read_manifest",
    "sha256_file",
    "validate_adapter_name",
    "write_manifest",
]
