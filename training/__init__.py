"""loraplex.training: train LoRA / QLoRA adapters on the shared base and publish them to the store.

Imports only the shared formats from the server package (``loraplex.server.basemodel`` and
``loraplex.server.store``), never the engine or the APIs.
"""
