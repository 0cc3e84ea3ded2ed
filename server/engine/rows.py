"""What every engine backend shares: the request type the scheduler hands in, the running rows,
and the rules that end a sequence (stop ids, ``max_tokens``, model length, cancellation, a
failed row).

A backend subclasses ``RowEngine`` and either implements the protocol's ``admit``/``step`` itself
(the torch engine: token-budgeted steps mixing prefill chunks and decode rows) or only
``prefill``/``decode`` (the onnx engines), for which ``RowEngine`` provides ``admit``/``step``: a
step prefills up to ``prefills_per_step`` admitted prompts one by one, then decodes every running
row. Plus adapter install/removal and ``_forget_rows`` for its own per-row state. Runs on the
scheduler's thread only. Knows token ids, never text.

Per-row features every backend gets through ``_sample_and_accept``/``_accept``: logprobs of the
generated tokens (``TokenLogprob``), a structured-output ``TokenConstraint`` (its mask applied
by the sampler, then ``accept``/``is_terminated`` here), sampling penalties. Prompt logprobs,
forks (n > 1) and adapter mixes need the backend's forward: each backend declares what it
supports in ``features``, and ``admit`` refuses a request using anything else.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from loraplex.server.engine.sampling import MAX_TOP_LOGPROBS as MAX_TOP
from loraplex.server.engine.sampling import (  # noqa: F401  (TokenLogprob, TokenConstraint: re-exported, the engine's request types)
    RowSampling,
    SamplingParams,
    TokenConstraint,
    TokenLogprob,
    logprobs_of,
    sample_step,
)

log = logging.getLogger("loraplex.engine")

#: finish reasons, as the OpenAI API spells them (plus "cancelled" and "abort" for our own ends)
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"

#: what a backend may support beyond plain sampling (``Engine.features``)
ALL_FEATURES = frozenset({"logprobs", "prompt_logprobs", "n", "constraint", "mix", "penalties"})


@dataclass
class EngineRequest:
    """A tokenized request; ``emit(token_id, finish_reason)`` is called from the engine thread
    (``emit(token_id, None, logprob)`` for tokens of a request with ``logprobs`` set)."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[..., None]
    cancelled: bool = False
    cancel_reason: str = FINISH_CANCELLED
    # engine thread, once, when the scheduler hands it to the engine (the end of its queue time)
    on_admit: Callable[[], None] | None = None
    logprobs: int | None = None  # None = off; k >= 0: each generated token's TokenLogprob with the k best
    prompt_logprobs: int | None = None  # None = off; k >= 0: each prompt token's TokenLogprob (the first: None)
    # engine thread, once, before the first token: the prompt's logprobs (with prompt_logprobs set)
    on_prompt_logprobs: Callable[[list[TokenLogprob | None]], None] | None = None
    constraint: TokenConstraint | None = None  # structured output: masks, then accepts, each token
    mix: tuple[tuple[str, float], ...] = ()  # weighted adapter mix (name, weight); ``adapter`` is then None
    # n > 1: further requests on the same prompt/adapter/mix; the prompt is prefilled once (this
    # request's row) and its KV copied into each fork's row; each fork has its own params, seed,
    # emit, constraint and logprobs, and is cancelled on its own (cancelling this one spares them)
    forks: tuple["EngineRequest", ...] = ()

    @property
    def rows(self) -> int:
        """Engine rows this request takes: its own and one per fork."""
        return 1 + len(self.forks)

    @property
    def adapters_used(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.mix) if self.mix else ((self.adapter,) if self.adapter else ())

    def emit_token(self, token: int, logprob: TokenLogprob | None) -> None:
        if self.logprobs is not None:
            self.emit(token, None, logprob)
        else:
            self.emit(token, None)


