"""Generation: one front-end independent ``GenerationRequest`` -> a stream of text events, as a
pipeline of small named steps:

    validate  the model name, the caller's access to it, the prompt's shape (no tokenizer yet)
    tokenize  prompt -> token ids (chat template / text / given ids); a large text is tokenized
              in the tokenizer thread, not on the event loop
    sample    the sampling values against their limits (needs the prompt's length)
    admit     the key's rate limit, then the adapter pinned (and loaded on demand) by the registry
    stream    submitted to the scheduler; engine tokens -> text deltas (stop strings end it),
              a timer for ``--request-timeout``; closing the stream cancels the request
    account   finish reason, metrics, the key's tokens, the adapter released

Cancellation is a scheduler command (``Scheduler.cancel``): only the engine thread ends a row.
Every limit is checked here (values in ``server/validation.py``), so HTTP and gRPC share them.
Knows the tokenizer, the scheduler's request types and the registry; nothing of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from loraplex.server import validation as check
from loraplex.server.access import Access
from loraplex.server.auth import ApiKey
from loraplex.server.chat_prompt import chat_ids, text_ids
from loraplex.server.errors import EngineFailure, NotReady, Overloaded, RequestInvalid
from loraplex.server.metrics import AdapterActivity, RequestClock, ServerMetrics
from loraplex.server.readiness import Readiness
from loraplex.server.registry import AdapterRegistry, Lease
from loraplex.server.scheduler import FINISH_CANCELLED, FINISH_ERROR, EngineRequest, SamplingParams, Scheduler
from loraplex.server.settings import ServerSettings
from loraplex.server.textstream import TextAssembler

log = logging.getLogger("loraplex.service")
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 256
_ROLES = {"system", "user", "assistant"}
#: OpenAI's "developer" role is the system role of newer models: rendered as "system"
_ROLE_ALIASES = {"developer": "system"}
#: prompts with more characters than this are tokenized off the event loop
TOKENIZE_INLINE_CHARS = 4096
#: finish reasons the service adds to the engine's ("stop", "length", "cancelled", "error")
FINISH_TIMEOUT, FINISH_ABORT, FINISH_REJECTED = "timeout", "abort", "rejected"


@dataclass(frozen=True)
class GenerationRequest:
    """A front-end independent request; exactly one of prompt, prompt_token_ids, messages."""

    model: str
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    messages: Sequence[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    n: int = 1
    ignore_eos: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    credential: str | None = field(default=None, repr=False)  # the API key (auth.credentials), when auth is on


@dataclass
class GenerationEvent:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Plan:
    """A validated, tokenized request: what the later steps need."""

    request_id: str
    key: ApiKey | None
    adapter: str | None  # None = the bare base
    label: str  # metrics label: the adapter, or the base's served name
    prompt_ids: list[int]
    params: SamplingParams
    stop: Sequence[str]


@dataclass
class Flight:
    """One request between submission and its end (event-loop side)."""

    plan: Plan
    engine_request: EngineRequest
    tokens: asyncio.Queue
    clock: RequestClock
    assembler: TextAssembler
    completion: int = 0
    finish: str | None = None
    timer: asyncio.TimerHandle | None = None


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise RequestInvalid(message, param=param)


class Generation:
    def __init__(
        self,
        *,
        tokenizer,
        scheduler: Scheduler,
        registry: AdapterRegistry,
        metrics: ServerMetrics,
        settings: ServerSettings,
        access: Access,
        activity: AdapterActivity,
        readiness: Readiness,
        base_name: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.access = access
        self.activity = activity
        self.readiness = readiness
        self.base_name = base_name
        self.inflight: dict[int, EngineRequest] = {}
        # one thread: tokenizer calls are never concurrent with each other off the loop
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-tokenize")

    # ----------------------------------------------------------------- the pipeline
    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream events for one request; closing the iterator cancels the request."""
        if not self.readiness.ready:
            raise NotReady("the server is not ready yet (loading the base model)")
        key, adapter = self.validate(req)
        prompt_ids = await self.tokenize(req)
        plan = Plan(req.request_id, key, adapter, adapter or self.base_name, prompt_ids, self.sample(req, len(prompt_ids)), req.stop)
        lease = await self.admit(plan)
        flight = self.flight(plan, lease)
        try:
            self.submit(flight)
            async with contextlib.aclosing(self.stream(flight)) as events:
                async for event in events:
                    yield event
        finally:
            await self.account(flight, lease)

    # -------------------------------------------------------------------- validate
    def resolve(self, model: Any) -> str | None:
        """None for the bare base; the adapter name otherwise (AdapterNotFound if unknown)."""
        check.model_name(model)
        if model == self.base_name:
            return None
        self.registry.get(model)
        return model

    def validate(self, req: GenerationRequest) -> tuple[ApiKey | None, str | None]:
        """The caller's key, its right to the model, the model itself, the prompt's shape."""
        key = self.access.authenticate(req.credential)
        self.access.authorize_model(key, req.model)
        adapter = self.resolve(req.model)
        if req.messages is not None:
            self.messages(req.messages)
        elif req.prompt_token_ids is None:
            _check(isinstance(req.prompt, str) and req.prompt != "", "prompt is empty", "prompt")
            check.text(req.prompt, "prompt")
        return key, adapter

    def messages(self, messages: Sequence[Any]) -> list[dict[str, str]]:
        """Role and content of each message checked; "developer" becomes "system"."""
        _check(len(messages) > 0, "messages is empty", "messages")
        out = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            role = _ROLE_ALIASES.get(role, role)
            _check(role in _ROLES, f"messages[{i}].role must be one of {sorted(_ROLES | set(_ROLE_ALIASES))}, got {check.short(m.get('role') if isinstance(m, dict) else m)}", "messages")
            content = m.get("content")
            _check(isinstance(content, str), f"messages[{i}].content must be a string", "messages")
            check.text(content, f"messages[{i}].content")
            out.append({"role": role, "content": content})
        return out

    # -------------------------------------------------------------------- tokenize
    async def tokenize(self, req: GenerationRequest) -> list[int]:
        """Prompt token ids; user text never becomes special tokens (chat_prompt)."""
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            _check(len(ids) > 0, "prompt is empty", "prompt")
            vocab = len(self.tokenizer)
            for tid in ids:
                _check(type(tid) is int and 0 <= tid < vocab, f"prompt token id {check.short(tid)} is outside the vocabulary [0, {vocab})", "prompt")
            return ids
        if req.messages is not None:
            messages = self.messages(req.messages)
            size = sum(len(m["content"]) for m in messages)
            work = lambda: chat_ids(self.tokenizer, messages)  # noqa: E731
        else:
            size, prompt = len(req.prompt), req.prompt
            work = lambda: text_ids(self.tokenizer, prompt)  # noqa: E731
        if size <= TOKENIZE_INLINE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, work)

    # ---------------------------------------------------------------------- sample
    def sample(self, req: GenerationRequest, prompt_len: int) -> SamplingParams:
        """Every sampling value checked (type and range) in one place for both fronts."""
        s = self.settings
        n = check.integer(req.n, "n")
        _check(n == 1, f"n={n} is not supported; only n=1", "n")
        if req.max_tokens is None:
            max_tokens = max(1, min(s.max_tokens_default, s.max_model_len - prompt_len))
        else:
            max_tokens = check.integer(req.max_tokens, "max_tokens", low=1)
        _check(
            prompt_len + max_tokens <= s.max_model_len,
            f"prompt has {prompt_len} tokens and max_tokens is {max_tokens}: {prompt_len + max_tokens} > --max-model-len {s.max_model_len}",
            "max_tokens",
        )
        stops = list(req.stop)
        _check(len(stops) <= MAX_STOP_STRINGS, f"stop has {len(stops)} strings; the limit is {MAX_STOP_STRINGS}", "stop")
        for stop in stops:
            check.text(stop, "stop")
            _check(0 < len(stop) <= MAX_STOP_LENGTH, f"stop string {check.short(stop)} must have 1 to {MAX_STOP_LENGTH} characters", "stop")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=check.temperature(req.temperature),
            top_p=check.top_p(req.top_p),
            top_k=check.top_k(req.top_k),
            seed=check.seed(req.seed),
            stop_token_ids=tuple(check.token_ids(req.stop_token_ids, "stop_token_ids", len(self.tokenizer))),
            ignore_eos=check.flag(req.ignore_eos, "ignore_eos"),
        )

    # ----------------------------------------------------------------------- admit
    async def admit(self, plan: Plan) -> Lease | None:
        """The key's rate limit, then the adapter pinned (loaded on demand, waiting up to
        --adapter-wait-timeout for a slot). Every slot busy counts like a full queue."""
        self.access.admit(plan.key)
        if plan.adapter is None:
            return None
        try:
            return await self.registry.acquire(plan.adapter)
        except Overloaded:  # never recorded as the adapter's failure
            self.metrics.requests.labels(plan.label, FINISH_REJECTED).inc()
            if plan.key is not None:
                self.metrics.key_requests.labels(plan.key.name, plan.label, FINISH_REJECTED).inc()
            raise

    # ---------------------------------------------------------------------- stream
    def flight(self, plan: Plan, lease: Lease | None) -> Flight:
        """The engine request (naming the adapter's current engine copy: a republished adapter
        gets a new one), its token queue, clocks and timeout; counted as waiting and in flight."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        clock = RequestClock(self.metrics, plan.label)

        def emit(token: int | None, finish: str | None) -> None:  # engine thread
            loop.call_soon_threadsafe(tokens.put_nowait, (token, finish, time.perf_counter()))

        def admitted() -> None:  # engine thread: the request left the queue for the batch
            loop.call_soon_threadsafe(clock.admitted, time.perf_counter())

        engine_request = EngineRequest(plan.request_id, plan.prompt_ids, lease.engine_name if lease else None, plan.params, emit, on_admit=admitted)
        flight = Flight(plan, engine_request, tokens, clock, TextAssembler(self.tokenizer, plan.stop))
        self.activity.enter(plan.label)
        self.inflight[id(engine_request)] = engine_request
        if self.settings.request_timeout:
            flight.timer = loop.call_later(self.settings.request_timeout, self.scheduler.cancel, engine_request, FINISH_TIMEOUT)
        return flight

    def submit(self, flight: Flight) -> None:
        """Into the scheduler's queue; Overloaded (finish reason "rejected") when it is full."""
        try:
            self.scheduler.submit(flight.engine_request)
        except Overloaded:
            flight.finish = FINISH_REJECTED
            raise
        self.metrics.prompt_tokens.labels(flight.plan.label).inc(len(flight.plan.prompt_ids))

    async def stream(self, flight: Flight) -> AsyncIterator[GenerationEvent]:
        """Engine tokens -> text events until the request finishes; a stop string ends it here
        and cancels the engine row."""
        plan, assembler = flight.plan, flight.assembler
        prompt_len = len(plan.prompt_ids)
        while flight.finish is None:
            token, finish, at = await flight.tokens.get()
            if token is not None and not assembler.stopped:
                if not flight.clock.started:
                    self.activity.start(plan.label)
                flight.clock.token(at)
                flight.completion += 1
                delta = assembler.add(token)
                if assembler.stopped:
                    finish = "stop"
                    self.scheduler.cancel(flight.engine_request, "stop")  # the engine frees the row at its next step
                flight.finish = finish
                yield GenerationEvent(delta, [token], finish, prompt_len, flight.completion)
            elif finish is not None and not assembler.stopped:
                flight.finish = finish
                if finish == FINISH_ERROR:
                    log.error("request %s failed inside the engine", plan.request_id)
                    raise EngineFailure(f"request {plan.request_id} failed inside the engine (see the server log)")
                yield GenerationEvent(assembler.flush(), [], finish, prompt_len, flight.completion)

    # --------------------------------------------------------------------- account
    async def account(self, flight: Flight, lease: Lease | None) -> None:
        """The request ended (finished, failed, or its stream closed early): cancel what still
        runs, count it, release the adapter."""
        if flight.finish is None:
            flight.finish = FINISH_CANCELLED
            self.scheduler.cancel(flight.engine_request, FINISH_CANCELLED)
        self._settle(flight)
        if lease is not None:
            await self.registry.release(lease)

    def _settle(self, flight: Flight) -> None:
        plan, finish = flight.plan, flight.finish
        self.inflight.pop(id(flight.engine_request), None)
        if flight.timer is not None:
            flight.timer.cancel()
        self.activity.leave(plan.label, started=flight.clock.started)
        self._count_finished(plan, finish, flight.completion)
        flight.clock.finished()

    def _count_finished(self, plan: Plan, finish: str, completion: int) -> None:
        self.metrics.requests.labels(plan.label, finish).inc()
        self.metrics.generation_tokens.labels(plan.label).inc(completion)
        if plan.key is not None:
            charged = completion + (len(plan.prompt_ids) if finish != FINISH_REJECTED else 0)  # a refused request costs nothing
            self.metrics.key_requests.labels(plan.key.name, plan.label, finish).inc()
            self.metrics.key_tokens.labels(plan.key.name).inc(charged)
            if finish != FINISH_REJECTED:
                self.access.record_tokens(plan.key, charged)

    # ---------------------------------------------------------------------- ending
    def abort_all(self, reason: str = FINISH_ABORT) -> int:
        """End every request in flight (the shutdown deadline); returns how many."""
        requests = list(self.inflight.values())
        for engine_request in requests:
            self.scheduler.cancel(engine_request, reason)
        if requests:
            log.warning("ended %d request(s) in flight with finish reason %r", len(requests), reason)
        return len(requests)
