"""The one installer (server/backends.py) between the registry and any engine: an adapter
validated for the onnx backend (only an .onnx_adapter file, no per-module weights) can never be
installed into the torch engine as an empty slot that would silently serve base output, whether
it comes through the installer or straight to the engine; a real peft adapter goes in and
changes the output exactly as peft's PeftModel does."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from loraplex.server.backends import EngineInstaller, onnx_payload, torch_payload
from loraplex.server.basemodel import compute_fingerprint
from loraplex.server.errors import AdapterInvalid
from loraplex.server.registry import BaseShapes, load_validated_adapter
from tests.oracle import greedy_request, make_random_adapter, reference_greedy


@pytest.fixture(scope="module")
def torch_engine(tiny_base):
    from transformers import AutoModelForCausalLM

    from loraplex.server.engine.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    shapes = BaseShapes.from_model(model, compute_fingerprint(tiny_base))
    return Engine(model, eos_token_ids=[2], max_batch_size=4, max_model_len=128), shapes


def test_an_onnx_validated_adapter_never_lands_in_the_torch_engine(tiny_base, torch_engine, tmp_path):
    from loraplex.server.onnx.engine import OnnxAdapterPayload
    from loraplex.server.scheduler import Scheduler

    engine, shapes = torch_engine
    folder = make_random_adapter(tiny_base, tmp_path / "a", seed=7, r=4)
    validated = load_validated_adapter(folder, "a", shapes, max_lora_rank=64)
    artifact = tmp_path / "a.onnx_adapter"
    artifact.write_bytes(b"not read: refused before")
    as_onnx_gate_leaves_it = replace(validated, modules={}, artifact=artifact)  # what OnnxAdapterGate returns
    scheduler = Scheduler(engine, max_queue=4)
    scheduler.start()
    try:
        installer = EngineInstaller(engine, scheduler, torch_payload)
        with pytest.raises(AdapterInvalid, match="no per-module LoRA weights.*onnx backend"):
            asyncio.run(installer.add("a", as_onnx_gate_leaves_it))
        # the onnx backend's payload maker handed to the torch engine's installer: wrong kind
        wrong = EngineInstaller(engine, scheduler, lambda name, adapter: onnx_payload(name, adapter, read_tensors=False))
        with pytest.raises(AdapterInvalid, match="'onnx' payload; this engine installs 'torch'"):
            asyncio.run(wrong.add("a", as_onnx_gate_leaves_it))
        with pytest.raises(TypeError):  # straight to the engine: refused by kind as well
            engine.add_adapter(OnnxAdapterPayload(name="a", path=artifact))
        with pytest.raises(AdapterInvalid, match="no .onnx_adapter file"):  # and the other way round
            onnx_payload("a", validated, read_tensors=False)
        assert engine.resident_adapters == []
        asyncio.run(installer.add("a", validated))  # the real thing goes in
        assert engine.resident_adapters == ["a"]
    finally:
        scheduler.stop()
    request, sink = greedy_request("r", [1, 520, 3000, 44], "a", 6)
    engine.admit(request)
    while engine.num_running:
        engine.step()
    assert sink.tokens == reference_greedy(tiny_base, folder, [1, 520, 3000, 44], n=6)
    asyncio.run(EngineInstaller(engine, _Inline(engine), torch_payload).remove("a"))
    assert engine.resident_adapters == []


class _Inline:
    """A scheduler stand-in that runs the command at once (the engine is idle here)."""

    def __init__(self, engine):
        self.engine = engine

    def call(self, fn):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result(fn(self.engine))
        return future
