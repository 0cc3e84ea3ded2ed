"""The service layer: what both fronts (HTTP, gRPC) call. Resolves the model name to an adapter,
validates and tokenizes the request (one place for every limit), acquires the adapter, submits to
the scheduler and turns engine tokens into text events; also adapter administration.

It never touches the model directly and knows nothing of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from loraplex.server.auth import ApiKey, KeyRing
from loraplex.server.engine.engine import FINISH_CANCELLED, FINISH_ERROR, EngineRequest
from loraplex.server.engine.sampling import SamplingParams
from loraplex.server.errors import AdapterNotFound, EngineFailure, NotReady, Overloaded, RequestInvalid
from loraplex.server.metrics import ServerMetrics
from loraplex.server.registry import AdapterRegistry, AdapterState
from loraplex.server.scheduler import Scheduler
from loraplex.server.settings import ServerSettings
from loraplex.server.textstream import TextAssembler

log = logging.getLogger("loraplex.service")
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 256
_ROLES = {"system", "user", "assistant"}


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
    credential: str | None = field(default=None, repr=False)  # the raw API key, when auth is on


@dataclass
class GenerationEvent:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise RequestInvalid(message, param=param)


class GenerationService:
    def __init__(
        self,
        *,
        tokenizer,
        scheduler: Scheduler,
        registry: AdapterRegistry,
        metrics: ServerMetrics,
        settings: ServerSettings,
        base_name: str,
        base_fingerprint: str,
        keys: KeyRing | None = None,
    ) -> None:
        self.keys = keys or KeyRing()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.base_name = base_name
        self.base_fingerprint = base_fingerprint
        self.ready = False
        self.created = int(time.time())
        self.inflight: dict[int, EngineRequest] = {}
        self.waiting_adapters: dict[str, int] = {}
        self.running_adapters: dict[str, int] = {}

    # ---------------------------------------------------------------- access
    def authenticate(self, credential: str | None) -> ApiKey | None:
        return self.keys.authenticate(credential)

    def _visible(self, key: ApiKey | None, model: str) -> bool:
        return key is None or key.may_use(model)

    def authorize_model(self, key: ApiKey | None, model: str) -> None:
        """A key that may not use a model gets the same answer as for a model that doesn't exist."""
        if not self._visible(key, model):
            raise AdapterNotFound(f"The model `{model}` does not exist.", param="model")

    def require_admin(self, credential: str | None) -> ApiKey | None:
        key = self.authenticate(credential)
        self.keys.require_admin(key)
        return key

    # --------------------------------------------------------------- models
    def adapter_for(self, model: str) -> str | None:
        """None for the bare base; the adapter name otherwise (AdapterNotFound if unknown)."""
        if not isinstance(model, str) or not model:
            raise RequestInvalid("model is required: an adapter name or the base model's name", param="model")
        if model == self.base_name:
            return None
        self.registry.get(model)
        return model

    def list_models(self, credential: str | None = None) -> list[dict[str, Any]]:
        key = self.authenticate(credential)
        self.registry.scan()
        models = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "loraplex", "root": self.base_name, "parent": None}]
        for name, entry in sorted(self.registry.entries.items()):
            models.append({"id": name, "object": "model", "created": self.created, "owned_by": "loraplex", "root": str(entry.path), "parent": self.base_name, "state": entry.state.value})
        return [m for m in models if self._visible(key, m["id"])]

    def describe_adapters(self, credential: str | None = None) -> list[dict[str, Any]]:
        key = self.authenticate(credential)
        self.registry.scan()
        return [e.describe() for name, e in sorted(self.registry.entries.items()) if self._visible(key, name)]

    def describe_adapter(self, name: str, credential: str | None = None) -> dict[str, Any]:
        self.authorize_model(self.authenticate(credential), name)
        return self.registry.get(name).describe()

    async def load_adapter(self, name: str, path: str | None = None, credential: str | None = None) -> dict[str, Any]:
        self.require_admin(credential)
        try:
            entry = await self.registry.load(name, path)
        finally:
            self._update_lora_info()
        if entry.load_seconds is not None:
            self.metrics.load_seconds.observe(entry.load_seconds)
        return entry.describe()

    async def unload_adapter(self, name: str, credential: str | None = None) -> dict[str, Any]:
        self.require_admin(credential)
        entry = await self.registry.unload(name)
        self._update_lora_info()
        return entry.describe()

    # ------------------------------------------------------------ requests
    def _sampling(self, req: GenerationRequest, prompt_len: int) -> SamplingParams:
        s = self.settings
        _check(req.n == 1, f"n={req.n} is not supported; only n=1", "n")
        max_tokens = s.max_tokens_default if req.max_tokens is None else req.max_tokens
        _check(isinstance(max_tokens, int) and max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if req.max_tokens is None:
            max_tokens = max(1, min(max_tokens, s.max_model_len - prompt_len))
        _check(
            prompt_len + max_tokens <= s.max_model_len,
            f"prompt has {prompt_len} tokens and max_tokens is {max_tokens}: {prompt_len + max_tokens} > --max-model-len {s.max_model_len}",
            "max_tokens",
        )
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        _check(0.0 <= temperature <= 2.0, f"temperature must be in [0, 2], got {temperature}", "temperature")
        top_p = 1.0 if req.top_p is None else float(req.top_p)
        _check(0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}", "top_p")
        top_k = 0 if req.top_k in (None, -1) else req.top_k
        _check(isinstance(top_k, int) and top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {req.top_k}", "top_k")
        _check(len(req.stop) <= MAX_STOP_STRINGS, f"stop has {len(req.stop)} strings; the limit is {MAX_STOP_STRINGS}", "stop")
        for stop in req.stop:
            _check(isinstance(stop, str) and 0 < len(stop) <= MAX_STOP_LENGTH, f"stop string {stop!r} must have 1 to {MAX_STOP_LENGTH} characters", "stop")
        vocab = len(self.tokenizer)
        for tid in req.stop_token_ids:
            _check(isinstance(tid, int) and 0 <= tid < vocab, f"stop_token_ids value {tid} is outside the vocabulary [0, {vocab})", "stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
        )

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            _check(len(req.messages) > 0, "messages is empty", "messages")
            for i, m in enumerate(req.messages):
                _check(isinstance(m, dict) and m.get("role") in _ROLES, f"messages[{i}].role must be one of {sorted(_ROLES)}", "messages")
                _check(isinstance(m.get("content"), str), f"messages[{i}].content must be a string", "messages")
            text = self.tokenizer.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            vocab = len(self.tokenizer)
            _check(len(ids) > 0, "prompt is empty", "prompt")
            for tid in ids:
                _check(isinstance(tid, int) and 0 <= tid < vocab, f"prompt token id {tid} is outside the vocabulary [0, {vocab})", "prompt")
            return ids
        _check(isinstance(req.prompt, str) and req.prompt != "", "prompt is empty", "prompt")
        return list(self.tokenizer(req.prompt, add_special_tokens=False)["input_ids"])

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream events for one request; closing the iterator cancels the request."""
        if not self.ready:
            raise NotReady("the server is not ready yet (loading the base model)")
        key = self.authenticate(req.credential)
        self.authorize_model(key, req.model)
        adapter = self.adapter_for(req.model)
        label = adapter or self.base_name
        prompt_ids = self._prompt_ids(req)
        params = self._sampling(req, len(prompt_ids))
        self.keys.admit(key)
        entry = await self.registry.acquire(adapter) if adapter else None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(token: int | None, finish: str | None) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, (token, finish, time.perf_counter()))

        engine_request = EngineRequest(req.request_id, prompt_ids, adapter, params, emit)
        assembler = TextAssembler(self.tokenizer, req.stop)
        arrived = time.perf_counter()
        last_token_at: float | None = None
        completion, finish = 0, None
        self._count(self.waiting_adapters, label, +1)
        timer = None
        if self.settings.request_timeout:
            timer = loop.call_later(self.settings.request_timeout, self._end, engine_request, "timeout")
        self.inflight[id(engine_request)] = engine_request
        try:
            try:
                self.scheduler.submit(engine_request)
            except Overloaded:
                finish = "rejected"
                raise
            self.metrics.prompt_tokens.labels(label).inc(len(prompt_ids))
            while finish is None:
                token, finish, at = await queue.get()
                if token is not None and not assembler.stopped:
                    if last_token_at is None:
                        self._count(self.waiting_adapters, label, -1)
                        self._count(self.running_adapters, label, +1)
                        self.metrics.ttft.labels(label).observe(at - arrived)
                        self.metrics.queue_time.labels(label).observe(at - arrived)
                    else:
                        self.metrics.itl.labels(label).observe(at - last_token_at)
                    last_token_at = at
                    completion += 1
                    delta = assembler.add(token)
                    if assembler.stopped:
                        finish = "stop"
                        self.scheduler.cancel(engine_request, "stop")  # the engine frees the row at its next step
                    yield GenerationEvent(delta, [token], finish, len(prompt_ids), completion)
                elif finish is not None and not assembler.stopped:
                    if finish == FINISH_ERROR:
                        log.error("request %s failed inside the engine", req.request_id)
                        raise EngineFailure(f"request {req.request_id} failed inside the engine (see the server log)")
                    yield GenerationEvent(assembler.flush(), [], finish, len(prompt_ids), completion)
        finally:
            self.inflight.pop(id(engine_request), None)
            if timer is not None:
                timer.cancel()
            if finish is None:
                finish = FINISH_CANCELLED
                self.scheduler.cancel(engine_request, FINISH_CANCELLED)
            if last_token_at is None:
                self._count(self.waiting_adapters, label, -1)
            else:
                self._count(self.running_adapters, label, -1)
            self.metrics.requests.labels(label, finish).inc()
            self.metrics.generation_tokens.labels(label).inc(completion)
            if key is not None:
                self.metrics.key_requests.labels(key.name, label, finish).inc()
                self.metrics.key_tokens.labels(key.name).inc(completion + (len(prompt_ids) if finish != "rejected" else 0))
                if finish != "rejected":
                    self.keys.record_tokens(key, completion + len(prompt_ids))
            self.metrics.e2e_latency.labels(label).observe(time.perf_counter() - arrived)
            if entry is not None:
                await self.registry.release(entry)

    def _end(self, engine_request: EngineRequest, reason: str) -> None:
        """End a request early with ``reason`` as its finish reason (the engine frees its row)."""
        self.scheduler.cancel(engine_request, reason)

    def abort_all(self, reason: str = "abort") -> int:
        """End every request in flight (shutdown deadline); returns how many."""
        requests = list(self.inflight.values())
        for engine_request in requests:
            self._end(engine_request, reason)
        if requests:
            log.warning("ended %d request(s) in flight with finish reason %r", len(requests), reason)
        return len(requests)

    def _count(self, table: dict[str, int], name: str, delta: int) -> None:
        table[name] = table.get(name, 0) + delta
        if table[name] <= 0:
            table.pop(name, None)
        self._update_lora_info()

    def _update_lora_info(self) -> None:
        adapters = lambda table: [n for n in table if n != self.base_name]  # noqa: E731
        self.metrics.set_lora_info(self.settings.max_loras, adapters(self.running_adapters), adapters(self.waiting_adapters))

    def resident_count(self) -> int:
        return sum(1 for e in self.registry.entries.values() if e.state == AdapterState.RESIDENT)
