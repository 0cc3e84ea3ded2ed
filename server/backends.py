"""Serving backends: each builds the base model, its tokenizer and an engine (``Engine``
protocol, engine/protocol.py) from the settings, and says how a validated adapter becomes that
engine's payload. ``BACKENDS`` maps ``--backend`` to its factory: a new backend is one factory
here (or a module it imports) plus one row in the table.

Adapters get into every engine through ONE installer (``EngineInstaller``, the registry's
``Installer``): the backend turns the registry's ``ValidatedAdapter`` into a typed payload, the
installer refuses a payload whose ``kind`` is not the engine's ``payload_kind`` (an adapter
validated for one backend can never land in another as an empty slot serving the base), then
writes it in place from a worker thread when the engine can, else on the engine thread.

Knows engines, the base model and the adapter formats; knows nothing of HTTP, gRPC, the service
or the registry's policies.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from loraplex.server.basemodel import BaseModelRef, load_base_model, load_tokenizer, resolve_base
from loraplex.server.engine.protocol import AdapterPayload
from loraplex.server.engine.protocol import Engine as EngineProtocol
from loraplex.server.errors import AdapterInvalid, BaseModelError
from loraplex.server.registry import BaseShapes
from loraplex.server.store.validation import ValidatedAdapter
from loraplex.server.scheduler import Scheduler
from loraplex.server.settings import ServerSettings

PayloadMaker = Callable[[str, ValidatedAdapter], AdapterPayload]


def torch_payload(name: str, adapter: ValidatedAdapter) -> AdapterPayload:
    """Per-module A/B weights for the torch engine; refuses an adapter that carries none (one
    validated by the onnx gate has only an ``.onnx_adapter`` file)."""
    from loraplex.server.engine.engine import TorchAdapterPayload

    if not adapter.modules:
        where = f" (only {adapter.artifact.name}, validated for the onnx backend)" if adapter.artifact is not None else ""
        raise AdapterInvalid(f"adapter {name!r} has no per-module LoRA weights for the torch engine{where}; refusing to install an empty slot")
    return TorchAdapterPayload(name=name, modules=adapter.modules)


def onnx_payload(name: str, adapter: ValidatedAdapter, *, read_tensors: bool) -> AdapterPayload:
    """The ``.onnx_adapter`` file the onnx gate vouched for; its tensors read now (in a worker
    thread) when the engine copies them into stacks."""
    from loraplex.server.onnx.engine import OnnxAdapterPayload
    from loraplex.server.store.onnx_adapter import ONNX_ADAPTER_SUFFIX, OnnxAdapterTensors

    artifact = adapter.artifact
    if artifact is None or not str(artifact).endswith(ONNX_ADAPTER_SUFFIX):
        raise AdapterInvalid(f"adapter {name!r} has no {ONNX_ADAPTER_SUFFIX} file for the onnx engines (validated for another backend?)")
    return OnnxAdapterPayload(name=name, path=artifact, tensors=OnnxAdapterTensors(artifact) if read_tensors else None)


class EngineInstaller:
    """The registry's ``Installer`` for any engine: ``add(name, validated)`` / ``remove(name)``."""

    def __init__(self, engine: EngineProtocol, scheduler: Scheduler, to_payload: PayloadMaker) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.to_payload = to_payload

    def payload(self, name: str, adapter: ValidatedAdapter) -> AdapterPayload:
        payload = self.to_payload(name, adapter)
        if getattr(payload, "kind", None) != self.engine.payload_kind:
            raise AdapterInvalid(f"adapter {name!r} is a {getattr(payload, 'kind', None)!r} payload; this engine installs {self.engine.payload_kind!r} payloads")
        if payload.name != name:
            raise AdapterInvalid(f"adapter payload named {payload.name!r} installed as {name!r}")
        return payload

    async def add(self, name: str, adapter: ValidatedAdapter) -> None:
        payload = await asyncio.to_thread(self.payload, name, adapter)  # may read files: off the event loop
        # Fast path: a free slot that fits is written from a worker thread while decoding goes on.
        if await asyncio.to_thread(self.engine.try_add_adapter_in_place, payload):
            return
        await asyncio.wrap_future(self.scheduler.call(lambda e: e.add_adapter(payload)))

    async def remove(self, name: str) -> None:
        await asyncio.wrap_future(self.scheduler.call(lambda e: e.remove_adapter(name)))


def _eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return sorted(ids)


@dataclass
class Backend:
    """What a serving backend contributes: the base, its tokenizer, an engine, what adapters are
    validated against, adapters shipped with the model, and how adapters get into the engine."""

    ref: BaseModelRef
    tokenizer: Any
    engine: EngineProtocol
    shapes: BaseShapes
    description: str
    to_payload: PayloadMaker  # ValidatedAdapter -> the engine's payload kind
    exported: dict = field(default_factory=dict)
    validator: Callable | None = None  # the registry's gate; None = full validation on every load

    def make_installer(self, scheduler: Scheduler) -> EngineInstaller:
        return EngineInstaller(self.engine, scheduler, self.to_payload)


