"""The engine: owns the model and the running batch; ``step()`` admits new sequences (prefill)
and advances every running one by one token in a single mixed-adapter forward.

Continuous batching: a sequence joins at the next step and leaves the moment it finishes; its
KV rows are dropped and the batch is re-packed. Everything here runs on ONE thread (the
scheduler's); other threads talk to it only through the scheduler. The engine knows token ids,
never text: detokenization and stop strings belong to the service layer, which cancels a
request when a stop string appears.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from loraplex.server.engine.batch import KvBatch
from loraplex.server.engine.lora import LoraBatchContext, LoraSlots, inject_multi_lora
from loraplex.server.engine.sampling import SamplingParams, make_generator, sample_row

log = logging.getLogger("loraplex.engine")

#: finish reasons, as the OpenAI API spells them (plus "cancelled" and "abort" for our own ends)
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


@dataclass
class EngineRequest:
    """A tokenized request; ``emit(token_id, finish_reason)`` is called from the engine thread."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[int | None, str | None], None]
    cancelled: bool = False
    cancel_reason: str = FINISH_CANCELLED


@dataclass
class _Running:
    request: EngineRequest
    generator: torch.Generator | None
    generated: int = 0
    last_token: int = 0
    length: int = 0  # prompt + generated tokens in the cache
    stop_ids: frozenset[int] = field(default_factory=frozenset)


