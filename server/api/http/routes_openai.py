"""POST /v1/chat/completions and /v1/completions (OpenAI-compatible, SSE streaming), and vLLM's
tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info).

One reply is built from the service's events: each event names its choice (``index``); a
completions request with a list of prompts runs one generation per prompt and numbers the
choices prompt by prompt (prompt p, choice i -> index p * n + i), as OpenAI does. Logprobs are
shaped here from the service's scored tokens: chat's ``choices[].logprobs.content[]`` and the
completions' legacy ``tokens / token_logprobs / top_logprobs / text_offset``.

A client that disconnects cancels its request and is logged as one info line with the request id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraplex.server.api.errors import http_error
from loraplex.server.api.finish import http_finish_reason
from loraplex.server.api.http.deps import credential_of, service_of
from loraplex.server.api.http.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from loraplex.server.errors import LoraplexError, RequestInvalid
from loraplex.server.service import GenerationEvent, GenerationRequest, GenerationService

router = APIRouter()
log = logging.getLogger("loraplex.http")
TOP_LOGPROBS_MAX = 20


class ClientGone(Exception):
    """The client disconnected before its reply started; nothing more can be sent."""


def _request_id(request: Request, prefix: str) -> str:
    """The client's X-Request-Id when it sends one (logged with faults), else a fresh id; kept in
    ``request.state`` so the fault handler names the same id."""
    given = request.headers.get("x-request-id", "")
    rid = given[:128] if given else f"{prefix}-{uuid.uuid4().hex}"
    request.state.request_id = rid
    return rid


def _common(body, request_id: str, request: Request) -> dict:
    return dict(
        credential=credential_of(request),
        model=body.model,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=body.stop_token_ids or (),
        n=body.n,
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.logit_bias,
        min_tokens=body.min_tokens,
        response_format=body.response_format,
        guided_json=body.guided_json,
        guided_regex=body.guided_regex,
        guided_choice=body.guided_choice,
        guided_grammar=body.guided_grammar,
        adapters=body.adapters,
        request_id=request_id,
    )


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------ logprobs shapes
def _chat_entry(scored) -> dict:
    return {"token": scored.text, "logprob": scored.logprob, "bytes": scored.bytes}


def chat_logprobs(scores) -> dict:
    """OpenAI chat: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    return {"content": [{**_chat_entry(s), "top_logprobs": [_chat_entry(t) for t in s.top]} for s in scores], "refusal": None}