def _torch_backend(settings: ServerSettings) -> Backend:
    from loraplex.server.engine.engine import Engine

    ref = resolve_base(settings.base)
    device, quantize = settings.resolved_device(), settings.resolved_quantize()
    tokenizer = load_tokenizer(ref)
    model = load_base_model(ref, quantize=quantize, device=device, dtype=settings.dtype)
    shapes = BaseShapes.from_model(model, ref.fingerprint)  # before the engine wraps the Linear layers
    engine = Engine(
        model,
        eos_token_ids=_eos_ids(tokenizer, model),
        max_batch_size=settings.max_batch_size,
        max_model_len=settings.max_model_len,
        device=device,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        int4_decode_rows=settings.int4_decode_rows,
        compile_decode=settings.compile_decode,
        decode_row=settings.decode_row,
        lora_expand=settings.lora_expand,
        decode_attention=settings.decode_attention,
    )

    dtype = str(getattr(engine, "dtype", "")).replace("torch.", "")
    forward = engine.forward_path + (f" (int4 decode GEMMs {engine.lean.int4_reason}; one-row decode step {engine.lean.row_reason}; compiled one-row decode {engine.lean.compile_reason}; mixed-step LoRA expand {engine.lean.expand_reason}; element-wise steps {engine.lean.pointwise_reason})" if engine.lean is not None else "") + f", decode attention {engine.attention_reason}"
    return Backend(ref, tokenizer, engine, shapes, f"torch {dtype}, quantization {quantize} on {device}, {forward} forward", torch_payload)


def _onnx_backend(settings: ServerSettings) -> Backend:
    from pathlib import Path

    from loraplex.server.onnx.engine import OnnxEngine, genai_eos_ids
    from loraplex.server.onnx.agreement import PredictionReplay
    from loraplex.server.onnx.gate import OnnxAdapterGate, default_adapter_cache
    from loraplex.server.onnx.manifest import read_export_manifest
    from loraplex.server.onnx.stacked import StackedOnnxEngine

    folder = Path(settings.model).expanduser().resolve()
    manifest = read_export_manifest(folder)
    ref = BaseModelRef(manifest.base_model_id, folder, manifest.base_fingerprint)
    tokenizer = load_tokenizer(ref)
    eos = sorted(set(genai_eos_ids(folder)) | set(_eos_ids(tokenizer, None)))
    limits = dict(eos_token_ids=eos, max_batch_size=settings.max_batch_size, max_model_len=settings.max_model_len)
    mixed = settings.onnx_batching == "mixed"
    if mixed and not (manifest.stacked_graph and (folder / manifest.stacked_graph).is_file()):
        raise BaseModelError(f"--model {folder} has no mixed-batch graph (exported by an older loraplex?): re-export it, or pass --onnx-batching per-request")
    if mixed:
        engine = StackedOnnxEngine(folder, manifest.stacked_graph, max_num_batched_tokens=settings.max_num_batched_tokens, **limits)
    else:
        engine = OnnxEngine(folder, **limits)
    shapes = BaseShapes(
        fingerprint=manifest.base_fingerprint,
        linear_shapes={m: tuple(v) for m, v in manifest.lora_modules.items()},
        missing_module_hint=f"has no LoRA input in the exported model {folder} (re-export with --lora_targets all)",
    )

    def to_payload(name: str, adapter: ValidatedAdapter) -> AdapterPayload:
        return onnx_payload(name, adapter, read_tensors=mixed)

    exported = {a.name: folder / a.file for a in manifest.adapters}
    batching = "mixed-adapter batches" if mixed else "one onnxruntime-genai Generator per request"
    description = f"onnx ({manifest.precision} export, {batching}) on cpu"
    # int4 exports: each adapter's stored held-out answers are replayed on the export when it is
    # converted (the agreement shows in /v1/adapters; a warning below the threshold)
    replay = PredictionReplay(folder, tokenizer, eos, precision=manifest.precision) if manifest.precision == "int4" else None
    gate = OnnxAdapterGate(shapes, max_lora_rank=settings.max_lora_rank, cache_dir=default_adapter_cache(manifest.base_fingerprint), replay=replay)
    return Backend(ref, tokenizer, engine, shapes, description, to_payload, exported, validator=gate)


#: --backend -> how to build it
BACKENDS: dict[str, Callable[[ServerSettings], Backend]] = {"torch": _torch_backend, "onnx": _onnx_backend}