def promote_forks(request: EngineRequest) -> EngineRequest | None:
    """A cancelled request that is not yet prefilled: its first live fork takes its place,
    carrying the other live forks (cancelled forks are ended here); None when none is live. The
    caller ends ``request`` itself."""
    live = []
    for fork in request.forks:
        if fork.cancelled:
            fork.emit(None, fork.cancel_reason)
        else:
            live.append(fork)
    if not live:
        return None
    head = live[0]
    head.forks = tuple(live[1:])
    if head.on_admit is None:  # the group's admission hook (queue time) moves with it
        head.on_admit = request.on_admit
    return head


@dataclass
class Running:
    """One sequence in the running batch (backends subclass it for their own per-row state)."""

    request: EngineRequest
    generator: object | None  # torch.Generator for seeded sampling, or None
    generated: int = 0
    last_token: int = 0
    length: int = 0  # prompt + generated tokens in the cache
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    output_ids: list[int] = field(default_factory=list)  # generated so far (penalties)


class RowEngine:
    """Running rows and the finish rules; subclasses own the model."""

    #: the per-request features this backend honours (a subset of ``ALL_FEATURES``); the rest
    #: are refused at admission. Generated-token logprobs, constraints and penalties come with
    #: ``_sample_and_accept`` for every backend whose logits reach the sampler.
    features: frozenset[str] = frozenset({"logprobs", "constraint", "penalties"})

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
        """Rows in use: running, and admitted (with their forks) awaiting prefill."""
        return len(self.running) + sum(r.rows for r in self.admitted)

    def has_capacity(self, rows: int = 1) -> bool:
        return self.num_running + rows <= self.max_batch_size

    def check_request(self, request: EngineRequest) -> None:
        """Refuse (ValueError naming the field) what this backend does not honour."""
        used = {
            "logprobs": request.logprobs is not None or any(f.logprobs is not None for f in request.forks),
            "prompt_logprobs": request.prompt_logprobs is not None,
            "n": bool(request.forks),
            "constraint": request.constraint is not None or any(f.constraint is not None for f in request.forks),
            "mix": bool(request.mix),
            "penalties": any(r.params.penalized for r in (request, *request.forks)),
        }
        missing = sorted(name for name, on in used.items() if on and name not in self.features)
        if missing:
            raise ValueError(f"request {request.request_id}: the {type(self).__name__} backend does not support {', '.join(missing)}")
        if request.params.max_tokens < 0 or (request.params.max_tokens == 0 and request.prompt_logprobs is None):
            raise ValueError(f"request {request.request_id}: max_tokens must be >= 1 (0 only with prompt logprobs), got {request.params.max_tokens}")
        for fork in request.forks:
            if fork.forks or list(fork.prompt_ids) != list(request.prompt_ids) or fork.adapter != request.adapter or tuple(fork.mix) != tuple(request.mix):
                raise ValueError(f"request {request.request_id}: fork {fork.request_id} must share the prompt, adapter and mix and have no forks of its own")
            if fork.params.max_tokens < 1:
                raise ValueError(f"request {fork.request_id}: max_tokens must be >= 1 for a fork, got {fork.params.max_tokens}")

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
        self.check_request(request)
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
        """One vectorized sampling over ``rows`` (running rows; ``logits`` [len(rows), vocab]);
        rows that finish or fail leave the batch. Shared by the engines."""
        ended: set[int] = set()
        ok: list[int] = []
        for i, row in enumerate(rows):
            try:
                self._check_fault_hook(row)
                ok.append(i)
            except Exception:
                self._fail_row(row)
                ended.add(id(row))
        result = None
        if ok:
            try:
                result = sample_step(
                    logits[ok] if len(ok) != len(rows) else logits,
                    [self._row_sampling(rows[i]) for i in ok],
                )
            except Exception:
                log.exception("sampling failed; ending the %d rows that sampled this step", len(ok))
                for i in ok:
                    rows[i].request.emit(None, FINISH_ERROR)
                    ended.add(id(rows[i]))
        if result is not None:
            for j, i in enumerate(ok):
                row = rows[i]
                if result.dead[j]:  # its constraint allowed no token at all
                    log.warning("request %s: its constraint allows no token; ending it", row.request.request_id)
                    row.request.emit(None, FINISH_ERROR)
                    ended.add(id(row))
                    continue
                token = result.tokens[j]
                row.output_ids.append(token)
                if not self._accept(row, token, result.logprobs[j]):
                    ended.add(id(row))
        if ended:
            self._keep_rows([i for i, r in enumerate(self.running) if id(r) not in ended])

    @staticmethod
    def _row_sampling(row: Running) -> RowSampling:
        r = row.request
        return RowSampling(r.params, row.generator, row.output_ids, r.prompt_ids, row.stop_ids, r.logprobs, r.constraint)

    @staticmethod
    def _prompt_logprobs(prompt_ids: Sequence[int], logits: torch.Tensor, start: int, k: int) -> list[TokenLogprob]:
        """TokenLogprobs (top ``k``) of prompt tokens ``start+1 .. start+P`` from the raw logits
        [P, vocab] at positions ``start .. start+P-1`` (position p predicts token p+1)."""
        targets = torch.tensor(list(prompt_ids[start + 1 : start + 1 + logits.shape[0]]), dtype=torch.long, device=logits.device)
        chosen, values, ids = logprobs_of(logits, targets, min(k, MAX_TOP))
        chosen_l = chosen.tolist()
        values_l = values.tolist() if values is not None else [[] for _ in chosen_l]
        ids_l = ids.tolist() if ids is not None else [[] for _ in chosen_l]
        return [TokenLogprob(int(t), c, tuple(zip(i, v))) for t, c, v, i in zip(targets.tolist(), chosen_l, values_l, ids_l)]

    @staticmethod
    def _deliver_prompt_logprobs(request: EngineRequest, logprobs: list[TokenLogprob | None]) -> None:
        if request.on_prompt_logprobs is not None and request.prompt_logprobs is not None:
            try:
                request.on_prompt_logprobs(logprobs)
            except Exception:  # the service's hook must never stop the engine thread
                log.exception("prompt logprobs hook failed for request %s", request.request_id)

    def stop_ids_for(self, params: SamplingParams) -> frozenset[int]:
        return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)

    def _refuse_if_busy(self, name: str) -> None:
        if any(name in r.request.adapters_used for r in self.running) or any(name in r.adapters_used and not r.cancelled for r in self.admitted):
            raise RuntimeError(f"adapter {name!r} is still in use by running requests")

    def _check_fault_hook(self, running: Running) -> None:
        if self._fault_marker and self._fault_marker in running.request.request_id and running.generated >= 2:
            raise RuntimeError("injected fault (LORAPLEX_TEST_FAIL_REQUEST_ID)")

    # ---------------------------------------------------------------- rows
    def _accept(self, running: Running, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record a sampled token; emit it (and a finish if it ends the sequence). True = continue.
        A constraint first accepts the token (refused: the row ends with "error"); once it is
        terminated, nothing may follow (the row ends with "stop")."""
        request = running.request
        running.generated += 1
        running.last_token = token
        constraint = request.constraint
        if constraint is not None:
            try:
                accepted = constraint.accept(token)
            except Exception:
                log.exception("request %s: the constraint failed on token %d", request.request_id, token)
                accepted = False
            if not accepted:
                log.warning("request %s: the constraint refused token %d; ending it", request.request_id, token)
                request.emit(None, FINISH_ERROR)
                return False
        if token in running.stop_ids:
            request.emit(None, FINISH_STOP)
            return False
        request.emit_token(token, logprob)
        if constraint is not None and constraint.is_terminated():
            request.emit(None, FINISH_STOP)
            return False
        if running.generated >= request.params.max_tokens or running.length + 1 >= self.max_model_len:
            request.emit(None, FINISH_LENGTH)
            return False
        return True

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
            request = self.admitted.popleft()
            for member in (request, *request.forks):
                member.emit(None, reason)
        self.running = []
        self._forget_rows([])
