"""The ``onnx`` backend's per-request engine (``--onnx-batching per-request``): onnxruntime-genai
over a folder written by ``export-onnx``; and the onnx adapter payload both onnx engines install.

Same contract as every engine (``engine/protocol.py``: admit / step / adapters / stats, driven
by the scheduler's one thread; ``RowEngine`` turns admit/step into prefill/decode here),
different batching: an onnxruntime-genai ``Generator`` batches rows of
ONE adapter fixed at its creation, and its continuous-batching ``Engine`` has no adapter support,
so every request gets its own Generator (its own KV cache, its adapter set once, as
onnxruntime-genai requires) and a decode step advances each running Generator by one token.

Sampling is ours, not onnxruntime-genai's: each step reads the last logits of every running
Generator and samples them together with the same code as the torch backend
(``RowEngine._sample_and_accept``: greedy, temperature, top-p/top-k, seed, penalties, logit bias,
min_tokens, logprobs of the generated tokens, structured-output constraints), then appends the
tokens; so both backends honour the same request fields and stop rules.

Features (``features``): logprobs, constraint, penalties. Not supported, refused at admission:
prompt logprobs (a Generator hands back the last position's logits only, not the prompt's), n > 1
(a Generator's KV cache cannot be copied into another Generator), and adapter mixes (a Generator
runs exactly one adapter, set once).

Adapters: each resident adapter lives in its OWN ``og.Adapters`` container, held in a slot of the
shared ``SlotTable`` (engine/slots.py; slots are only bookkeeping here: nothing is stacked).
Loading one touches no shared state, so ``try_add_adapter_in_place`` does it from a worker
thread while decoding goes on; removal happens on the engine thread once no Generator uses it
(onnxruntime-genai refuses to unload an adapter in use).
The files come from the backend's gate (``gate.py``: validation + conversion of peft adapters).

A row that leaves ``running`` drops the last reference to its Generator, which frees its KV
cache and its hold on the adapter at once (no per-row state to forget beyond that).

Knows token ids, never text.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from loraplex.server.engine.rows import EngineRequest, RowEngine, Running
from loraplex.server.engine.sampling import make_generator
from loraplex.server.engine.slots import SlotTable
from loraplex.server.store.onnx_adapter import ONNX_ADAPTER_SUFFIX, OnnxAdapterTensors

log = logging.getLogger("loraplex.onnx")


@dataclass(frozen=True)
class OnnxAdapterPayload:
    """A validated adapter as the onnx engines install it: an ``.onnx_adapter`` file (A^T,
    scaled B^T per graph input), with its tensors optionally read ahead off the engine thread."""

    name: str
    path: Path
    tensors: OnnxAdapterTensors | None = None
    kind: str = "onnx"

    @contextlib.contextmanager
    def open(self) -> Iterator[Mapping[str, np.ndarray]]:
        """The file's tensors as numpy views, valid inside the ``with`` block."""
        tensors = self.tensors if self.tensors is not None else OnnxAdapterTensors(self.path)
        yield tensors.arrays()  # ``tensors`` lives until the block ends: the views stay valid


def check_onnx_payload(payload) -> OnnxAdapterPayload:
    """Refuse anything but an onnx payload naming an ``.onnx_adapter`` file (an adapter validated
    for the torch backend carries no such file: installing it would serve the base)."""
    kind = getattr(payload, "kind", None)
    if kind != "onnx":
        raise TypeError(f"the onnx engines install 'onnx' adapter payloads, got kind {kind!r} for {getattr(payload, 'name', payload)!r}")
    if payload.path is None or not str(payload.path).endswith(ONNX_ADAPTER_SUFFIX):
        raise ValueError(f"adapter {payload.name!r}: {payload.path} is not an {ONNX_ADAPTER_SUFFIX} file")
    return payload


