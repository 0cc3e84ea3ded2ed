"""The onnx backend's mixed-adapter batch engine: rows of DIFFERENT adapters in one onnxruntime
forward on CPU (``--onnx-batching mixed``, the default).

It runs ``model.stacked.onnx`` (written by ``export-onnx``, ``graph.py``) with a plain
onnxruntime ``InferenceSession``: each LoRA weight is a stack over adapter slots
([slots, in, r] / [slots, r, out], slot 0 = zeros = the bare base) and ``lora_slots`` [batch]
picks each row's slot. Slots are the shared ``SlotTable`` (engine/slots.py) over
``OnnxStackStore``: growth (more slots, a larger rank) is all-or-nothing.

KV cache, written in place: per layer one preallocated buffer ``[max_batch, kv_heads,
max_model_len, head]`` (zero pages from calloc: memory is only taken where rows really write).
Running row ``i`` owns buffer row ``i``; every forward binds the rows' view as BOTH the
GroupQueryAttention's ``past`` input and its ``present`` output, so onnxruntime writes each new
token's K/V at the row's length (read from the attention mask's row sums) in place: no
per-step concatenation and no copy when a row joins. A row that leaves is replaced by the last
row (one row's K/V copied, never the whole cache).

A step (``step``): rows that were cancelled leave; admitted prompts are prefilled TOGETHER in one
forward (right-padded to the longest, within ``max_num_batched_tokens``) straight into their
buffer rows; then one decode forward over every running row. What the graph cannot do (prompt
chunks continuing a cache, prefill and decode rows in one forward) is in docs/onnx.md.

Features (``features``): logprobs, prompt logprobs (a prefill forward returns the logits of every
prompt position), constraints and penalties (the shared ``RowEngine._sample_and_accept`` over the
graph's fp32 logits), and n > 1: a request's forks are prefilled with it ONCE, then the prompt's
K/V rows are copied into one buffer row per fork, and every fork samples the same last logits.
Refused at admission: adapter mixes (the graph takes ONE slot per row in ``lora_slots``: a
weighted sum over slots needs a per-row weight input in the exported graph).

Runs on the scheduler's thread, except ``try_add_adapter_in_place`` (a free slot, any thread).
Knows token ids, never text.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from loraplex.server.engine.protocol import EngineStats
from loraplex.server.engine.rows import FINISH_ERROR, FINISH_LENGTH, EngineRequest, RowEngine, Running, promote_forks
from loraplex.server.engine.sampling import make_generator
from loraplex.server.engine.slots import SlotTable
from loraplex.server.onnx.engine import OnnxAdapterPayload, check_onnx_payload
from loraplex.server.onnx.graph import SLOTS_INPUT

log = logging.getLogger("loraplex.onnx")


@dataclass
class _Row(Running):
    """A running row (its K/V in buffer row ``running.index(row)``)."""


@dataclass
class _Stack:
    """One LoRA weight stacked over slots; A and B of a module share ``module``'s rank."""

    name: str  # graph input (X.lora_A.stack)
    weight: str  # the adapter file's tensor name (X.lora_A.weight)
    module: str
    kind: str  # "A" [slots, in, r] or "B" [slots, r, out]
    features: int
    array: np.ndarray