class Engine:
    """One base model, many adapters, one running batch."""

    def __init__(
        self,
        model,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 16,
        max_model_len: int = 2048,
        device: str = "cpu",
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.context = LoraBatchContext()
        self.layers = inject_multi_lora(model, self.context)
        param = next(p for p in model.parameters() if p.is_floating_point())
        lora_dtype = param.dtype if param.dtype in (torch.float16, torch.bfloat16) else torch.float32
        self.slot_table = LoraSlots(self.layers, self.context, dtype=lora_dtype, device=self.device)
        self.batch: KvBatch | None = None
        self.running: list[_Running] = []
        self.peak_batch_size = 0
        self._slot_key: tuple[int, ...] | None = None
        # Test hook (never set in production): requests whose id contains this string fail at
        # their third token, to prove a fault in one request leaves the others running.
        self._fault_marker = os.environ.get("LORAPLEX_TEST_FAIL_REQUEST_ID") or None

    # ------------------------------------------------------------- adapters
    @property
    def resident_adapters(self) -> list[str]:
        return list(self.slot_table.names)

    def add_adapter(self, name: str, modules: Mapping[str, object]) -> None:
        """Write an adapter into a free slot (replacing a same-named one not in use)."""
        if name in self.slot_table.slots:
            self._refuse_if_busy(name)
        self.slot_table.add(name, modules)
        self._slot_key = None

    def add_adapter_in_place(self, name: str, modules: Mapping[str, object]) -> bool:
        """From any thread: write a new adapter into a free slot that fits without pausing the
        engine; False when stacks must grow (then use ``add_adapter`` on the engine thread)."""
        return self.slot_table.try_add_in_place(name, modules)

    def remove_adapter(self, name: str) -> None:
        self._drop_cancelled()  # rows already finished by the service (stop string, disconnect) go first
        self._refuse_if_busy(name)
        self.slot_table.remove(name)
        self._slot_key = None

    def _refuse_if_busy(self, name: str) -> None:
        if any(r.request.adapter == name for r in self.running):
            raise RuntimeError(f"adapter {name!r} is still in use by running requests")

    def set_adapters(self, adapters: Sequence[tuple[str, Mapping[str, object]]]) -> None:
        """Make exactly these adapters resident (convenience over add/remove)."""
        wanted = {name for name, _ in adapters}
        for name in [n for n in self.slot_table.slots if n not in wanted]:
            self.remove_adapter(name)
        for name, modules in adapters:
            if name not in self.slot_table.slots:
                self.add_adapter(name, modules)

    def _use_slots(self, slots: tuple[int, ...]) -> None:
        if slots != self._slot_key:
            self.context.set_slots(slots)
            self.context.slots = self.context.slots.to(self.device)
            self._slot_key = slots

    # ---------------------------------------------------------------- state
    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_capacity(self) -> bool:
        return len(self.running) < self.max_batch_size

    def kv_usage(self) -> float:
        """Fraction of the batch's token capacity in use (rows x max_model_len)."""
        used = sum(r.length for r in self.running)
        return used / float(self.max_batch_size * self.max_model_len)

    # ----------------------------------------------------------------- steps
    @torch.inference_mode()
    def prefill(self, request: EngineRequest) -> None:
        """Run the prompt, emit the first token, and join the running batch (unless finished)."""
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)  # [1, L]
        length = ids.shape[1]
        self._use_slots((self.slot_table.slot_of(request.adapter),))
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(length, device=self.device)[None],
            past_key_values=KvBatch.empty_cache(),
            use_cache=True,
        )
        running = _Running(
            request=request,
            generator=make_generator(request.params),
            length=length,
            stop_ids=frozenset(request.params.stop_token_ids) | (frozenset() if request.params.ignore_eos else self.eos_token_ids),
        )
        token = sample_row(out.logits[0, -1], request.params, running.generator)
        row = KvBatch.from_cache(
            out.past_key_values,
            torch.ones(1, length, dtype=torch.long, device=self.device),
            torch.tensor([length], dtype=torch.long, device=self.device),
        )
        if self._accept(running, token):
            self.batch = row if self.batch is None else self.batch.merge(row)
            self.running.append(running)
            self.peak_batch_size = max(self.peak_batch_size, len(self.running))

    def _accept(self, running: _Running, token: int) -> bool:
        """Record a sampled token; emit it (and a finish if it ends the sequence). True = continue."""
        request = running.request
        running.generated += 1
        running.last_token = token
        if token in running.stop_ids:
            request.emit(None, FINISH_STOP)
            return False
        request.emit(token, None)
        if running.generated >= request.params.max_tokens or running.length + 1 >= self.max_model_len:
            request.emit(None, FINISH_LENGTH)
            return False
        return True

    @torch.inference_mode()
    def decode(self) -> None:
        """One token for every running sequence, in one forward pass."""
        self._drop_cancelled()
        if not self.running:
            return
        batch = self.batch
        slots = tuple(self.slot_table.slot_of(r.request.adapter) for r in self.running)
        self._use_slots(slots)
        tokens = torch.tensor([[r.last_token] for r in self.running], dtype=torch.long, device=self.device)  # [B, 1]
        mask = torch.cat([batch.mask, torch.ones(batch.size, 1, dtype=torch.long, device=self.device)], dim=1)  # [B, T+1]
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=batch.positions[:, None],
            past_key_values=batch.to_cache(),
            use_cache=True,
        )
        self.batch = KvBatch.from_cache(out.past_key_values, mask, batch.positions + 1)
        logits = out.logits[:, -1, :]  # [B, vocab]
        keep: list[int] = []
        for i, running in enumerate(self.running):
            running.length += 1
            try:
                if self._fault_marker and self._fault_marker in running.request.request_id and running.generated >= 2:
                    raise RuntimeError("injected fault (LORAPLEX_TEST_FAIL_REQUEST_ID)")
                token = sample_row(logits[i], running.request.params, running.generator)
            except Exception:
                # one row's failure ends that request only; the batch goes on
                log.exception("request %s failed while sampling; ending it", running.request.request_id)
                running.request.emit(None, FINISH_ERROR)
                continue
            if self._accept(running, token):
                keep.append(i)
        self._keep_rows(keep)

    def _drop_cancelled(self) -> None:
        keep = []
        for i, running in enumerate(self.running):
            if running.request.cancelled:
                running.request.emit(None, running.request.cancel_reason)
            else:
                keep.append(i)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        self.batch = self.batch.select(keep) if keep else None

    def fail_all(self, reason: str = FINISH_ERROR) -> None:
        """End every running sequence (after an engine error); the engine stays usable."""
        for running in self.running:
            running.request.emit(None, reason)
        self.running = []
        self.batch = None
