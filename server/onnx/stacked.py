"""The onnx backend's mixed-adapter batch engine: rows of DIFFERENT adapters in one onnxruntime
forward on CPU (``--onnx-batching mixed``, the default).

It runs ``model.stacked.onnx`` (written by ``export-onnx``, ``graph.py``) with a plain
onnxruntime ``InferenceSession``: each LoRA weight is a stack over adapter slots
([slots, in, r] / [slots, r, out], slot 0 = zeros = the bare base) and ``lora_slots`` [batch]
picks each row's slot; stacks grow (more slots, larger ranks) by reallocation.

The KV cache is ours, like the torch engine's: per layer ``past`` [B, kv_heads, W, head] with
every row RIGHT-padded (row b valid in [0, len_b)); the model's GroupQueryAttention reads each
row's length from the attention mask's row sums and writes the new token's K/V at ``len_b``, so
rows of different lengths decode together. A new request is prefilled alone, then padded and
concatenated into the batch; finished rows are dropped and trailing padding trimmed.

Runs on the scheduler's thread only (adapter writes too: they are commands between steps).
Knows token ids, never text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from loraplex.server.engine.rows import EngineRequest, RowEngine, Running
from loraplex.server.engine.sampling import make_generator, sample_row
from loraplex.server.onnx.graph import SLOTS_INPUT


SLOT_GROWTH = 4  # slots added when every slot is taken


@dataclass
class _Row(Running):
    kv: list = field(default_factory=list)  # a prefilled row's own K/V per layer until it joins the batch


@dataclass
class _Stack:
    """One LoRA weight stacked over slots; A and B of a module share ``module``'s rank."""

    name: str
    weight: str  # the adapter file's tensor name (X.lora_A.weight)
    module: str
    kind: str  # "A" [slots, in, r] or "B" [slots, r, out]
    features: int
    array: np.ndarray


