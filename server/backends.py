"""Serving backends: each builds the base model, its tokenizer and an engine from the settings,
and says how validated adapters get into that engine. ``BACKENDS`` maps ``--backend`` to its
factory: a new backend is one factory here (or a module it imports) plus one row in the table.

Knows engines, the base model and the adapter formats; knows nothing of HTTP, gRPC, the service
or the registry's policies.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from loraplex.server.basemodel import BaseModelRef, load_base_model, load_tokenizer, resolve_base
from loraplex.server.engine.engine import Engine
from loraplex.server.errors import BaseModelError
from loraplex.server.registry import BaseShapes
from loraplex.server.scheduler import Scheduler
from loraplex.server.settings import ServerSettings


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
    engine: Any  # a RowEngine: the torch Engine or the OnnxEngine
    shapes: BaseShapes
    description: str
    make_installer: Callable[[Scheduler], Any]
    exported: dict = field(default_factory=dict)
    validator: Callable | None = None  # the registry's gate; None = full validation on every load


def _torch_backend(settings: ServerSettings) -> Backend:
    ref = resolve_base(settings.base)
    device, quantize = settings.resolved_device(), settings.resolved_quantize()
    tokenizer = load_tokenizer(ref)
    model = load_base_model(ref, quantize=quantize, device=device)
    shapes = BaseShapes.from_model(model, ref.fingerprint)  # before the engine wraps the Linear layers
    engine = Engine(
        model,
        eos_token_ids=_eos_ids(tokenizer, model),
        max_batch_size=settings.max_batch_size,
        max_model_len=settings.max_model_len,
        device=device,
    )

    def make_installer(scheduler: Scheduler):
        class EngineInstaller:
            async def add(self, name, adapter):
                modules = adapter.modules
                # Fast path: a free slot that fits is written from a worker thread while decoding goes on.
                if await asyncio.to_thread(engine.add_adapter_in_place, name, modules):
                    return
                await asyncio.wrap_future(scheduler.call(lambda e: e.add_adapter(name, modules)))

            async def remove(self, name):
                await asyncio.wrap_future(scheduler.call(lambda e: e.remove_adapter(name)))

        return EngineInstaller()

    return Backend(ref, tokenizer, engine, shapes, f"torch, quantization {quantize} on {device}", make_installer)


def _onnx_backend(settings: ServerSettings) -> Backend:
    from pathlib import Path

    from loraplex.server.onnx.engine import OnnxEngine, genai_eos_ids
    from loraplex.server.onnx.gate import OnnxAdapterGate, default_adapter_cache
    from loraplex.server.onnx.manifest import read_export_manifest
    from loraplex.server.onnx.stacked import StackedOnnxEngine
    from loraplex.server.store.onnx_adapter import OnnxAdapterTensors

    folder = Path(settings.model).expanduser().resolve()
    manifest = read_export_manifest(folder)
    ref = BaseModelRef(manifest.base_model_id, folder, manifest.base_fingerprint)
    tokenizer = load_tokenizer(ref)
    eos = sorted(set(genai_eos_ids(folder)) | set(_eos_ids(tokenizer, None)))
    limits = dict(eos_token_ids=eos, max_batch_size=settings.max_batch_size, max_model_len=settings.max_model_len)
    mixed = settings.onnx_batching == "mixed"
    if mixed and not (manifest.stacked_graph and (folder / manifest.stacked_graph).is_file()):
        raise BaseModelError(f"--model {folder} has no mixed-batch graph (exported by an older loraplex?): re-export it, or pass --onnx-batching per-request")
    engine = StackedOnnxEngine(folder, manifest.stacked_graph, **limits) if mixed else OnnxEngine(folder, **limits)
    shapes = BaseShapes(
        fingerprint=manifest.base_fingerprint,
        linear_shapes={m: tuple(v) for m, v in manifest.lora_modules.items()},
        missing_module_hint=f"has no LoRA input in the exported model {folder} (re-export with --lora_targets all)",
    )

    def make_installer(scheduler: Scheduler):
        class OnnxInstaller:
            async def add(self, name, adapter):
                # the gate has validated and converted it; the tensors are read off the engine thread
                if mixed:  # read off the engine thread; the engine copies the views into its stacks
                    tensors = await asyncio.to_thread(OnnxAdapterTensors, adapter.artifact)
                    await asyncio.wrap_future(scheduler.call(lambda e: e.add_adapter_arrays(name, tensors.arrays())))
                else:  # its own og.Adapters container: no shared state, decoding goes on meanwhile
                    await asyncio.to_thread(engine.load_adapter_file, name, adapter.artifact)

            async def remove(self, name):
                await asyncio.wrap_future(scheduler.call(lambda e: e.remove_adapter(name)))

        return OnnxInstaller()

    exported = {a.name: folder / a.file for a in manifest.adapters}
    batching = "mixed-adapter batches" if mixed else "one onnxruntime-genai Generator per request"
    description = f"onnx ({manifest.precision} export, {batching}) on cpu"
    gate = OnnxAdapterGate(shapes, max_lora_rank=settings.max_lora_rank, cache_dir=default_adapter_cache(manifest.base_fingerprint))
    return Backend(ref, tokenizer, engine, shapes, description, make_installer, exported, validator=gate)


#: --backend -> how to build it
BACKENDS: dict[str, Callable[[ServerSettings], Backend]] = {"torch": _torch_backend, "onnx": _onnx_backend}
