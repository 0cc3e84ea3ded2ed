"""Generation: one front-end independent ``GenerationRequest`` -> a stream of text events, as a
pipeline of small named steps:

    validate  the model name, the caller's access to it, the prompt's shape (no tokenizer yet)
    tokenize  prompt -> token ids (chat template / text / given ids); a large text is tokenized
              in the tokenizer thread, not on the event loop
    sample    the sampling values against their limits (needs the prompt's length), the
              output options (logprobs, echo, n, structured output) against the backend's
              engine features
    admit     the key's rate limit, then the adapter (or every member of a mix) pinned (and
              loaded on demand) by the registry
    stream    submitted to the scheduler (n > 1: one engine request whose forks share the
              prompt's prefill); engine tokens -> text deltas per choice (stop strings end that
              choice), a timer for ``--request-timeout``; closing the stream cancels the request
    account   finish reason, metrics, the key's tokens, the adapters released

Cancellation is a scheduler command (``Scheduler.cancel``): only the engine thread ends a row.
What the engine thread emits (tokens, finishes, admissions) reaches the event loop through an
``Outbox``: one loop wakeup per scheduler pass, not one per token.
Every limit is checked here (values in ``server/validation.py``), so HTTP and gRPC share them.
Knows the tokenizer, the scheduler's request types and the registry; nothing of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

from loraplex.server import validation as check
from loraplex.server.access import Access
from loraplex.server.auth import ApiKey
from loraplex.server.chat_prompt import chat_ids, text_ids
from loraplex.server.errors import EngineFailure, NotReady, Overloaded, RequestInvalid
from loraplex.server.mixes import parse_mix
from loraplex.server.metrics import AdapterActivity, RequestClock, ServerMetrics
from loraplex.server.readiness import Readiness
from loraplex.server.registry import AdapterRegistry, Lease
from loraplex.server.scheduler import FINISH_CANCELLED, FINISH_ERROR, EngineRequest, SamplingParams, Scheduler
from loraplex.server.settings import ServerSettings
from loraplex.server.textstream import TextAssembler, TokenPieces

log = logging.getLogger("loraplex.service")
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 256
_ROLES = {"system", "user", "assistant"}
#: OpenAI's "developer" role is the system role of newer models: rendered as "system"
_ROLE_ALIASES = {"developer": "system"}
#: prompts with more characters than this are tokenized off the event loop
TOKENIZE_INLINE_CHARS = 4096
#: finish reasons the service adds to the engine's ("stop", "length", "cancelled", "error")
FINISH_TIMEOUT, FINISH_ABORT, FINISH_REJECTED = "timeout", "abort", "rejected"
#: an engine without ``features`` (before issue #11's engine) has only the sampler's penalties
LEGACY_FEATURES = frozenset({"penalties"})


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
    #: k (0..20): each generated token's logprob and its k best alternatives; None = off
    logprobs: int | None = None
    #: the prompt (text, and with ``logprobs`` its tokens' logprobs, the first one null) comes
    #: first; with ``max_tokens`` 0 nothing is generated (scoring only)
    echo: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    #: token id (int, or its decimal string as JSON keys are) -> bias added to its logit
    logit_bias: Mapping[Any, Any] | None = None
    min_tokens: int | None = None
    #: structured output (one at most): OpenAI's response_format, vLLM's guided_* fields
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    #: a weighted adapter mix: [{"name": ..., "weight": ...}, ...] with ``model`` = the base
    adapters: Sequence[Any] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    credential: str | None = field(default=None, repr=False)  # the API key (auth.credentials), when auth is on


@dataclass(frozen=True)
class ScoredToken:
    """One token with its logprob, as both fronts show it (text and UTF-8 bytes of the token on
    its own); ``logprob`` is None for the prompt's first token (nothing predicts it)."""

    token_id: int
    text: str
    bytes: list[int]
    logprob: float | None
    top: tuple["ScoredToken", ...] = ()


