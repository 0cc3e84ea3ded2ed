"""The torch engine: owns the model, the in-place KV cache and the adapter slots, and runs
token-budgeted steps that mix prefill chunks with decode rows in one forward.

A step takes one token from every decoding row, then fills the rest of the token budget
(``max_num_batched_tokens``) with prompt chunks of admitted rows, oldest first: several prompts
are prefilled together, a long prompt is split over several steps, and a burst of arrivals never
stops the running streams. All of the step's tokens go through the model flattened, ``[1, N]``,
each with its own position, KV slot (``kvcache.py``) and adapter slot (``lora.py``); logits are
computed only for the rows that sample, and sampling is one batched pass (``sampling.py``).

Everything here runs on ONE thread (the scheduler's); only ``try_add_adapter_in_place`` may run
on another. The engine knows token ids, never text: detokenization and stop strings belong to
the service layer, which cancels a request when a stop string appears.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from loraplex.server.engine.kvcache import ATTENTION_NAME, KvCache, register_attention
from loraplex.server.engine.lora import LoraBatchContext, inject_multi_lora
from loraplex.server.engine.protocol import EngineStats
from loraplex.server.engine.rows import (  # noqa: F401  (re-exported: the scheduler and service import them from here)
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineRequest,
    RowEngine,
    Running,
)
from loraplex.server.engine.sampling import make_generator
from loraplex.server.engine.slots import LoraSlots

log = logging.getLogger("loraplex.engine")


@dataclass(frozen=True)
class TorchAdapterPayload:
    """A validated adapter as the torch engine installs it: per-module LoRA weights (objects with
    ``.a [r, in]``, ``.b [out, r]``, ``.scale``, ``.rank``, as the registry's validation makes)."""

    name: str
    modules: Mapping[str, object]
    kind: str = "torch"


def _check_payload(payload) -> TorchAdapterPayload:
    kind = getattr(payload, "kind", None)
    if kind != "torch":
        raise TypeError(f"the torch engine installs 'torch' adapter payloads, got kind {kind!r} for {getattr(payload, 'name', payload)!r}")
    if not payload.modules:
        # an adapter validated for another backend has no per-module weights: installing it would
        # register an empty slot that silently serves base output
        raise ValueError(f"adapter {payload.name!r} has no LoRA weights for the torch engine (empty modules); refusing to install it")
    return payload


@dataclass
class _Row(Running):
    """A sequence in the engine: prefilling while ``prefilled < len(prompt)``, then decoding."""

    kv_slot: int = -1
    lora_slot: int = 0
    prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.prefilled >= len(self.request.prompt_ids)


def resolve_lora_dtype(model) -> torch.dtype:
    """LoRA weights and the KV cache at the model's compute dtype (fp32 for quantized fp32 bases)."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    return param.dtype if param.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


class Engine(RowEngine):
    """One base model, many adapters, one running batch (torch, CPU or CUDA)."""

    payload_kind = "torch"

    def __init__(
        self,
        model,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 16,
        max_model_len: int = 2048,
        device: str = "cpu",
        max_num_batched_tokens: int = 512,
    ) -> None:
        super().__init__(eos_token_ids=eos_token_ids, max_batch_size=max_batch_size, max_model_len=max_model_len)
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.model = model
        self.device = torch.device(device)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.dtype = resolve_lora_dtype(model)
        self.context = LoraBatchContext()
        self.layers = inject_multi_lora(model, self.context, dtype=self.dtype, device=self.device)
        self.slot_table = LoraSlots(self.layers, self.context, dtype=self.dtype, device=self.device)
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.kv = KvCache(
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=self.dtype,
            device=self.device,
            max_rows=max_batch_size,
            max_len=max_model_len,
        )
        register_attention()
        model.config._attn_implementation = ATTENTION_NAME
        self.running: list[_Row] = []

    # ------------------------------------------------------------- adapters
    @property
    def resident_adapters(self) -> list[str]:
        return list(self.slot_table.names)

    def add_adapter(self, payload: TorchAdapterPayload, modules: Mapping[str, object] | None = None) -> None:
        """Engine thread: write an adapter into a free slot (replacing a same-named one not in
        use). ``add_adapter(name, modules)`` (the pre-protocol form) is still accepted."""
        if modules is not None or isinstance(payload, str):
            payload = TorchAdapterPayload(name=payload, modules=modules or {})
        payload = _check_payload(payload)
        if payload.name in self.slot_table.slots:
            self._drop_cancelled()
            self._refuse_if_busy(payload.name)
        self.slot_table.add(payload.name, payload.modules)

    def try_add_adapter_in_place(self, payload: TorchAdapterPayload) -> bool:
        """Any thread: write a new adapter into a free slot; every slot holds its own tensors, so
        this succeeds unless the name is already resident (then ``add_adapter`` replaces it)."""
        payload = _check_payload(payload)
        return self.slot_table.try_add_in_place(payload.name, payload.modules)

    def add_adapter_in_place(self, name: str, modules: Mapping[str, object]) -> bool:
        """The pre-protocol form of ``try_add_adapter_in_place``."""
        return self.try_add_adapter_in_place(TorchAdapterPayload(name=name, modules=modules))

    def remove_adapter(self, name: str) -> None:
        self._drop_cancelled()  # rows already finished by the service (stop string, disconnect) go first
        self._refuse_if_busy(name)
        self.slot_table.remove(name)

    def set_adapters(self, adapters: Sequence[tuple[str, Mapping[str, object]]]) -> None:
        """Make exactly these adapters resident (convenience over add/remove)."""
        wanted = {name for name, _ in adapters}
        for name in [n for n in self.slot_table.slots if n not in wanted]:
            self.remove_adapter(name)
        for name, modules in adapters:
            if name not in self.slot_table.slots:
                self.add_adapter(TorchAdapterPayload(name=name, modules=modules))

    @property
    def lora_bytes(self) -> int:
        """Bytes held by resident adapters' weights (not counting the per-step concatenations)."""
        return sum(layer.nbytes for layer in self.layers.values())

    # ---------------------------------------------------------------- state
    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_capacity(self) -> bool:
        return len(self.running) < self.max_batch_size

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.running),
            kv_used_tokens=self.kv.used_tokens,
            kv_capacity_tokens=self.kv.capacity_tokens,
            peak_batch_size=self.peak_batch_size,
            steps=self.steps,
        )

    def kv_usage(self) -> float:
        return self.stats().kv_usage

    # ----------------------------------------------------------------- steps
    def admit(self, request: EngineRequest) -> None:
        """Take a request; its prompt is prefilled within the next steps' token budget. Raises
        (nothing admitted) for an empty or too long prompt, an unknown adapter, or no free row."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError(f"request {request.request_id}: empty prompt")
        if n >= self.max_model_len:
            raise ValueError(f"request {request.request_id}: prompt of {n} tokens leaves no room under max_model_len {self.max_model_len}")
        if not self.has_capacity():
            raise RuntimeError(f"engine full: {self.max_batch_size} sequences running (max_batch_size)")
        lora_slot = self.slot_table.slot_of(request.adapter)  # KeyError: not resident
        row = _Row(
            request=request,
            generator=make_generator(request.params),
            stop_ids=self.stop_ids_for(request.params),
            kv_slot=self.kv.allocate(),
            lora_slot=lora_slot,
        )
        self._join(row)

    def prefill(self, request: EngineRequest) -> None:
        """Admit and step until the request's prompt is in the cache (tests and tools)."""
        self.admit(request)
        row = self.running[-1]
        while row in self.running and not row.decoding:
            self.step()

    def decode(self) -> None:
        """One step (kept for callers of the pre-protocol API)."""
        self.step()

    def _plan_step(self) -> tuple[list[_Row], list[tuple[_Row, int]]]:
        decode = [r for r in self.running if r.decoding]
        budget = max(0, self.max_num_batched_tokens - len(decode))
        chunks: list[tuple[_Row, int]] = []
        for row in self.running:
            if budget == 0:
                break
            if not row.decoding:
                n = min(budget, len(row.request.prompt_ids) - row.prefilled)
                chunks.append((row, n))
                budget -= n
        return decode, chunks

    @torch.inference_mode()
    def step(self) -> None:
        """One forward: a token for every decoding row plus prompt chunks within the budget."""
        self._drop_cancelled()
        self.steps += 1
        if not self.running:
            return
        decode, chunks = self._plan_step()
        token_ids: list[int] = [r.last_token for r in decode]
        lora_slots: list[int] = [r.lora_slot for r in decode]
        for row, n in chunks:
            token_ids.extend(row.request.prompt_ids[row.prefilled : row.prefilled + n])
            lora_slots.extend([row.lora_slot] * n)
        plan = self.kv.plan([r.kv_slot for r in decode], [(row.kv_slot, row.prefilled, n) for row, n in chunks])
        self.context.set_token_slots(lora_slots, self.device)
        # rows that sample this step: every decoding row, and rows whose prompt ends in this chunk
        samplers: list[_Row] = list(decode)
        keep_index: list[int] = list(range(len(decode)))
        for chunk, (row, n) in zip(plan.chunks, chunks):
            row.prefilled += n
            row.length = row.prefilled
            if row.decoding:
                samplers.append(row)
                keep_index.append(chunk.token_start + n - 1)
        for row in decode:
            row.length += 1
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, N]
        out = self.model(
            input_ids=ids,
            position_ids=plan.token_pos[None],  # [1, N]
            use_cache=False,
            loraplex_plan=plan,
            logits_to_keep=torch.tensor(keep_index, dtype=torch.long, device=self.device),
        )
        if not samplers:
            return
        logits = out.logits[0]  # [R, vocab]
        self._sample_and_accept(samplers, logits)

    def _drop_cancelled(self) -> None:
        keep = []
        for i, row in enumerate(self.running):
            if row.request.cancelled:
                row.request.emit(None, row.request.cancel_reason)
            else:
                keep.append(i)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self.running):
            return
        kept = set(keep)
        for i, row in enumerate(self.running):
            if i not in kept:
                self.kv.release(row.kv_slot)
        self.running = [self.running[i] for i in keep]

    def fail_all(self, reason: str = FINISH_ERROR) -> None:
        for row in self.running:
            row.request.emit(None, reason)
        self.running = []
        self.kv.release_all()
