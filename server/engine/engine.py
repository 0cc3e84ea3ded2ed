"""The torch engine: owns the model, the in-place KV cache and the adapter slots, and runs
token-budgeted steps that mix prefill chunks with decode rows in one forward.

A step takes one token from every decoding row, then fills the rest of the token budget
(``max_num_batched_tokens``) with prompt chunks of admitted rows, oldest first: several prompts
are prefilled together, a long prompt is split over several steps, and a burst of arrivals never
stops the running streams. All of the step's tokens go through the model flattened, ``[1, N]``,
each with its own position, KV slot (``kvcache.py``) and adapter slot (``lora.py``), through
the lean Llama forward (``llama_forward.py``, with int4 GEMMs for small steps on an int4 base,
``int4.py``) where the model allows it, else transformers' forward; logits are computed only for
the rows that sample, and sampling is one batched pass (``sampling.py``).

Per-request features (all of ``rows.ALL_FEATURES``):
- prompt logprobs (echo): a row that asks keeps the logits of every position of its prefill
  chunks (at most ``max_prompt_logprob_tokens`` positions per step, bounding the [P, vocab]
  logits), turned into ``TokenLogprob``s and delivered once through ``on_prompt_logprobs``
  before the first token; ``max_tokens == 0`` scores the prompt only.
- forks (n > 1): the primary's row prefills the prompt once; each fork holds a row from
  admission, waits, and when the prompt is complete gets a copy of its KV
  (``KvCache.copy_prefix``) and samples from the same last-position logits with its own
  generator, parameters and constraint. A primary cancelled while its forks wait keeps
  prefilling for them (detached: it emits nothing more) and leaves once they have their copy.
- weighted mixes: a row's tokens carry ``((slot, weight), ...)`` to ``LoraBatchContext``.

Everything here runs on ONE thread (the scheduler's); only ``try_add_adapter_in_place`` may run
on another. The engine knows token ids, never text: detokenization and stop strings belong to
the service layer, which cancels a request when a stop string appears.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from loraplex.server.engine import attention_kernel
from loraplex.server.engine.kvcache import ATTENTION_NAME, KvCache, register_attention
from loraplex.server.engine.llama_forward import LlamaStepForward, why_not_supported
from loraplex.server.engine.lora import LoraBatchContext, inject_multi_lora
from loraplex.server.engine.protocol import EngineStats
from loraplex.server.engine.rows import (  # noqa: F401  (re-exported: the scheduler and service import them from here)
    ALL_FEATURES,
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineRequest,
    RowEngine,
    Running,
    TokenLogprob,
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
    """A sequence in the engine: prefilling while ``prefilled < len(prompt)``, then decoding; a
    fork waits (``source`` set) until its primary's prompt is in the cache."""

    kv_slot: int = -1
    lora_slot: object = 0  # an adapter slot (0 = base) or a mix ((slot, weight), ...)
    prefilled: int = 0
    source: "_Row | None" = None  # a fork: the primary row whose prompt it waits for
    forks: list = field(default_factory=list)  # a primary: its fork rows (waiting until the copy)
    detached: bool = False  # a cancelled primary still prefilling for its forks (emits nothing)
    left: bool = False  # no longer in the batch
    prompt_lp_k: int | None = None  # the prompt's logprobs are collected (top k) for the group
    prompt_lps: list = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.source is None and self.prefilled >= len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.source is None and self.prefilled < len(self.request.prompt_ids)

    def live_forks(self) -> list["_Row"]:
        return [f for f in self.forks if not f.left and not f.request.cancelled]