@dataclass
class GenerationEvent:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # this choice's; None while it goes on
    prompt_tokens: int
    completion_tokens: int  # this choice's tokens so far
    index: int = 0  # the choice (0..n-1)
    #: one per token of ``token_ids`` when the request asked for logprobs
    logprobs: list[ScoredToken] | None = None
    #: echo: on the first event of each choice, the prompt's text ...
    echo_text: str | None = None
    #: ... and with logprobs, its tokens scored (the first one's logprob None)
    prompt_logprobs: list[ScoredToken] | None = None
    #: every choice's tokens so far (usage sums the choices)
    total_completion_tokens: int = 0


@dataclass
class Plan:
    """A validated, tokenized request: what the later steps need."""

    request_id: str
    key: ApiKey | None
    adapter: str | None  # None = the bare base
    label: str  # the adapter, the base's served name, or the mix ("a:0.7+b:0.3") for logs
    prompt_ids: list[int]
    params: SamplingParams
    stop: Sequence[str]
    n: int = 1
    logprobs: int | None = None
    echo_text: str | None = None  # set when the request echoes its prompt
    prompt_logprobs: int | None = None  # k for the engine's prompt scoring; None = off
    constraint: Callable[[], Any] | None = None  # a factory: one fresh TokenConstraint per choice
    mix: Any = None  # a MixSpec (server/mixes.py) when the request mixes adapters

    @property
    def labels(self) -> tuple[str, ...]:
        """Metrics labels: the adapter (or base), or each member of a mix."""
        return tuple(self.mix.names) if self.mix is not None else (self.label,)

    def choice_params(self, index: int) -> SamplingParams:
        """Choice ``index``'s sampling: seed + index when a seed is given (wrapped to int64)."""
        if index == 0 or self.params.seed is None:
            return self.params
        seed = (self.params.seed + index - check.SEED_MIN) % 2**64 + check.SEED_MIN
        return dataclasses.replace(self.params, seed=seed)


@dataclass
class Choice:
    """One choice's engine request and text (event-loop side)."""

    index: int
    engine_request: EngineRequest
    assembler: TextAssembler
    completion: int = 0
    finish: str | None = None
    echoed: bool = False


@dataclass
class Flight:
    """One request between submission and its end (event-loop side)."""

    plan: Plan
    engine_request: EngineRequest  # choice 0's, carrying the others as forks
    tokens: asyncio.Queue
    clock: RequestClock
    choices: list[Choice]
    prompt_scores: list[ScoredToken] | None = None
    finish: str | None = None  # the request's: set when every choice has finished
    timer: asyncio.TimerHandle | None = None

    @property
    def completion(self) -> int:
        return sum(c.completion for c in self.choices)

    @property
    def requests(self) -> list[EngineRequest]:
        return [c.engine_request for c in self.choices]


class Outbox:
    """Engine thread -> event loop: callbacks posted from the engine thread during one scheduler
    pass (every row's token of a step, finishes, admissions) run on the loop in ONE wakeup, when
    the pass ends (``Scheduler.after_pass``), in the order they were posted; posted from any
    other thread they are handed over at once. One ``call_soon_threadsafe`` per pass instead of
    one per token: the loop wakes once per step, and the engine thread writes the loop's wakeup
    pipe once per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deferred: Callable[[], bool]) -> None:
        self.loop = loop
        self._deferred = deferred  # True on the engine thread: its pass ends with ``flush``
        self._items: list[tuple[Callable[..., Any], tuple]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (any thread)."""
        with self._lock:
            self._items.append((fn, args))
            if self._scheduled or self._deferred():
                return
            self._scheduled = True
        self._wake()

    def flush(self) -> None:
        """The engine thread's pass ended: hand what it posted to the loop (one wakeup)."""
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        self._wake()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed (shutdown): nobody is left to read these
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _drain(self) -> None:  # event loop
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for fn, args in items:
            try:
                fn(*args)
            except Exception as exc:  # one failing callback never costs the others their delivery
                self.loop.call_exception_handler({"message": f"Outbox callback {fn!r} failed", "exception": exc})


_STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