class LegacyLogprobs:
    """OpenAI completions' legacy shape for one choice, built token by token (``text_offset``
    is each token's character offset in the choice's text, echoed prompt included)."""

    def __init__(self) -> None:
        self.offset = 0

    def add(self, scores) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for s in scores:
            out["tokens"].append(s.text)
            out["token_logprobs"].append(s.logprob)
            if s.logprob is None:
                out["top_logprobs"].append(None)
            else:  # the k best, plus the token itself (so up to k + 1 entries, as OpenAI)
                top = {t.text: t.logprob for t in s.top}
                top.setdefault(s.text, s.logprob)
                out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(s.text)
        return out

    @staticmethod
    def merge(parts: list[dict]) -> dict:
        return {key: [v for part in parts for v in part[key]] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


# ------------------------------------------------------------------------- event streams
async def _open(service: GenerationService, reqs: list[GenerationRequest], request: Request) -> tuple[list, list[GenerationEvent]]:
    """Open one event stream per request and pull each one's first event, so request errors
    surface as HTTP errors before anything is sent. A client that disconnects meanwhile
    (queued, or in prefill) cancels them."""
    streams = [service.generate(r) for r in reqs]
    firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
    try:
        while True:
            done, pending = await asyncio.wait(firsts, timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
            failed = [f for f in done if not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0].exception()
            if not pending:
                return streams, [f.result() for f in firsts]
            if await request.is_disconnected():
                raise ClientGone()
    except BaseException:
        for f in firsts:
            f.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in streams:
            await s.aclose()
        raise


async def _merged(streams: list, firsts: list[GenerationEvent]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """(prompt number, event) from every stream as they come; closing it closes them all."""
    if len(streams) == 1:
        yield 0, firsts[0]
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    for p, first in enumerate(firsts):
        queue.put_nowait((p, first, None))

    async def pump(p: int, stream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((p, event, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((p, None, exc))
            return
        queue.put_nowait((p, None, None))

    pumps = [asyncio.ensure_future(pump(p, s)) for p, s in enumerate(streams)]
    open_streams = len(streams)
    try:
        while open_streams:
            p, event, exc = await queue.get()
            if exc is not None:  # one prompt failed: the whole request fails (the others are cancelled below)
                raise exc
            if event is None:
                open_streams -= 1
                continue
            yield p, event
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for s in streams:
            await s.aclose()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    scores: list = field(default_factory=list)
    legacy: LegacyLogprobs = field(default_factory=LegacyLogprobs)
    legacy_parts: list[dict] = field(default_factory=list)
    role_sent: bool = False


class _Reply:
    """Choices and usage of one request (all its prompts), built from events."""

    def __init__(self, *, chat: bool, n: int, prompts: int, logprobs: bool, model: str, rid: str, object_name: str) -> None:
        self.chat, self.n, self.logprobs = chat, n, logprobs
        self.model, self.rid, self.object_name = model, rid, object_name
        self.created = int(time.time())
        self.choices: dict[int, _Choice] = {}
        self.prompt_tokens = [0] * prompts
        self.completion_tokens = [0] * prompts
        self._head: str | None = None  # chunk_sse's encoded prefix

    def index(self, p: int, event: GenerationEvent) -> int:
        return p * self.n + event.index

    def note(self, p: int, event: GenerationEvent) -> tuple[int, _Choice, str, dict | None]:
        """Account one event; returns (choice index, its state, its text, its logprobs part)."""
        self.prompt_tokens[p] = event.prompt_tokens
        self.completion_tokens[p] = max(self.completion_tokens[p], event.total_completion_tokens or event.completion_tokens)
        index = self.index(p, event)
        choice = self.choices.setdefault(index, _Choice())
        text = event.text
        scores = list(event.logprobs or [])
        if event.echo_text is not None:
            text = event.echo_text + text
            scores = list(event.prompt_logprobs or []) + scores
        choice.text.append(text)
        if event.finish_reason is not None:
            choice.finish = event.finish_reason
        part = None
        if self.logprobs:
            if self.chat:
                choice.scores.extend(scores)
                part = chat_logprobs(scores)
            else:
                part = choice.legacy.add(scores)
                choice.legacy_parts.append(part)
        return index, choice, text, part

    def usage(self) -> dict:
        prompt, completion = sum(self.prompt_tokens), sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk_sse(self, p: int, event: GenerationEvent) -> str:
        """``_sse(self.chunk(p, event))``, the same bytes, with the fields every chunk repeats
        (id, object, created, model) encoded once per reply instead of once per token."""
        head = self._head
        if head is None:
            fixed = json.dumps({"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model}, ensure_ascii=False)
            head = self._head = f"data: {fixed[:-1]}, \"choices\": ["
        return f"{head}{json.dumps(self.chunk(p, event)['choices'][0], ensure_ascii=False)}]}}\n\n"

    def chunk(self, p: int, event: GenerationEvent) -> dict:
        index, choice, text, part = self.note(p, event)
        if self.chat:
            delta = {"content": text}
            if not choice.role_sent:
                delta = {"role": "assistant", **delta}
                choice.role_sent = True
            body = {"index": index, "delta": delta, "logprobs": part, "finish_reason": http_finish_reason(event.finish_reason)}
        else:
            body = {"index": index, "text": text, "logprobs": part, "finish_reason": http_finish_reason(event.finish_reason)}
        return {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model, "choices": [body]}

    def whole(self) -> dict:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            finish = http_finish_reason(c.finish or "stop")
            if self.chat:
                lp = chat_logprobs(c.scores) if self.logprobs else None
                choices.append({"index": index, "message": {"role": "assistant", "content": "".join(c.text)}, "logprobs": lp, "finish_reason": finish})
            else:
                lp = LegacyLogprobs.merge(c.legacy_parts) if self.logprobs else None
                choices.append({"index": index, "text": "".join(c.text), "logprobs": lp, "finish_reason": finish})
        return {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}


async def _collect(events: AsyncIterator[tuple[int, GenerationEvent]], reply: _Reply, request: Request) -> None:
    """Gather a non-streaming reply; a client that disconnects cancels the request."""

    async def consume():
        async for p, event in events:
            reply.note(p, event)

    task = asyncio.ensure_future(consume())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientGone()
        task.result()
    finally:
        await events.aclose()


async def _stream_body(events: AsyncIterator[tuple[int, GenerationEvent]], reply: _Reply, final_usage: bool) -> AsyncIterator[str]:
    try:
        async for p, event in events:
            yield reply.chunk_sse(p, event)
        if final_usage:
            yield _sse({"id": reply.rid, "object": reply.object_name, "created": reply.created, "model": reply.model, "choices": [], "usage": reply.usage()})
    except LoraplexError as exc:
        _, body, _ = http_error(exc)
        yield _sse(body)
    except (GeneratorExit, asyncio.CancelledError):  # the client went away mid-stream
        log.info("request %s: client disconnected after %d tokens; cancelled", reply.rid, reply.usage()["completion_tokens"])
        raise
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


async def _respond(request: Request, body, reqs: list[GenerationRequest], rid: str, *, chat: bool, logprobs: bool):
    """Stream (SSE) or collect one request; the reply shape differs only between chat and text."""
    try:
        service = service_of(request)
        streams, firsts = await _open(service, reqs, request)
        events = _merged(streams, firsts)
        if body.stream:
            reply = _Reply(chat=chat, n=body.n, prompts=len(reqs), logprobs=logprobs, model=body.model, rid=rid, object_name="chat.completion.chunk" if chat else "text_completion")
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream_body(events, reply, include_usage), media_type="text/event-stream")
        reply = _Reply(chat=chat, n=body.n, prompts=len(reqs), logprobs=logprobs, model=body.model, rid=rid, object_name="chat.completion" if chat else "text_completion")
        await _collect(events, reply, request)
        return JSONResponse(reply.whole())
    except ClientGone:
        log.info("request %s: client disconnected before the reply; cancelled", rid)
        return Response(status_code=499)  # never sent: the connection is gone


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    rid = _request_id(request, "chatcmpl")
    body.refuse_unsupported()
    messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
    logprobs = None
    if body.top_logprobs is not None:
        if type(body.top_logprobs) is int and not 0 <= body.top_logprobs <= TOP_LOGPROBS_MAX:
            raise RequestInvalid(f"top_logprobs must be in [0, {TOP_LOGPROBS_MAX}], got {body.top_logprobs}", param="top_logprobs")
        if body.top_logprobs > 0 and not body.logprobs:
            raise RequestInvalid("top_logprobs needs logprobs: true", param="top_logprobs")
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    req = GenerationRequest(messages=messages, logprobs=logprobs, **_common(body, rid, request))
    return await _respond(request, body, [req], rid, chat=True, logprobs=logprobs is not None)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    rid = _request_id(request, "cmpl")
    body.refuse_unsupported()
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompts = list(prompt)  # a list of texts or of token-id lists: one generation each
    else:
        prompts = [prompt]
    service_of(request).check_prompt_count(len(prompts))
    common = _common(body, rid, request)
    extra = dict(logprobs=body.logprobs, echo=bool(body.echo))
    reqs = []
    for p, one in enumerate(prompts):
        fields = dict(common, request_id=rid if len(prompts) == 1 else f"{rid}-p{p}")
        if isinstance(one, list):
            reqs.append(GenerationRequest(prompt_token_ids=one, **fields, **extra))
        else:
            reqs.append(GenerationRequest(prompt=one, **fields, **extra))
    return await _respond(request, body, reqs, rid, chat=False, logprobs=body.logprobs is not None)


# ------------------------------------------------------------------------ tokenizer
@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)] if body.messages is not None else None
    return await service_of(request).tokenize(
        model=body.model, prompt=body.prompt, messages=messages, add_special_tokens=body.add_special_tokens, add_generation_prompt=body.add_generation_prompt, credential=credential_of(request)
    )


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    return await service_of(request).detokenize(model=body.model, tokens=body.tokens, credential=credential_of(request))


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    return service_of(request).tokenizer_info(credential_of(request))