class StackedOnnxEngine(RowEngine):
    """One onnxruntime session, many adapters in slots, one mixed batch."""

    def __init__(self, model_dir: Path, graph_file: str, *, eos_token_ids: Sequence[int], max_batch_size: int = 16, max_model_len: int = 2048) -> None:
        import onnxruntime as ort

        super().__init__(eos_token_ids=eos_token_ids, max_batch_size=max_batch_size, max_model_len=max_model_len)
        self.model_dir = Path(model_dir)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.model_dir / graph_file), options, providers=["CPUExecutionProvider"])
        self._ort = ort
        decoder = json.loads((self.model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.num_layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._present = [self.output_names.index(f"present.{layer}.{kv}") for layer in range(self.num_layers) for kv in ("key", "value")]
        self._past_names = [f"past_key_values.{layer}.{kv}" for layer in range(self.num_layers) for kv in ("key", "value")]
        self.stacks: dict[str, _Stack] = {}
        for value in self.session.get_inputs():
            if not value.name.endswith(".stack"):
                continue
            kind = value.name.rsplit(".lora_", 1)[1][0]
            features = int(value.shape[1] if kind == "A" else value.shape[2])
            shape = (1, features, 0) if kind == "A" else (1, 0, features)
            self.stacks[value.name] = _Stack(value.name, value.name[: -len(".stack")] + ".weight", value.name.rsplit(".lora_", 1)[0], kind, features, np.zeros(shape, np.float32))
        self.ranks: dict[str, int] = {s.module: 0 for s in self.stacks.values()}
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self.past: list = []  # 2 per layer, [B, kv, W, head]: numpy arrays, or the last step's OrtValues
        self.width = 0
        # One IO binding for every run: the stacks are bound once per change (version), and each
        # step's present K/V stay onnxruntime values that are bound as the next step's past
        # (no copy to numpy and back); only joins, leaves and trims go through numpy.
        self._binding = self.session.io_binding()
        self._stack_version = 0
        self._bound_version = -1

    # ------------------------------------------------------------- adapters
    @property
    def resident_adapters(self) -> list[str]:
        return list(self.slot_of)

    @property
    def num_slots(self) -> int:
        return next(iter(self.stacks.values())).array.shape[0] if self.stacks else 1

    def add_adapter_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Write an adapter (``.onnx_adapter`` tensors: A^T [in, r], scaled B^T [r, out]) into a
        slot, growing the stacks when needed. All-or-nothing: every new array is allocated
        before any state changes, so a failure (out of memory) leaves the engine as it was.
        Engine thread only; a same-named adapter is replaced in its own slot."""
        unknown = sorted(set(arrays) - {s.weight for s in self.stacks.values()})
        if unknown:
            raise ValueError(f"adapter {name!r} has tensors the graph has no LoRA input for: {unknown[:3]}")
        replacing = self.slot_of.get(name)
        if replacing is not None:
            self._drop_cancelled()
            self._refuse_if_busy(name)
        ranks = dict(self.ranks)
        for stack in self.stacks.values():
            array = arrays.get(stack.weight)
            if array is not None:
                ranks[stack.module] = max(ranks[stack.module], array.shape[1] if stack.kind == "A" else array.shape[0])
        old_slots = self.num_slots
        slots = old_slots + (SLOT_GROWTH if replacing is None and not self._free else 0)
        grown: dict[str, np.ndarray] = {}
        for stack in self.stacks.values():  # allocate (may fail) ...
            rank = ranks[stack.module]
            shape = (slots, stack.features, rank) if stack.kind == "A" else (slots, rank, stack.features)
            if shape != stack.array.shape:
                array = np.zeros(shape, np.float32)
                _, a, b = stack.array.shape
                array[:old_slots, :a, :b] = stack.array
                grown[stack.name] = array
        for stack_name, array in grown.items():  # ... then commit (nothing below allocates)
            self.stacks[stack_name].array = array
        self.ranks = ranks
        self._free.extend(range(slots - 1, old_slots - 1, -1))
        slot = replacing if replacing is not None else self._free.pop()
        for stack in self.stacks.values():
            stack.array[slot] = 0.0  # a slot reused by a smaller rank keeps no stale columns
            array = arrays.get(stack.weight)
            if array is None:
                continue
            if stack.kind == "A":
                stack.array[slot, :, : array.shape[1]] = array
            else:
                stack.array[slot, : array.shape[0], :] = array
        self.slot_of[name] = slot
        self._stack_version += 1

    def remove_adapter(self, name: str) -> None:
        self._drop_cancelled()
        self._refuse_if_busy(name)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self._free.append(slot)

    # ----------------------------------------------------------------- steps
    def _run(self, input_ids: np.ndarray, mask: np.ndarray, slots: list[int], past: list):
        """One forward; returns logits (numpy) and the present K/V (onnxruntime values)."""
        binding = self._binding
        if self._bound_version != self._stack_version:
            for stack in self.stacks.values():
                binding.bind_cpu_input(stack.name, stack.array)
            self._bound_version = self._stack_version
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input(SLOTS_INPUT, np.asarray(slots, dtype=np.int64))
        for name, value in zip(self._past_names, past):
            # always as OrtValues: bind_cpu_input would keep a reference to every numpy past it
            # ever saw (a whole KV cache) until the same name is bound as numpy again
            binding.bind_ortvalue_input(name, value if not isinstance(value, np.ndarray) else self._ort.OrtValue.ortvalue_from_numpy(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        binding.clear_binding_outputs()  # the binding must not keep a prefill's [1, L, vocab] logits alive
        return outputs[0].numpy(), [outputs[i] for i in self._present]

    def _slot(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        slot = self.slot_of.get(adapter)
        if slot is None:
            raise RuntimeError(f"adapter {adapter!r} is not resident")
        return slot

    def prefill(self, request: EngineRequest) -> None:
        """The prompt alone (batch 1), the first token, then the row joins the batch."""
        length = len(request.prompt_ids)
        ids = np.asarray([request.prompt_ids], dtype=np.int64)  # [1, L]
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        logits, present = self._run(ids, np.ones((1, length), np.int64), [self._slot(request.adapter)], [empty] * len(self._past_names))
        row = _Row(request=request, generator=make_generator(request.params), length=length, stop_ids=self.stop_ids_for(request.params), kv=present)
        token = sample_row(_torch(logits[0, -1]), request.params, row.generator)
        if self._accept(row, token):
            self._merge(row)
            self._join(row)

    def _merge(self, row: _Row) -> None:
        """Right-pad the batch and the new row to one width and stack them."""
        width = max(self.width, row.length)
        if not self.past:
            self.past = [_pad(_host(kv), width) for kv in row.kv]
        else:
            self.past = [np.concatenate([_pad(_host(batch), width), _pad(_host(kv), width)], axis=0) for batch, kv in zip(self.past, row.kv)]
        self.width = width
        row.kv = []

    def decode(self) -> None:
        """One token for every running row, all adapters, one forward."""
        self._drop_cancelled()
        if not self.running:
            return
        batch = len(self.running)
        mask = np.zeros((batch, self.width + 1), np.int64)  # row sums = each row's length + the new token
        for b, row in enumerate(self.running):
            mask[b, : row.length + 1] = 1
        ids = np.asarray([[row.last_token] for row in self.running], dtype=np.int64)  # [B, 1]
        logits, present = self._run(ids, mask, [self._slot(r.request.adapter) for r in self.running], self.past)
        self.past, self.width = present, self.width + 1
        keep: list[int] = []
        for b, row in enumerate(self.running):
            row.length += 1
            if self._advance(row, _torch(logits[b, -1])):
                keep.append(b)
        self._keep_rows(keep)

    def _forget_rows(self, keep: list[int]) -> None:
        if not keep:  # idle: drop the KV cache and the binding's references to it
            self.past, self.width = [], 0
            self._binding.clear_binding_inputs()
            self._bound_version = -1  # stacks are bound again on the next run
            return
        index = np.asarray(keep, dtype=np.int64)
        longest = max(row.length for row in self.running)
        self.past = [np.ascontiguousarray(_host(p)[index][:, :, :longest]) for p in self.past]
        self.width = longest


def _host(value) -> np.ndarray:
    """A numpy copy of an onnxruntime value (or the array itself)."""
    return value if isinstance(value, np.ndarray) else np.array(value.numpy())


def _pad(kv: np.ndarray, width: int) -> np.ndarray:
    extra = width - kv.shape[2]
    return kv if extra == 0 else np.pad(kv, ((0, 0), (0, 0), (0, extra), (0, 0)))


def _torch(logits: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