class StructuredOutput:
    """Structured output fields -> a constraint factory (server/constraints.py, one compiler
    per tokenizer; compiling may take seconds: callers run ``compile`` off the event loop)."""

    def __init__(self, tokenizer, vocab_size: Callable[[], int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._lock = threading.Lock()

    def spec(self, req: GenerationRequest) -> Any:
        given = {name: getattr(req, name) for name in _STRUCTURED_FIELDS}
        if given["response_format"] == {"type": "text"}:
            given["response_format"] = None  # OpenAI's default: free text
        if all(v is None for v in given.values()):
            return None
        from loraplex.server.constraints import constraint_from_fields

        return constraint_from_fields(**given)

    def compile(self, spec: Any) -> Callable[[], Any]:
        with self._lock:  # the compiler is built once (seconds), by the first request that needs it
            if self._compiler is None:
                from loraplex.server.constraints import ConstraintCompiler

                width = self.vocab_size() if self.vocab_size is not None else len(self.tokenizer)
                self._compiler = ConstraintCompiler(self.tokenizer, width)
        return self._compiler.compile(spec)


#: a logprob of -inf (a token the model masks out) as JSON can carry it (vLLM's convention)
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    value = float(logprob)
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


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
        self._outbox: Outbox | None = None  # bound to the running loop by the first request
        self.pieces = TokenPieces(tokenizer) if tokenizer is not None else None
        self.structured = StructuredOutput(tokenizer, lambda: getattr(scheduler, "vocab_size", None) or len(tokenizer))
        # one thread: tokenizer calls are never concurrent with each other off the loop
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-tokenize")

    # ----------------------------------------------------------------- the pipeline
    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream events for one request (choices interleaved, each event names its ``index``);
        closing the iterator cancels the request."""
        if not self.readiness.ready:
            raise NotReady("the server is not ready yet (loading the base model)")
        key, adapter, mix = self.validate(req)
        prompt_ids = await self.tokenize(req)
        plan = await self.plan(req, key, adapter, mix, prompt_ids)
        leases = await self.admit(plan)
        flight = self.flight(plan, leases)
        try:
            self.submit(flight)
            async with contextlib.aclosing(self.stream(flight)) as events:
                async for event in events:
                    yield event
        finally:
            await self.account(flight, leases)

    # -------------------------------------------------------------------- validate
    def resolve(self, model: Any) -> str | None:
        """None for the bare base; the adapter name otherwise (AdapterNotFound if unknown)."""
        check.model_name(model)
        if model == self.base_name:
            return None
        self.registry.get(model)
        return model

    def validate(self, req: GenerationRequest) -> tuple[ApiKey | None, str | None, Any]:
        """The caller's key, its right to the model (or to every member of a mix), the model
        itself, the prompt's shape."""
        key = self.access.authenticate(req.credential)
        mix = parse_mix(req.model, req.adapters, base_name=self.base_name, max_members=self.settings.max_mix_adapters)
        if mix is not None:
            self.access.authorize_mix(key, mix)
            for name, _ in mix.members:
                self.registry.get(name)
            adapter = None
        else:
            self.access.authorize_model(key, req.model)
            adapter = self.resolve(req.model)
        if req.messages is not None:
            self.messages(req.messages)
        elif req.prompt_token_ids is None:
            _check(isinstance(req.prompt, str) and req.prompt != "", "prompt is empty", "prompt")
            check.text(req.prompt, "prompt")
        return key, adapter, mix

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
        ids = await self.off_loop(work, size)
        # an empty text (or one the tokenizer maps to nothing) has no position to generate from
        _check(len(ids) > 0, "prompt is empty: it tokenizes to no tokens (at least 1 is needed)", "prompt" if req.messages is None else "messages")
        return ids

    async def off_loop(self, work: Callable[[], Any], size: int) -> Any:
        """Run tokenizer work inline when small, else in the tokenizer thread."""
        if size <= TOKENIZE_INLINE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, work)

    # ---------------------------------------------------------------------- sample
    @property
    def features(self) -> frozenset[str]:
        """What the backend's engine implements (``Scheduler.features``)."""
        features = getattr(self.scheduler, "features", None)
        return LEGACY_FEATURES if features is None else frozenset(features)

    def backend_name(self) -> str:
        s = self.settings
        return f"onnx ({s.onnx_batching})" if s.backend == "onnx" else s.backend

    def require(self, feature: str, param: str) -> None:
        """400 naming the field and the backend when the engine lacks ``feature``."""
        if feature not in self.features:
            raise RequestInvalid(f"{param} is not supported by the {self.backend_name()} backend of this server", param=param)

    async def plan(self, req: GenerationRequest, key: ApiKey | None, adapter: str | None, mix: Any, prompt_ids: list[int]) -> Plan:
        """The checked sampling values and output options; structured output compiled (off the
        event loop)."""
        params = self.sample(req, len(prompt_ids))
        n = check.integer(req.n, "n", low=1, high=min(self.settings.max_n, self.settings.max_batch_size))  # --max-n, and one batch row each
        if n > 1:
            self.require("n", "n")
        logprobs = None if req.logprobs is None else check.integer(req.logprobs, "logprobs", low=0, high=check.LOGPROBS_MAX)
        if logprobs is not None:
            self.require("logprobs", "logprobs")
        echo = check.flag(req.echo, "echo")
        prompt_logprobs = None
        if echo and (logprobs is not None or params.max_tokens == 0):
            prompt_logprobs = logprobs or 0
            self.require("prompt_logprobs", "echo")
        _check(params.max_tokens > 0 or echo, "max_tokens must be >= 1 (0 is allowed only with echo: scoring the prompt)", "max_tokens")
        if mix is not None:
            self.require("mix", "adapters" if req.adapters is not None else "model")
        constraint = None
        spec = self.structured.spec(req)
        if spec is not None:
            self.require("constraint", spec.field)
            _check(params.max_tokens > 0, f"{spec.field} needs max_tokens >= 1", spec.field)
            # the grammar allows end-of-sequence only where the output is complete, and only there
            _check(not params.ignore_eos, f"ignore_eos cannot be combined with {spec.field}: the constrained output ends with end-of-sequence", "ignore_eos")
            _check(params.min_tokens == 0, f"min_tokens cannot be combined with {spec.field}: it would mask the end-of-sequence the grammar requires", "min_tokens")
            constraint = await asyncio.to_thread(self.structured.compile, spec)
        label = mix.label if mix is not None else (adapter or self.base_name)
        echo_text = None
        if echo:
            echo_text = req.prompt if req.prompt is not None and req.prompt_token_ids is None and req.messages is None else self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        return Plan(req.request_id, key, adapter, label, prompt_ids, params, req.stop, n=n, logprobs=logprobs, echo_text=echo_text, prompt_logprobs=prompt_logprobs, constraint=constraint, mix=mix)

    def sample(self, req: GenerationRequest, prompt_len: int) -> SamplingParams:
        """Every sampling value checked (type and range) in one place for both fronts."""
        s = self.settings
        if req.max_tokens is None:
            max_tokens = max(1, min(s.max_tokens_default, s.max_model_len - prompt_len))
        else:
            max_tokens = check.integer(req.max_tokens, "max_tokens")
            _check(max_tokens >= 0, f"max_tokens must be >= 1, got {max_tokens} (0 is allowed only with echo)", "max_tokens")
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
        vocab = len(self.tokenizer)
        min_tokens = 0 if req.min_tokens is None else check.integer(req.min_tokens, "min_tokens", low=0)
        _check(min_tokens <= max_tokens, f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})", "min_tokens")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=check.temperature(req.temperature),
            top_p=check.top_p(req.top_p),
            top_k=check.top_k(req.top_k),
            seed=check.seed(req.seed),
            stop_token_ids=tuple(check.token_ids(req.stop_token_ids, "stop_token_ids", vocab)),
            ignore_eos=check.flag(req.ignore_eos, "ignore_eos"),
            min_tokens=min_tokens,
            presence_penalty=check.penalty(req.presence_penalty, "presence_penalty"),
            frequency_penalty=check.penalty(req.frequency_penalty, "frequency_penalty"),
            repetition_penalty=check.repetition_penalty(req.repetition_penalty),
            logit_bias=check.logit_bias(req.logit_bias, vocab, s.max_logit_bias),
        )
        if params.penalized or params.logit_bias or params.min_tokens:
            field_name = next(
                name
                for name, used in (
                    ("presence_penalty", params.presence_penalty != 0.0),
                    ("frequency_penalty", params.frequency_penalty != 0.0),
                    ("repetition_penalty", params.repetition_penalty != 1.0),
                    ("logit_bias", bool(params.logit_bias)),
                    ("min_tokens", params.min_tokens > 0),
                )
                if used
            )
            self.require("penalties", field_name)
        return params

    # ------------------------------------------------------------ tokenizer endpoints
    def _tokenizer_model(self, model: Any, credential: str | None) -> None:
        """The caller may use ``model`` (every model shares the base's tokenizer)."""
        key = self.access.authenticate(credential)
        if model is None:
            return
        mix = parse_mix(model, None, base_name=self.base_name, max_members=self.settings.max_mix_adapters)
        if mix is not None:
            self.access.authorize_mix(key, mix)
            return
        self.access.authorize_model(key, model)
        self.resolve(model)

    async def tokenize_text(self, *, model: Any, prompt: Any, messages: Any, add_special_tokens: bool, add_generation_prompt: bool, credential: str | None) -> dict[str, Any]:
        """vLLM's ``/tokenize``: the base tokenizer's ids for a text (special-token text parsed as
        the tokenizer does, unlike generation prompts) or for chat messages rendered by the
        template (user text never special, as in generation)."""
        self._tokenizer_model(model, credential)
        _check((prompt is None) != (messages is None), "give prompt or messages (one of them)", "prompt")
        if messages is not None:
            rendered = self.messages(messages)
            if add_generation_prompt:
                work = lambda: chat_ids(self.tokenizer, rendered)  # noqa: E731
            else:
                work = lambda: text_ids(self.tokenizer, self.tokenizer.apply_chat_template(rendered, add_generation_prompt=False, tokenize=False))  # noqa: E731
            size = sum(len(m["content"]) for m in rendered)
        else:
            check.text(prompt, "prompt")
            work = lambda: list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])  # noqa: E731
            size = len(prompt)
        ids = await self.off_loop(work, size)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.settings.max_model_len}

    async def detokenize(self, *, model: Any, tokens: Any, credential: str | None) -> dict[str, Any]:
        """vLLM's ``/detokenize``: the text of token ids (special tokens kept)."""
        self._tokenizer_model(model, credential)
        ids = check.token_ids(tokens, "tokens", len(self.tokenizer))
        text = await self.off_loop(lambda: self.tokenizer.decode(ids, skip_special_tokens=False), len(ids) * 4)
        return {"prompt": text}

    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's special tokens and chat template (vLLM's ``/tokenizer_info``)."""
        t = self.tokenizer
        template = getattr(t, "chat_template", None)
        return {
            "tokenizer_class": type(t).__name__,
            "eos_token": t.eos_token,
            "bos_token": t.bos_token,
            "pad_token": t.pad_token,
            "unk_token": t.unk_token,
            "eos_token_id": t.eos_token_id,
            "bos_token_id": t.bos_token_id,
            "chat_template": template if isinstance(template, str) else None,
            "model_max_length": self.settings.max_model_len,
            "vocab_size": len(t),
        }

    def check_prompt_count(self, count: int) -> None:
        _check(0 < count <= self.settings.max_prompts, f"prompt is a list of {count} prompts; 1 to {self.settings.max_prompts} are allowed (--max-prompts)", "prompt")

    # ----------------------------------------------------------------------- admit
    async def admit(self, plan: Plan) -> list[Lease]:
        """The key's rate limit, then the adapter (every member of a mix, all or none) pinned,
        loaded on demand, waiting up to --adapter-wait-timeout for a slot. Every slot busy counts
        like a full queue."""
        self.access.admit(plan.key)
        if plan.adapter is None and plan.mix is None:
            return []
        try:
            if plan.mix is not None:
                return list(await self.registry.acquire_many(plan.mix.names, wait=None))
            return [await self.registry.acquire(plan.adapter)]
        except Overloaded:  # never recorded as the adapter's failure
            self._count_finished(plan, FINISH_REJECTED, 0)
            raise

    # ---------------------------------------------------------------------- stream
    def flight(self, plan: Plan, leases: list[Lease]) -> Flight:
        """The engine request (naming the adapter's current engine copy: a republished adapter
        gets a new one; a mix names each member's copy), one fork per further choice, the
        shared event queue, clocks and timeout; counted as waiting and in flight."""
        loop = asyncio.get_running_loop()
        outbox = self.outbox(loop)
        post = outbox.post
        tokens: asyncio.Queue = asyncio.Queue()
        clock = RequestClock(self.metrics, plan.labels)
        put = tokens.put_nowait
        now = time.perf_counter

        def emitter(index: int):
            def emit(token: int | None, finish: str | None, logprob: Any = None) -> None:  # engine thread
                post(put, (index, token, finish, logprob, now()))

            return emit

        def admitted() -> None:  # engine thread: the request left the queue for the batch
            post(clock.admitted, now())

        def prompt_scored(scores: list) -> None:  # engine thread, once, before the first token
            post(put, (-1, None, None, scores, now()))

        adapter = leases[0].engine_name if leases and plan.mix is None else None
        extra: dict[str, Any] = {}
        if plan.mix is not None:
            extra["mix"] = tuple((lease.engine_name, weight) for lease, weight in zip(leases, plan.mix.weights))

        def engine_request(index: int, **more: Any) -> EngineRequest:
            options = dict(extra, **more)
            if plan.logprobs is not None:
                options["logprobs"] = plan.logprobs
            if plan.constraint is not None:
                options["constraint"] = plan.constraint()
            rid = plan.request_id if index == 0 else f"{plan.request_id}-{index}"
            return EngineRequest(rid, plan.prompt_ids, adapter, plan.choice_params(index), emitter(index), **options)

        forks = tuple(engine_request(i) for i in range(1, plan.n))
        first: dict[str, Any] = {"on_admit": admitted}
        if forks:
            first["forks"] = forks
        if plan.prompt_logprobs is not None:
            first["prompt_logprobs"] = plan.prompt_logprobs
            first["on_prompt_logprobs"] = prompt_scored
        main = engine_request(0, **first)
        choices = [Choice(i, r, TextAssembler(self.tokenizer, plan.stop)) for i, r in enumerate((main, *forks))]
        flight = Flight(plan, main, tokens, clock, choices)
        self.activity.enter(plan.labels)
        for request in flight.requests:
            self.inflight[id(request)] = request
        if self.settings.request_timeout:
            flight.timer = loop.call_later(self.settings.request_timeout, self._cancel_all, flight, FINISH_TIMEOUT)
        return flight

    def outbox(self, loop: asyncio.AbstractEventLoop) -> Outbox:
        """The loop's ``Outbox``, flushed at the end of every scheduler pass (a scheduler without
        passes, as in unit tests, gets deliveries at once)."""
        if self._outbox is None or self._outbox.loop is not loop:
            on_engine_thread = getattr(self.scheduler, "on_engine_thread", None)
            first, previous = self._outbox is None, self._outbox
            self._outbox = Outbox(loop, on_engine_thread or (lambda: False))
            if previous is not None:
                previous.flush()  # a previous loop's last deliveries (tests run several loops)
            if first and on_engine_thread is not None:
                self.scheduler.after_pass(self._flush_outbox)
        return self._outbox

    def _flush_outbox(self) -> None:  # engine thread, end of every pass
        outbox = self._outbox
        if outbox is not None:
            outbox.flush()

    def _cancel_all(self, flight: Flight, reason: str) -> None:
        for choice in flight.choices:
            if choice.finish is None:
                self.scheduler.cancel(choice.engine_request, reason)

    def submit(self, flight: Flight) -> None:
        """Into the scheduler's queue; Overloaded (finish reason "rejected") when it is full."""
        try:
            self.scheduler.submit(flight.engine_request)
        except Overloaded:
            flight.finish = FINISH_REJECTED
            raise
        for label in flight.plan.labels:
            self.metrics.prompt_tokens.labels(label).inc(len(flight.plan.prompt_ids))

    def score(self, entry: Any) -> ScoredToken:
        """An engine TokenLogprob -> a ScoredToken (token texts and bytes)."""
        text, raw = self.pieces.piece(entry.token_id)
        top = tuple(ScoredToken(tid, *self.pieces.piece(tid), _finite(lp)) for tid, lp in entry.top)
        return ScoredToken(entry.token_id, text, raw, _finite(entry.logprob), top)

    def _prompt_scores(self, plan: Plan, scores: list) -> list[ScoredToken]:
        out = []
        for tid, entry in zip(plan.prompt_ids, scores):
            out.append(ScoredToken(tid, *self.pieces.piece(tid), None) if entry is None else self.score(entry))
        return out

    async def stream(self, flight: Flight) -> AsyncIterator[GenerationEvent]:
        """Engine tokens -> text events until every choice finishes; a stop string ends its
        choice here and cancels that engine row."""
        plan = flight.plan
        prompt_len = len(plan.prompt_ids)
        open_choices = len(flight.choices)
        while open_choices:
            index, token, finish, extra, at = await flight.tokens.get()
            if index < 0:  # the prompt's scores (echo with logprobs)
                flight.prompt_scores = self._prompt_scores(plan, extra) if plan.logprobs is not None else None
                continue
            choice = flight.choices[index]
            if choice.finish is not None:
                continue  # tokens the engine made before it saw this choice's cancellation
            assembler = choice.assembler
            if token is not None:
                if not flight.clock.started:
                    self.activity.start(plan.labels)
                flight.clock.token(at)
                choice.completion += 1
                delta = assembler.add(token)
                if assembler.stopped:
                    finish = "stop"
                    self.scheduler.cancel(choice.engine_request, "stop")  # the engine frees the row at its next step
                choice.finish = finish
                scores = [self.score(extra)] if plan.logprobs is not None and extra is not None else ([] if plan.logprobs is not None else None)
                event = GenerationEvent(delta, [token], finish, prompt_len, choice.completion, index, logprobs=scores)
            elif finish is not None:
                choice.finish = finish
                if finish == FINISH_ERROR:
                    flight.finish = finish
                    log.error("request %s failed inside the engine", plan.request_id)
                    raise EngineFailure(f"request {plan.request_id} failed inside the engine (see the server log)")
                event = GenerationEvent(assembler.flush(), [], finish, prompt_len, choice.completion, index, logprobs=[] if plan.logprobs is not None else None)
            else:
                continue
            if not choice.echoed:
                choice.echoed = True
                if plan.echo_text is not None:
                    event.echo_text = plan.echo_text
                    event.prompt_logprobs = flight.prompt_scores
            if choice.finish is not None:
                open_choices -= 1
                if not open_choices:
                    flight.finish = choice.finish
            event.total_completion_tokens = flight.completion
            yield event

    # --------------------------------------------------------------------- account
    async def account(self, flight: Flight, leases: list[Lease]) -> None:
        """The request ended (finished, failed, or its stream closed early): cancel what still
        runs, count it, release the adapters."""
        if flight.finish is None:
            flight.finish = FINISH_CANCELLED
        if any(c.finish is None for c in flight.choices):
            self._cancel_all(flight, FINISH_CANCELLED)
        self._settle(flight)
        if leases:
            await self.registry.release_many(leases)

    def _settle(self, flight: Flight) -> None:
        plan, finish = flight.plan, flight.finish
        for request in flight.requests:
            self.inflight.pop(id(request), None)
        if flight.timer is not None:
            flight.timer.cancel()
        self.activity.leave(plan.labels, started=flight.clock.started)
        self._count_finished(plan, finish, flight.completion)
        flight.clock.finished()

    def _count_finished(self, plan: Plan, finish: str, completion: int) -> None:
        """Counted under the adapter (each member of a mix, and once as the mix)."""
        for label in plan.labels:
            self.metrics.requests.labels(label, finish).inc()
            self.metrics.generation_tokens.labels(label).inc(completion)
            if plan.key is not None:
                self.metrics.key_requests.labels(plan.key.name, label, finish).inc()
        if plan.mix is not None:
            self.metrics.count_mix(plan.mix.member_set, finish)
        if plan.key is not None:
            charged = completion + (len(plan.prompt_ids) if finish != FINISH_REJECTED else 0)  # a refused request costs nothing
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
