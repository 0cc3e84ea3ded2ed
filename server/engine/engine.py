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
from typing import Mapping, Sequence

import torch

from loraplex.server.engine.batch import KvBatch
from loraplex.server.engine.lora import LoraBatchContext, inject_multi_lora
from loraplex.server.engine.slots import LoraSlots
from loraplex.server.engine.rows import (  # noqa: F401  (re-exported: the scheduler and service import them from here)
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineRequest,
    Running,
    RowEngine,
)
from loraplex.server.engine.sampling import make_generator, sample_row

log = logging.getLogger("loraplex.engine")


class Engine(RowEngine):
    """One base model, many adapters, one running batch (torch)."""

    def __init__(
        self,
        model,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 16,
        max_model_len: int = 2048,
        device: str = "cpu",
    ) -> None:
        super().__init__(eos_token_ids=eos_token_ids, max_batch_size=max_batch_size, max_model_len=max_model_len)
        self.model = model
        self.device = torch.device(device)
        self.context = LoraBatchContext()
        self.layers = inject_multi_lora(model, self.context)
        param = next(p for p in model.parameters() if p.is_floating_point())
        lora_dtype = param.dtype if param.dtype in (torch.float16, torch.bfloat16) else torch.float32
        self.slot_table = LoraSlots(self.layers, self.context, dtype=lora_dtype, device=self.device)
        self.batch: KvBatch | None = None
        self._slot_key: tuple[int, ...] | None = None

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
        running = Running(
            request=request,
            generator=make_generator(request.params),
            length=length,
            stop_ids=self.stop_ids_for(request.params),
        )
        token = sample_row(out.logits[0, -1], request.params, running.generator)
        row = KvBatch.from_cache(
            out.past_key_values,
            torch.ones(1, length, dtype=torch.long, device=self.device),
            torch.tensor([length], dtype=torch.long, device=self.device),
        )
        if self._accept(running, token):
            self.batch = row if self.batch is None else self.batch.merge(row)
            self._join(running)

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
            if self._advance(running, logits[i]):
                keep.append(i)
        self._keep_rows(keep)

    def _forget_rows(self, keep: list[int]) -> None:
        self.batch = self.batch.select(keep) if keep and self.batch is not None else None