def resolve_lora_dtype(model) -> torch.dtype:
    """LoRA weights and the KV cache at the model's compute dtype (fp32 for quantized fp32 bases)."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    return param.dtype if param.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


class Engine(RowEngine):
    """One base model, many adapters, one running batch (torch, CPU or CUDA)."""

    payload_kind = "torch"
    features = ALL_FEATURES

    def __init__(
        self,
        model,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 16,
        max_model_len: int = 2048,
        device: str = "cpu",
        max_num_batched_tokens: int = 512,
        max_prompt_logprob_tokens: int = 128,
        lean_forward: bool = True,
        int4_decode_rows: int = 8,
        compile_decode: bool = False,
        decode_row: str = "kernel",
        lora_expand: str = "kernel",
        decode_attention: str = "kernel",
    ) -> None:
        super().__init__(eos_token_ids=eos_token_ids, max_batch_size=max_batch_size, max_model_len=max_model_len)
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.model = model
        self.device = torch.device(device)
        self.max_num_batched_tokens = max_num_batched_tokens
        # prompt positions whose logits a step keeps for prompt logprobs: [P, vocab] logits at
        # the model's dtype plus an fp32 log_softmax (49152 wide: 128 positions ~ 25 MB fp32)
        self.max_prompt_logprob_tokens = max(1, max_prompt_logprob_tokens)
        self.tokens_forwarded = 0  # every token through the model (tests count prefill work)
        self.dtype = resolve_lora_dtype(model)
        self.context = LoraBatchContext()
        self.layers = inject_multi_lora(model, self.context, dtype=self.dtype, device=self.device)
        self.slot_table = LoraSlots(self.layers, self.context, dtype=self.dtype, device=self.device)
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.attention_reason = self._decode_attention(decode_attention, heads, kv_heads, head_dim)
        self.kv = KvCache(
            num_layers=config.num_hidden_layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            device=self.device,
            max_rows=max_batch_size,
            max_len=max_model_len,
            min_rows=2 if compile_decode else 1,  # see KvCache: the compiled one-row step's dynamic row count
            decode_kernel=self.attention_reason.startswith("C kernel"),
        )
        register_attention()
        model.config._attn_implementation = ATTENTION_NAME
        # the lean Llama forward (llama_forward.py) where the model allows it, else transformers'
        self.lean: LlamaStepForward | None = None
        self.forward_path = "transformers"
        reason = why_not_supported(model, self.dtype) if lean_forward else "turned off (lean_forward=False)"
        if reason is None:
            self.lean = LlamaStepForward(model, max_len=max_model_len, dtype=self.dtype, device=self.device, int4_rows=int4_decode_rows, compile_decode=compile_decode, decode_row=decode_row, lora_expand=lora_expand)
            self.forward_path = "lean"
            lean, lock = self.lean, self.slot_table.lock
            self.slot_table.on_change.append(lambda: lean.schedule_refresh(lock))  # also drops the compiled step's cached inputs
            log.info("engine forward: lean Llama; int4 decode GEMMs %s; one-row decode step %s; compiled one-row decode %s; mixed-step LoRA expand %s; element-wise steps %s", self.lean.int4_reason, self.lean.row_reason, self.lean.compile_reason, self.lean.expand_reason, self.lean.pointwise_reason)
        else:
            log.info("engine forward: transformers' (%s)", reason)
        log.info("engine decode attention: %s", self.attention_reason)
        self.running: list[_Row] = []

    def _decode_attention(self, choice: str, heads: int, kv_heads: int, head_dim: int) -> str:
        """Which decode attention runs, and why (the startup log and the backend description)."""
        if choice not in ("kernel", "sdpa"):
            raise ValueError(f"decode_attention must be 'kernel' or 'sdpa', got {choice!r}")
        if choice == "sdpa":
            return "SDPA (--decode-attention sdpa)"
        if self.dtype != torch.bfloat16 or self.device.type != "cpu":
            return f"SDPA (the C kernel runs bf16 on CPU; this engine is {str(self.dtype).replace('torch.', '')} on {self.device.type})"
        if not attention_kernel.shape_fits(heads, kv_heads, head_dim):
            return f"SDPA (the C kernel takes head sizes that are multiples of 32 up to {attention_kernel.MAX_HEAD_DIM} and up to {attention_kernel.MAX_GROUP} query heads per kv head; this model has {heads} heads of {head_dim} over {kv_heads})"
        if not attention_kernel.available():
            return f"SDPA ({attention_kernel.why_not()})"
        return "C kernel (bf16, each token over its own row and length)"

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

    def has_capacity(self, rows: int = 1) -> bool:
        return len(self.running) + rows <= self.max_batch_size

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
        """Take a request (and its forks); its prompt is prefilled within the next steps' token
        budget. Raises (nothing admitted) for an empty or too long prompt, an unknown adapter,
        a feature refused by ``check_request``, or too few free rows."""
        self.check_request(request)
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError(f"request {request.request_id}: empty prompt")
        if n >= self.max_model_len:
            raise ValueError(f"request {request.request_id}: prompt of {n} tokens leaves no room under max_model_len {self.max_model_len}")
        if not self.has_capacity(request.rows):
            raise RuntimeError(f"engine full: {len(self.running)} of {self.max_batch_size} rows in use (max_batch_size), {request.rows} needed")
        if request.mix:
            lora_slot: object = tuple((self.slot_table.slot_of(name), float(weight)) for name, weight in request.mix)  # KeyError: not resident
        else:
            lora_slot = self.slot_table.slot_of(request.adapter)  # KeyError: not resident
        slots: list[int] = []
        try:
            for _ in range(request.rows):
                slots.append(self.kv.allocate())
        except Exception:
            for slot in slots:
                self.kv.release(slot)
            raise
        group = (request, *request.forks)
        wanted = [r.prompt_logprobs for r in group if r.prompt_logprobs is not None]
        primary = _Row(
            request=request,
            generator=make_generator(request.params),
            stop_ids=self.stop_ids_for(request.params),
            kv_slot=slots[0],
            lora_slot=lora_slot,
            prompt_lp_k=max(wanted) if wanted else None,
        )
        for fork, slot in zip(request.forks, slots[1:]):
            primary.forks.append(_Row(request=fork, generator=make_generator(fork.params), stop_ids=self.stop_ids_for(fork.params), kv_slot=slot, lora_slot=lora_slot, source=primary))
        self._join(primary)
        for row in primary.forks:
            self._join(row)

    def prefill(self, request: EngineRequest) -> None:
        """Admit and step until the request's prompt is in the cache (tests and tools)."""
        self.admit(request)
        row = next(r for r in self.running if r.request is request)
        while row in self.running and not row.decoding:
            self.step()

    def decode(self) -> None:
        """One step (kept for callers of the pre-protocol API)."""
        self.step()

    def _plan_step(self) -> tuple[list[_Row], list[tuple[_Row, int]]]:
        decode = [r for r in self.running if r.decoding]
        budget = max(0, self.max_num_batched_tokens - len(decode))
        logprob_budget = self.max_prompt_logprob_tokens
        chunks: list[tuple[_Row, int]] = []
        for row in self.running:
            if budget == 0:
                break
            if row.prefilling:
                n = min(budget, len(row.request.prompt_ids) - row.prefilled)
                if row.prompt_lp_k is not None:
                    n = min(n, logprob_budget)
                    logprob_budget -= n
                if n:
                    chunks.append((row, n))
                    budget -= n
        return decode, chunks

    @torch.inference_mode()
    def step(self) -> None:
        """One forward: a token for every decoding row plus prompt chunks within the budget."""
        self._drop_cancelled()
        self.steps += 1
        if not any(r.source is None for r in self.running):
            return
        decode, chunks = self._plan_step()
        token_ids: list[int] = [r.last_token for r in decode]
        lora_slots: list = [r.lora_slot for r in decode]
        for row, n in chunks:
            token_ids.extend(row.request.prompt_ids[row.prefilled : row.prefilled + n])
            lora_slots.extend([row.lora_slot] * n)
        plan = self.kv.plan([r.kv_slot for r in decode], [(row.kv_slot, row.prefilled, n) for row, n in chunks])
        self.context.set_token_slots(lora_slots, self.device)
        # logits kept: one per decoding row, every position of chunks collecting prompt
        # logprobs, the last position of the others' final chunk
        keep_index: list[int] = list(range(len(decode)))
        chunk_keep: list[tuple[_Row, int, int, int]] = []  # (row, chunk start position, first kept logit, kept count)
        for chunk, (row, n) in zip(plan.chunks, chunks):
            start = row.prefilled
            row.prefilled += n
            row.length = row.prefilled
            if row.prompt_lp_k is not None:
                chunk_keep.append((row, start, len(keep_index), n))
                keep_index.extend(range(chunk.token_start, chunk.token_start + n))
            elif row.decoding:
                chunk_keep.append((row, start, len(keep_index), 1))
                keep_index.append(chunk.token_start + n - 1)
        for row in decode:
            row.length += 1
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)  # [N]
        keep = torch.tensor(keep_index, dtype=torch.long, device=self.device)  # [K]
        self.tokens_forwarded += len(token_ids)
        if self.lean is not None:
            logits = self.lean(ids, plan.token_pos, plan, keep)  # [K, vocab]
        else:
            out = self.model(
                input_ids=ids[None],  # [1, N]
                position_ids=plan.token_pos[None],  # [1, N]
                use_cache=False,
                loraplex_plan=plan,
                logits_to_keep=keep,
            )
            logits = out.logits[0]  # [K, vocab]
        # rows that sample this step (with their logits row): every decoding row, and the rows
        # (primaries and their forks) whose prompt ends in this chunk
        samplers: list[_Row] = list(decode)
        sample_index: list[int] = list(range(len(decode)))
        leaving: set[int] = set()
        for row, start, first, kept in chunk_keep:
            if row.prompt_lp_k is not None:
                usable = min(kept, len(row.request.prompt_ids) - 1 - start)  # the last position predicts a new token
                if usable > 0:
                    row.prompt_lps.extend(self._prompt_logprobs(row.request.prompt_ids, logits[first : first + usable], start, row.prompt_lp_k))
            if not row.decoding:
                continue
            last = first + kept - 1
            forks = row.live_forks()
            if row.prompt_lp_k is not None:
                prompt_lps = [None, *row.prompt_lps]
                for member in ([] if row.detached else [row]) + forks:
                    self._deliver_prompt_logprobs(member.request, _trim(prompt_lps, member.request.prompt_logprobs))
                row.prompt_lps = []
            for fork in forks:
                self.kv.copy_prefix(row.kv_slot, fork.kv_slot, row.prefilled)
                fork.source = None
                fork.prefilled = fork.length = row.prefilled
                samplers.append(fork)
                sample_index.append(last)
            row.forks = []
            if row.detached:
                leaving.add(id(row))
            elif row.request.params.max_tokens == 0:  # scoring only: the prompt's logprobs were the answer
                row.request.emit(None, FINISH_LENGTH)
                leaving.add(id(row))
            else:
                samplers.append(row)
                sample_index.append(last)
        if leaving:
            self._keep_rows([i for i, r in enumerate(self.running) if id(r) not in leaving])
        if samplers:
            if sample_index != list(range(logits.shape[0])):
                logits = logits[torch.tensor(sample_index, dtype=torch.long, device=logits.device)]  # [R, vocab]
            self._sample_and_accept(samplers, logits)

    def _drop_cancelled(self) -> None:
        keep = []
        for i, row in enumerate(self.running):
            if row.detached:
                if row.live_forks():
                    keep.append(i)
                continue
            if row.request.cancelled:
                row.request.emit(None, row.request.cancel_reason)
                if row.prefilling and row.live_forks():
                    row.detached = True  # its forks still need the prompt it is prefilling
                    keep.append(i)
            else:
                keep.append(i)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self.running):
            return
        kept = set(keep)
        removed = [row for i, row in enumerate(self.running) if i not in kept]
        for row in removed:
            self.kv.release(row.kv_slot)
            row.left = True
        self.running = [self.running[i] for i in keep]
        # a primary that left before its prompt was complete (not by cancellation: a cancelled
        # primary stays, detached, for its forks): its waiting forks cannot start
        orphans = [f for row in removed for f in row.forks if not f.left]
        if orphans:
            for fork in orphans:
                fork.request.emit(None, fork.request.cancel_reason if fork.request.cancelled else FINISH_ERROR)
            gone = {id(f) for f in orphans}
            self._keep_rows([i for i, r in enumerate(self.running) if id(r) not in gone])

    def fail_all(self, reason: str = FINISH_ERROR) -> None:
        for row in self.running:
            row.left = True
            if not row.detached:
                row.request.emit(None, reason)
        self.running = []
        self.kv.release_all()


def _trim(logprobs: list, k: int | None) -> list:
    """The group's prompt logprobs with each entry's top list cut to ``k``."""
    k = k or 0
    return [lp if lp is None or len(lp.top) <= k else TokenLogprob(lp.token_id, lp.logprob, lp.top[:k]) for lp in logprobs]
