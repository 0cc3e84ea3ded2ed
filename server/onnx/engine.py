"""The ``onnx`` backend's engine: onnxruntime-genai over a folder written by ``export-onnx``.

Same contract as the torch engine (``RowEngine``: prefill / decode / adapters, driven by the
scheduler's one thread), different batching: an onnxruntime-genai ``Generator`` batches rows of
ONE adapter fixed at its creation, and its continuous-batching ``Engine`` has no adapter support,
so every request gets its own Generator (its own KV cache, its adapter set once, as
onnxruntime-genai requires) and a decode step advances each running Generator by one token.

Sampling is ours, not onnxruntime-genai's: each step reads the last logits and samples with the
same code as the torch backend (greedy, temperature, top-p, seed), then appends the token; so
both backends honour the same request fields and stop rules.

Adapters: each resident adapter lives in its OWN ``og.Adapters`` container. Loading one touches
no shared state, so it runs in a worker thread while decoding goes on; removal happens on the
engine thread once no Generator uses it (onnxruntime-genai refuses to unload an adapter in use).
The files come from the backend's gate (``gate.py``: validation + conversion of peft adapters).

A row that leaves ``running`` drops the last reference to its Generator, which frees its KV
cache and its hold on the adapter at once (no per-row state to forget beyond that).

Knows token ids, never text.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from loraplex.server.engine.rows import EngineRequest, RowEngine, Running
from loraplex.server.engine.sampling import make_generator, sample_row

log = logging.getLogger("loraplex.onnx")


@dataclass
class _OnnxRunning(Running):
    og_generator: object = None  # onnxruntime_genai.Generator


def genai_eos_ids(model_dir: Path) -> list[int]:
    """EOS ids declared in genai_config.json (an int or a list)."""
    config = json.loads((Path(model_dir) / "genai_config.json").read_text())
    eos = config.get("model", {}).get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    return [int(e) for e in eos or []]


class OnnxEngine(RowEngine):
    """One onnxruntime-genai model, many adapters, one Generator per running request."""

    def __init__(
        self,
        model_dir: Path,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 16,
        max_model_len: int = 2048,
    ) -> None:
        import onnxruntime_genai as og

        super().__init__(eos_token_ids=eos_token_ids, max_batch_size=max_batch_size, max_model_len=max_model_len)
        self._og = og
        self.model_dir = Path(model_dir)
        self.model = og.Model(str(self.model_dir))
        self._containers: dict[str, object] = {}  # adapter name -> og.Adapters holding only it
        self._lock = threading.Lock()  # guards _containers between the loader thread and the engine thread

    # ------------------------------------------------------------- adapters
    @property
    def resident_adapters(self) -> list[str]:
        return list(self._containers)

    def load_adapter_file(self, name: str, path: Path) -> None:
        """From any thread: load ``path`` as ``name`` into a container of its own. A resident
        adapter of the same name must be removed first (the registry does)."""
        container = self._og.Adapters(self.model)
        container.load(str(path), name)
        with self._lock:
            if name in self._containers:
                container.unload(name)
                raise RuntimeError(f"adapter {name!r} is already resident")
            self._containers[name] = container

    def remove_adapter(self, name: str) -> None:
        """On the engine thread: unload ``name`` (refused while a running request uses it)."""
        self._drop_cancelled()
        self._refuse_if_busy(name)
        with self._lock:
            container = self._containers.pop(name, None)
        if container is not None:
            container.unload(name)

    # ----------------------------------------------------------------- steps
    def prefill(self, request: EngineRequest) -> None:
        """A Generator for this request (adapter set once), the prompt, the first token."""
        og = self._og
        prompt = np.asarray(request.prompt_ids, dtype=np.int32)
        params = og.GeneratorParams(self.model)
        # room for the prompt and every token we will append (the last sampled one is never appended)
        max_length = min(self.max_model_len, len(prompt) + request.params.max_tokens)
        params.set_search_options(max_length=max(max_length, len(prompt) + 1), do_sample=False, batch_size=1)
        generator = og.Generator(self.model, params)
        if request.adapter is not None:
            with self._lock:
                container = self._containers.get(request.adapter)
            if container is None:
                raise RuntimeError(f"adapter {request.adapter!r} is not resident")
            generator.set_active_adapter(container, request.adapter)
        generator.append_tokens(prompt)
        running = _OnnxRunning(
            request=request,
            generator=make_generator(request.params),
            length=len(prompt),
            stop_ids=self.stop_ids_for(request.params),
            og_generator=generator,
        )
        token = sample_row(self._last_logits(generator), request.params, running.generator)
        if self._accept(running, token):
            self._join(running)

    def decode(self) -> None:
        """One token for every running sequence (one forward per Generator)."""
        self._drop_cancelled()
        keep: list[int] = []
        for i, running in enumerate(self.running):
            try:
                running.og_generator.append_tokens(np.asarray([running.last_token], dtype=np.int32))
                logits = self._last_logits(running.og_generator)
            except Exception:
                self._fail_row(running)
                continue
            running.length += 1
            if self._advance(running, logits):
                keep.append(i)
        self._keep_rows(keep)

    @staticmethod
    def _last_logits(generator):
        import torch

        logits = generator.get_logits()  # [batch=1, 1, vocab]
        return torch.from_numpy(np.ascontiguousarray(logits.reshape(-1, logits.shape[-1])[-1], dtype=np.float32))