class OnnxStackStore:
    """The ``SlotStore`` of the stacked graph: numpy stacks, one per LoRA input. The payload is
    ``{tensor name: array}`` as in an ``.onnx_adapter`` file (A^T [in, r], scaled B^T [r, out])."""

    def __init__(self, stacks: Mapping[str, _Stack]) -> None:
        self.stacks = dict(stacks)
        self.ranks: dict[str, int] = {s.module: s.array.shape[2] if s.kind == "A" else s.array.shape[1] for s in self.stacks.values()}

    def _rank(self, stack: _Stack, array: np.ndarray) -> int:
        return array.shape[1] if stack.kind == "A" else array.shape[0]

    def _needed_ranks(self, arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
        ranks = dict(self.ranks)
        for stack in self.stacks.values():
            array = arrays.get(stack.weight)
            if array is not None:
                ranks[stack.module] = max(ranks[stack.module], self._rank(stack, array))
        return ranks

    @property
    def capacity(self) -> int:
        return next(iter(self.stacks.values())).array.shape[0] if self.stacks else 1

    def fits(self, capacity: int, arrays: Mapping[str, np.ndarray]) -> bool:
        return capacity <= self.capacity and self._needed_ranks(arrays) == self.ranks

    def grow(self, capacity: int, arrays: Mapping[str, np.ndarray]):
        ranks = self._needed_ranks(arrays)
        old_slots = self.capacity
        slots = max(capacity, old_slots)
        grown: dict[str, np.ndarray] = {}
        for stack in self.stacks.values():  # allocate every array first: a failure changes nothing
            rank = ranks[stack.module]
            shape = (slots, stack.features, rank) if stack.kind == "A" else (slots, rank, stack.features)
            if shape != stack.array.shape:
                array = np.zeros(shape, np.float32)
                _, a, b = stack.array.shape
                array[:old_slots, :a, :b] = stack.array
                grown[stack.name] = array
        if not grown:
            return None
        previous = ({name: self.stacks[name].array for name in grown}, dict(self.ranks))
        for name, array in grown.items():  # commit: nothing below allocates
            self.stacks[name].array = array
        self.ranks = ranks

        def undo() -> None:
            arrays_before, ranks_before = previous
            for name, array in arrays_before.items():
                self.stacks[name].array = array
            self.ranks = ranks_before

        return undo

    def write(self, slot: int, arrays: Mapping[str, np.ndarray]) -> None:
        for stack in self.stacks.values():
            array = arrays.get(stack.weight)
            if array is None:
                continue
            if stack.kind == "A":
                stack.array[slot, :, : array.shape[1]] = array
            else:
                stack.array[slot, : array.shape[0], :] = array

    def clear(self, slot: int) -> None:
        for stack in self.stacks.values():
            if slot < stack.array.shape[0]:
                stack.array[slot] = 0.0


class StackedOnnxEngine(RowEngine):
    """One onnxruntime session, many adapters in slots, one mixed batch, KV written in place."""

    payload_kind = "onnx"
    features = frozenset({"logprobs", "prompt_logprobs", "n", "constraint", "penalties"})

    def __init__(
        self,
        model_dir: Path,
        graph_file: str,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 16,
        max_model_len: int = 2048,
        max_num_batched_tokens: int = 512,
    ) -> None:
        import onnxruntime as ort

        super().__init__(eos_token_ids=eos_token_ids, max_batch_size=max_batch_size, max_model_len=max_model_len)
        self.model_dir = Path(model_dir)
        self.max_num_batched_tokens = max(1, max_num_batched_tokens)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.model_dir / graph_file), options, providers=["CPUExecutionProvider"])
        self._ort = ort
        decoder = json.loads((self.model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.num_layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self._kv_names = [(f"past_key_values.{layer}.{kv}", f"present.{layer}.{kv}") for layer in range(self.num_layers) for kv in ("key", "value")]
        stacks: dict[str, _Stack] = {}
        for value in self.session.get_inputs():
            if not value.name.endswith(".stack"):
                continue
            kind = value.name.rsplit(".lora_", 1)[1][0]
            features = int(value.shape[1] if kind == "A" else value.shape[2])
            shape = (1, features, 0) if kind == "A" else (1, 0, features)
            stacks[value.name] = _Stack(value.name, value.name[: -len(".stack")] + ".weight", value.name.rsplit(".lora_", 1)[0], kind, features, np.zeros(shape, np.float32))
        self.store = OnnxStackStore(stacks)
        self.slot_table: SlotTable[Mapping[str, np.ndarray]] = SlotTable(self.store)
        # The KV cache: [max_batch, kv_heads, max_model_len, head] per layer and K/V. np.zeros
        # maps zero pages lazily, so the resident memory follows the tokens really written.
        shape = (max_batch_size, self.kv_heads, max_model_len, self.head_size)
        self.kv = [np.zeros(shape, np.float32) for _ in self._kv_names]
        self.running: list[_Row] = []
        self._binding = self.session.io_binding()
        self._bound_version = -1

    # ------------------------------------------------------------- adapters
    @property
    def resident_adapters(self) -> list[str]:
        return self.slot_table.names

    @property
    def stacks(self) -> dict[str, _Stack]:
        return self.store.stacks

    @property
    def num_slots(self) -> int:
        return self.store.capacity

    def _check_tensors(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(set(arrays) - {s.weight for s in self.store.stacks.values()})
        if unknown:
            raise ValueError(f"adapter {name!r} has tensors the graph has no LoRA input for: {unknown[:3]}")
        if not arrays:
            raise ValueError(f"adapter {name!r} has no LoRA tensors; refusing to install an empty slot")

    def add_adapter(self, payload: OnnxAdapterPayload) -> None:
        """Engine thread: copy the adapter's tensors into a slot (growing the stacks if needed;
        all-or-nothing). A same-named adapter not in use is replaced."""
        payload = check_onnx_payload(payload)
        with payload.open() as arrays:
            self.add_adapter_arrays(payload.name, arrays)

    def try_add_adapter_in_place(self, payload: OnnxAdapterPayload) -> bool:
        """Any thread: copy into a free slot that already fits (no stack is replaced, so a
        forward running meanwhile is unaffected); False when the stacks must grow."""
        payload = check_onnx_payload(payload)
        with payload.open() as arrays:
            self._check_tensors(payload.name, arrays)
            return self.slot_table.try_add_in_place(payload.name, arrays)

    def add_adapter_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Engine thread: ``add_adapter`` with the tensors in hand (tests, the export's adapters)."""
        self._check_tensors(name, arrays)
        if name in self.slot_table:
            self._drop_cancelled()
            self._refuse_if_busy(name)
        self.slot_table.add(name, arrays)

    def remove_adapter(self, name: str) -> None:
        self._drop_cancelled()
        self._refuse_if_busy(name)
        self.slot_table.remove(name)

    # ----------------------------------------------------------------- state
    @property
    def num_running(self) -> int:
        return len(self.running) + sum(r.rows for r in self.admitted)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self.num_running,
            kv_used_tokens=sum(r.length for r in self.running),
            kv_capacity_tokens=self.max_batch_size * self.max_model_len,
            peak_batch_size=self.peak_batch_size,
            steps=self.steps,
        )

    def kv_usage(self) -> float:
        return self.stats().kv_usage

    # ----------------------------------------------------------------- steps
    def _run(self, rows: slice, input_ids: np.ndarray, mask: np.ndarray, slots: list[int]) -> np.ndarray:
        """One forward over buffer rows ``rows``; K/V written into them in place. Returns the
        logits [B, S, vocab]."""
        binding = self._binding
        version = self.slot_table.version
        if self._bound_version != version:
            for stack in self.store.stacks.values():
                binding.bind_cpu_input(stack.name, stack.array)
            self._bound_version = version
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input(SLOTS_INPUT, np.asarray(slots, dtype=np.int64))
        binding.bind_output("logits", "cpu")
        for (past, present), buffer in zip(self._kv_names, self.kv):
            value = self._ort.OrtValue.ortvalue_from_numpy(buffer[rows])  # a view: no copy
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # same buffer: GroupQueryAttention writes in place
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        binding.clear_binding_outputs()  # the binding must not keep a prefill's [B, L, vocab] logits alive
        return logits

    def _slot(self, adapter: str | None) -> int:
        try:
            return self.slot_table.slot_of(adapter)
        except KeyError:
            raise RuntimeError(f"adapter {adapter!r} is not resident") from None

    def step(self) -> None:
        """Cancelled rows leave; admitted prompts are prefilled together (token budget); one
        decode forward over every running row."""
        self._drop_cancelled()
        self._prefill_admitted()
        if self.running:
            self.decode()
        self.steps += 1

    def prefill(self, request: EngineRequest) -> None:
        """The pre-``step`` entry point: prefill this request now (alone) and join the batch."""
        self._prefill_batch([request])

    def _prefill_admitted(self) -> int:
        """Prefill admitted requests in one forward: as many as fit the token budget (padded
        tokens count) and free rows; at least one."""
        batch: list[EngineRequest] = []
        longest = 0
        rows = 0  # buffer rows the batch takes (its requests and their forks)
        while self.admitted:
            request = self.admitted[0]
            if request.cancelled:
                self.admitted.popleft().emit(None, request.cancel_reason)
                promoted = promote_forks(request)  # cancelling one choice spares the others
                if promoted is not None:
                    self.admitted.appendleft(promoted)
                continue
            if len(self.running) + rows + request.rows > self.max_batch_size:
                break
            width = max(longest, len(request.prompt_ids))
            if batch and width * (len(batch) + 1) > self.max_num_batched_tokens:
                break
            batch.append(self.admitted.popleft())
            rows += request.rows
            longest = width
        if batch:
            self._prefill_batch(batch)
        return len(batch)

    def _prefill_batch(self, requests: list[EngineRequest]) -> None:
        """Prompts right-padded to the longest into buffer rows [n, n+k): the graph treats a
        forward with no earlier tokens (mask width = input length) as a first prompt, so each
        row attends only to its own real tokens and its K/V lands at positions [0, len)."""
        first = len(self.running)
        try:
            slots = [self._slot(r.adapter) for r in requests]
        except RuntimeError:
            good = []
            for request in requests:  # an adapter unloaded meanwhile fails that request only
                try:
                    self._slot(request.adapter)
                    good.append(request)
                except RuntimeError:
                    log.warning("request %s: adapter %r is not resident", request.request_id, request.adapter)
                    for member in (request, *request.forks):
                        member.emit(None, FINISH_ERROR)
            if good:
                self._prefill_batch(good)
            return
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        ids = np.zeros((len(requests), width), np.int64)  # [k, L]
        mask = np.zeros((len(requests), width), np.int64)
        for b, request in enumerate(requests):
            ids[b, : lengths[b]] = request.prompt_ids
            mask[b, : lengths[b]] = 1
        try:
            logits = self._run(slice(first, first + len(requests)), ids, mask, slots)  # [k, L, vocab]
        except Exception:
            log.exception("prefill of %d prompts failed; ending those requests", len(requests))
            for request in requests:
                for member in (request, *request.forks):
                    member.emit(None, FINISH_ERROR)
            return
        last = np.ascontiguousarray(logits[np.arange(len(requests)), np.asarray(lengths) - 1], dtype=np.float32)  # [k, vocab]
        rows: list[_Row] = []
        sample_index: list[int] = []  # the prompt (batch index) each new row continues
        for b, (request, n) in enumerate(zip(requests, lengths)):
            if request.prompt_logprobs is not None:  # position p's logits score prompt token p+1
                scored = self._prompt_logprobs(request.prompt_ids, torch.from_numpy(np.ascontiguousarray(logits[b, : n - 1], dtype=np.float32)), 0, request.prompt_logprobs)
                self._deliver_prompt_logprobs(request, [None, *scored])
            if request.params.max_tokens == 0:  # scoring only
                request.emit(None, FINISH_LENGTH)
            else:
                rows.append(_Row(request=request, generator=make_generator(request.params), length=n, stop_ids=self.stop_ids_for(request.params)))
                sample_index.append(b)
            for fork in request.forks:  # n > 1: a row per fork, starting from this prompt's K/V
                if fork.cancelled:
                    fork.emit(None, fork.cancel_reason)
                    continue
                rows.append(_Row(request=fork, generator=make_generator(fork.params), length=n, stop_ids=self.stop_ids_for(fork.params)))
                sample_index.append(b)
        if not rows:
            return
        if sample_index != list(range(len(requests))):
            # the new rows' K/V: rows [first, first + len(rows)) get their prompt's (a copy is
            # taken first, so a source overwritten by an earlier destination is still intact)
            dst = first + np.arange(len(rows))
            src = first + np.asarray(sample_index)
            for buffer in self.kv:
                buffer[dst, :, :width] = buffer[src, :, :width]
        for row in rows:  # joined before sampling: a row that ends at once leaves through _keep_rows
            self._join(row)
        self._sample_and_accept(rows, torch.from_numpy(last[sample_index]))

    def decode(self) -> None:
        """One token for every running row, all adapters, one forward, K/V written in place."""
        self._drop_cancelled()
        if not self.running:
            return
        n = len(self.running)
        width = max(row.length for row in self.running) + 1
        mask = np.zeros((n, width), np.int64)  # row sums = each row's length + the new token
        for b, row in enumerate(self.running):
            mask[b, : row.length + 1] = 1
        ids = np.asarray([[row.last_token] for row in self.running], dtype=np.int64)  # [n, 1]
        logits = self._run(slice(0, n), ids, mask, [self._slot(r.request.adapter) for r in self.running])  # [n, 1, vocab]
        for row in self.running:
            row.length += 1
        self._sample_and_accept(list(self.running), torch.from_numpy(np.ascontiguousarray(logits[:, -1], dtype=np.float32)))

    def _keep_rows(self, keep: list[int]) -> None:
        """Rows not in ``keep`` leave; the last rows move into the holes (one row's K/V copied
        per hole, up to its length), so rows [0, n) stay dense for the next forward."""
        n_keep = len(keep)
        if n_keep == len(self.running):
            return
        kept = set(keep)
        holes = [i for i in range(n_keep) if i not in kept]  # free rows below the new end
        movers = [i for i in keep if i >= n_keep]  # kept rows above it
        running = list(self.running)
        for hole, src in zip(holes, movers):
            length = running[src].length
            for buffer in self.kv:
                buffer[hole, :, :length] = buffer[src, :, :length]
            running[hole] = running[src]
        self.running = running[:n_keep]

    def _forget_rows(self, keep: list[int]) -> None:
        """Nothing to forget: a left row's buffer row is overwritten by the next row there."""

    def fail_all(self, reason: str = FINISH_ERROR) -> None:
        super().fail_all(reason)
        self._binding.clear_binding_inputs()
        self._bound_version = -1
