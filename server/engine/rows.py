"""What every engine backend shares: the request type the scheduler hands in, the running rows,
and the rules that end a sequence (stop ids, ``max_tokens``, model length, cancellation, a
failed row).

A backend subclasses ``RowEngine`` and either implements the protocol's ``admit``/``step`` itself
(the torch engine: token-budgeted steps mixing prefill chunks and decode rows) or only
``prefill``/``decode`` (the onnx engines), for which ``RowEngine`` provides ``admit``/``step``: a
step prefills up to ``prefills_per_step`` admitted prompts one by one, then decodes every running
row. Plus adapter install/removal and ``_forget_rows`` for its own per-row state. Runs on the
scheduler's thread only. Knows token ids, never text.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from loraplex.server.engine.sampling import RowSampling, SamplingParams, sample_batch, sample_row

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
    # engine thread, once, when the scheduler hands it to the engine (the end of its queue time)
    on_admit: Callable[[], None] | None = None


@dataclass
class Running:
    """One sequence in the running batch (backends subclass it for their own per-row state)."""

    request: EngineRequest
    generator: object | None  # torch.Generator for seeded sampling, or None
    generated: int = 0
    last_token: int = 0
    length: int = 0  # prompt + generated tokens in the cache
    stop_ids: frozenset[int] = field(default_factory=frozenset)


class RowEngine:
    """Running rows and the finish rules; subclasses own the model."""

    def __init__(self, *, eos_token_ids: Sequence[int], max_batch_size: int, max_model_len: int) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.running: list[Running] = []
        self.peak_batch_size = 0
        self.steps = 0
        # admitted, not yet prefilled (the prefill/decode engines only; see ``step``)
        self.admitted: deque[EngineRequest] = deque()
        self.prefills_per_step = 2
        # Test hook (never set in production): requests whose id contains this string fail at
        # their third token, to prove a fault in one request leaves the others running.
        self._fault_marker = os.environ.get("LORAPLEX_TEST_FAIL_REQUEST_ID") or None

    # ---------------------------------------------------------------- state
    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.admitted)

    def has_capacity(self) -> bool:
        return self.num_running < self.max_batch_size

    def kv_usage(self) -> float:
        return self.stats().kv_usage

    def stats(self):
        """EngineStats; capacity = rows x max_model_len (engines with a real cache override it)."""
        from loraplex.server.engine.protocol import EngineStats

        return EngineStats(
            running=self.num_running,
            kv_used_tokens=sum(r.length for r in self.running),
            kv_capacity_tokens=self.max_batch_size * self.max_model_len,
            peak_batch_size=self.peak_batch_size,
            steps=self.steps,
        )

    # ------------------------------------------- protocol over prefill/decode
    def admit(self, request: EngineRequest) -> None:
        """Queue a request for prefill at the next steps (engines with their own ``admit`` override)."""
        self.admitted.append(request)

    def step(self) -> None:
        """Prefill up to ``prefills_per_step`` admitted prompts (all of them when nothing
        decodes), then one decode over the running rows."""
        prefilled = 0
        while self.admitted and (prefilled < self.prefills_per_step or not self.running):
            request = self.admitted.popleft()
            prefilled += 1
            if request.cancelled:
                request.emit(None, request.cancel_reason)
                continue
            try:
                self.prefill(request)
            except Exception:
                log.exception("prefill failed for request %s", request.request_id)
                request.emit(None, FINISH_ERROR)
        if self.running:
            self.decode()
        self.steps += 1

    def prefill(self, request: EngineRequest) -> None:  # pragma: no cover - implemented by the backends
        raise NotImplementedError

    def decode(self) -> None:  # pragma: no cover - implemented by the backends
        raise NotImplementedError

    def _sample_and_accept(self, rows: list, logits) -> None:
        """One vectorized sampling over ``rows`` (running rows with ``output_ids``; ``logits``
        [len(rows), vocab]); rows that finish or fail leave the batch. Shared by the engines."""
        ended: set[int] = set()
        ok: list[int] = []
        for i, row in enumerate(rows):
            try:
                self._check_fault_hook(row)
                ok.append(i)
            except Exception:
                self._fail_row(row)
                ended.add(id(row))
        tokens: list[int] = []
        if ok:
            try:
                tokens = sample_batch(
                    logits[ok] if len(ok) != len(rows) else logits,
                    [RowSampling(rows[i].request.params, rows[i].generator, rows[i].output_ids, rows[i].request.prompt_ids, rows[i].stop_ids) for i in ok],
                )
            except Exception:
                log.exception("sampling failed; ending the %d rows that sampled this step", len(ok))
                for i in ok:
                    rows[i].request.emit(None, FINISH_ERROR)
                    ended.add(id(rows[i]))
        for i, token in zip(ok, tokens):
            row = rows[i]
            row.output_ids.append(token)
            if not self._accept(row, token):
                ended.add(id(row))
        if ended:
            self._keep_rows([i for i, r in enumerate(self.running) if id(r) not in ended])

    def stop_ids_for(self, params: SamplingParams) -> frozenset[int]:
        return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)

    def _refuse_if_busy(self, name: str) -> None:
        if any(r.request.adapter == name for r in self.running) or any(r.adapter == name and not r.cancelled for r in self.admitted):
            raise RuntimeError(f"adapter {name!r} is still in use by running requests")

    def _check_fault_hook(self, running: Running) -> None:
        if self._fault_marker and self._fault_marker in running.request.request_id and running.generated >= 2:
            raise RuntimeError("injected fault (LORAPLEX_TEST_FAIL_REQUEST_ID)")

    # ---------------------------------------------------------------- rows
    def _accept(self, running: Running, token: int) -> bool:
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

    def _advance(self, running: Running, logits) -> bool:
        """Sample this row's next token from its logits row and record it; False when the row
        ends (finished, or failed: a failure ends that request only, the batch goes on)."""
        try:
            self._check_fault_hook(running)
            token = sample_row(logits, running.request.params, running.generator)
        except Exception:
            self._fail_row(running)
            return False
        return self._accept(running, token)

    def _join(self, running: Running) -> None:
        self.running.append(running)
        self.peak_batch_size = max(self.peak_batch_size, len(self.running))

    def _fail_row(self, running: Running) -> None:
        # one row's failure ends that request only; the batch goes on
        log.exception("request %s failed; ending it", running.request.request_id)
        running.request.emit(None, FINISH_ERROR)

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
        self._forget_rows(keep)

    def _forget_rows(self, keep: list[int]) -> None:
        """Drop the backend's per-row state of rows not in ``keep`` (indices before the cut)."""

    def fail_all(self, reason: str = FINISH_ERROR) -> None:
        """End every running sequence (after an engine error); the engine stays usable."""
        for running in self.running:
            running.request.emit(None, reason)
        while self.admitted:
            self.admitted.popleft().emit(None, reason)
        self.running = []
        self._forget_rows([])
