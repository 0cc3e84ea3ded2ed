"""The one engine interface: what the scheduler, the registry's installer and the service may use
of an engine, whatever its backend (torch, onnx mixed batches, onnx per-request generators).

An engine owns a model, its KV cache and its adapter slots. It runs on ONE thread (the
scheduler's); only ``try_add_adapter_in_place`` may be called from another thread. It knows token
ids, never text, HTTP or the store.

Adapters reach an engine as an :class:`AdapterPayload` of the kind the engine declares in
``payload_kind``: ``torch`` (``engine.TorchAdapterPayload``: per-module A/B weights) or ``onnx``
(``onnx.engine.OnnxAdapterPayload``: an ``.onnx_adapter`` file). The installer
(``backends.EngineInstaller``) checks the kind before handing it over, and engines refuse other
kinds and empty payloads too, so an adapter validated for one backend can never be installed (as
an empty slot, silently serving base output) into another. Slots are ``engine.slots.SlotTable``
in every engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from loraplex.server.engine.rows import EngineRequest


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and the service; read from any thread (values may be one step old)."""

    running: int  # rows in the batch (decoding or prefilling)
    kv_used_tokens: int  # KV positions holding real tokens
    kv_capacity_tokens: int  # KV positions allocated for the running batch at most
    peak_batch_size: int
    steps: int

    @property
    def kv_usage(self) -> float:
        return self.kv_used_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 0.0


@runtime_checkable
class AdapterPayload(Protocol):
    """Adapter weights in the form one backend installs; ``kind`` names that form."""

    kind: str
    name: str


@runtime_checkable
class Engine(Protocol):
    payload_kind: str  # the AdapterPayload.kind this engine installs
    # per-request features honoured (a subset of rows.ALL_FEATURES: "logprobs", "prompt_logprobs",
    # "n", "constraint", "mix", "penalties"); ``admit`` refuses a request using any other
    features: frozenset[str]
    max_batch_size: int
    max_model_len: int

    @property
    def num_running(self) -> int: ...

    @property
    def resident_adapters(self) -> list[str]: ...

    def has_capacity(self, rows: int = 1) -> bool:
        """True when a request taking ``rows`` rows (``EngineRequest.rows``: 1 + its forks) may
        be admitted now."""
        ...

    def admit(self, request: EngineRequest) -> None:
        """Take a request (and its forks) into the engine; its prompt is prefilled within the
        next steps' token budget (a failure ends that request only, with finish reason
        ``error``). Raises, admitting nothing, for a request it cannot take (a feature not in
        ``features``, no room, an unknown adapter)."""
        ...

    def step(self) -> None:
        """One forward over everything admitted: prefill work and one token per decoding row.
        Rows whose request was cancelled leave first."""
        ...

    def add_adapter(self, payload: AdapterPayload) -> None:
        """Engine thread: install (or replace, when not in use) ``payload.name`` in a slot."""
        ...

    def try_add_adapter_in_place(self, payload: AdapterPayload) -> bool:
        """Any thread: install into a free slot without growing anything; False when that is not
        possible (then ``add_adapter`` runs on the engine thread)."""
        ...

    def remove_adapter(self, name: str) -> None:
        """Engine thread: free the adapter's slot; raises if running rows still use it."""
        ...

    def fail_all(self, reason: str) -> None:
        """End every admitted request with ``reason`` (after an engine error); stays usable."""
        ...

    def stats(self) -> EngineStats: ...