class _ContainerStore:
    """``SlotStore`` of the per-request engine: slot -> an ``og.Adapters`` holding one adapter."""

    def __init__(self, og, model) -> None:
        self._og, self._model = og, model
        self.containers: dict[int, tuple[object, str]] = {}

    def fits(self, capacity: int, payload: OnnxAdapterPayload) -> bool:
        return True  # nothing preallocated

    def grow(self, capacity: int, payload: OnnxAdapterPayload):
        return None

    def write(self, slot: int, payload: OnnxAdapterPayload) -> None:
        container = self._og.Adapters(self._model)
        container.load(str(payload.path), payload.name)
        self.containers[slot] = (container, payload.name)

    def clear(self, slot: int) -> None:
        held = self.containers.pop(slot, None)
        if held is not None:
            container, name = held
            try:
                container.unload(name)
            except Exception:  # the container is dropped anyway; its memory goes with it
                log.warning("unloading adapter %s failed; dropping its container", name, exc_info=True)


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

    payload_kind = "onnx"
    features = frozenset({"logprobs", "constraint", "penalties"})

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
        self.store = _ContainerStore(og, self.model)
        self.slot_table: SlotTable[OnnxAdapterPayload] = SlotTable(self.store)

    # ------------------------------------------------------------- adapters
    @property
    def resident_adapters(self) -> list[str]:
        return self.slot_table.names

    def try_add_adapter_in_place(self, payload: OnnxAdapterPayload) -> bool:
        """Any thread: load into a container of its own (no shared state); False only when
        ``payload.name`` is resident (then ``add_adapter`` replaces it on the engine thread)."""
        return self.slot_table.try_add_in_place(payload.name, check_onnx_payload(payload))

    def add_adapter(self, payload: OnnxAdapterPayload) -> None:
        """Engine thread: load, replacing a same-named adapter that no running request uses."""
        payload = check_onnx_payload(payload)
        if payload.name in self.slot_table:
            self._drop_cancelled()
            self._refuse_if_busy(payload.name)
        self.slot_table.add(payload.name, payload)

    def load_adapter_file(self, name: str, path: Path) -> None:
        """``add_adapter`` from a file path (tests, tools)."""
        self.add_adapter(OnnxAdapterPayload(name=name, path=Path(path)))

    def remove_adapter(self, name: str) -> None:
        """On the engine thread: unload ``name`` (refused while a running request uses it)."""
        self._drop_cancelled()
        self._refuse_if_busy(name)
        self.slot_table.remove(name)

    def _container(self, name: str):
        slot = self.slot_table.slots.get(name)
        held = self.store.containers.get(slot) if slot is not None else None
        if held is None:
            raise RuntimeError(f"adapter {name!r} is not resident")
        return held[0]

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
            generator.set_active_adapter(self._container(request.adapter), request.adapter)
        generator.append_tokens(prompt)
        running = _OnnxRunning(
            request=request,
            generator=make_generator(request.params),
            length=len(prompt),
            stop_ids=self.stop_ids_for(request.params),
            og_generator=generator,
        )
        self._join(running)  # joined before sampling: a row that ends at once leaves through _keep_rows
        self._sample_and_accept([running], self._last_logits(generator)[None])

    def decode(self) -> None:
        """One token for every running sequence (one forward per Generator), sampled together."""
        self._drop_cancelled()
        rows: list[_OnnxRunning] = []
        logits = []
        failed: set[int] = set()
        for running in self.running:
            try:
                running.og_generator.append_tokens(np.asarray([running.last_token], dtype=np.int32))
                logits.append(self._last_logits(running.og_generator))
            except Exception:
                self._fail_row(running)
                failed.add(id(running))
                continue
            running.length += 1
            rows.append(running)
        if failed:
            self._keep_rows([i for i, r in enumerate(self.running) if id(r) not in failed])
        if rows:
            import torch

            self._sample_and_accept(rows, torch.stack(logits))  # [R, vocab]

    @staticmethod
    def _last_logits(generator):
        import torch

        logits = generator.get_logits()  # [batch=1, 1, vocab]
        return torch.from_numpy(np.ascontiguousarray(logits.reshape(-1, logits.shape[-1])[-1], dtype=np.float32))
