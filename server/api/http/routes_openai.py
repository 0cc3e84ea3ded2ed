"""POST /v1/chat/completions and /v1/completions (OpenAI-compatible, SSE streaming).

A client that disconnects cancels its request and is logged as one info line with the request id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request

from loraplex.server.api.http.deps import credential_of, service_of
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraplex.server.api.errors import http_error
from loraplex.server.api.finish import http_finish_reason
from loraplex.server.api.http.protocol import ChatCompletionRequest, CompletionRequest
from loraplex.server.errors import LoraplexError, RequestInvalid
from loraplex.server.service import GenerationEvent, GenerationRequest, GenerationService

router = APIRouter()
log = logging.getLogger("loraplex.http")


class ClientGone(Exception):
    """The client disconnected before its reply started; nothing more can be sent."""


def _service(request: Request) -> GenerationService:
    return service_of(request)


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
        request_id=request_id,
    )


def _usage(event: GenerationEvent | None) -> dict:
    prompt = event.prompt_tokens if event else 0
    completion = event.completion_tokens if event else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _collect(stream: AsyncIterator[GenerationEvent], request: Request) -> tuple[str, GenerationEvent | None]:
    """Gather a non-streaming reply; a client that disconnects cancels the request."""
    parts: list[str] = []
    last: GenerationEvent | None = None

    async def consume():
        nonlocal last
        async for event in stream:
            parts.append(event.text)
            last = event

    task = asyncio.ensure_future(consume())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.aclose()
            raise ClientGone()
    task.result()
    return "".join(parts), last


async def _start(service: GenerationService, req: GenerationRequest, request: Request):
    """Open the event stream and pull the first event, so request errors surface as HTTP errors.
    A client that disconnects meanwhile (still queued, or in prefill) cancels the request."""
    stream = service.generate(req)
    first = asyncio.ensure_future(stream.__anext__())
    while True:
        done, _ = await asyncio.wait({first}, timeout=0.25)
        if done:
            return stream, first.result()
        if await request.is_disconnected():
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await stream.aclose()
            raise ClientGone()


async def _stream_body(stream, first: GenerationEvent, chunk, final_usage: bool, rid: str) -> AsyncIterator[str]:
    last = first
    try:
        yield _sse(chunk(first))
        async for event in stream:
            last = event
            yield _sse(chunk(event))
        if final_usage:
            yield _sse({"id": rid, "object": chunk.object_name, "created": chunk.created, "model": chunk.model, "choices": [], "usage": _usage(last)})
    except LoraplexError as exc:
        _, body, _ = http_error(exc)
        yield _sse(body)
    except (GeneratorExit, asyncio.CancelledError):  # the client went away mid-stream
        log.info("request %s: client disconnected after %d tokens; cancelled", rid, last.completion_tokens)
        raise
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


class _ChunkMaker:
    def __init__(self, object_name: str, rid: str, model: str, chat: bool) -> None:
        self.object_name, self.rid, self.model, self.chat = object_name, rid, model, chat
        self.created = int(time.time())
        self.first = True

    def __call__(self, event: GenerationEvent) -> dict:
        if self.chat:
            delta = {"content": event.text}
            if self.first:
                delta["role"] = "assistant"
                self.first = False
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": http_finish_reason(event.finish_reason)}
        else:
            choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": http_finish_reason(event.finish_reason)}
        return {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model, "choices": [choice]}


async def _respond(request: Request, body, req: GenerationRequest, rid: str, *, chat: bool):
    """Stream (SSE) or collect one request; the reply shape differs only between chat and text."""
    try:
        return await _reply(request, body, req, rid, chat=chat)
    except ClientGone:
        log.info("request %s: client disconnected before the reply; cancelled", rid)
        return Response(status_code=499)  # never sent: the connection is gone


async def _reply(request: Request, body, req: GenerationRequest, rid: str, *, chat: bool):
    service = _service(request)
    object_name = "chat.completion" if chat else "text_completion"
    if body.stream:
        stream, first = await _start(service, req, request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        maker = _ChunkMaker("chat.completion.chunk" if chat else "text_completion", rid, body.model, chat=chat)
        return StreamingResponse(_stream_body(stream, first, maker, include_usage, rid), media_type="text/event-stream")
    text, last = await _collect(service.generate(req), request)
    finish = http_finish_reason(last.finish_reason if last else "stop")
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return JSONResponse({"id": rid, "object": object_name, "created": int(time.time()), "model": body.model, "choices": [choice], "usage": _usage(last)})


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    rid = _request_id(request, "chatcmpl")
    body.refuse_unsupported()
    messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
    return await _respond(request, body, GenerationRequest(messages=messages, **_common(body, rid, request)), rid, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    rid = _request_id(request, "cmpl")
    body.refuse_unsupported()
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise RequestInvalid(f"prompt is a list of {len(prompt)} strings; only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        req = GenerationRequest(prompt_token_ids=prompt, **_common(body, rid, request))
    else:
        req = GenerationRequest(prompt=prompt, **_common(body, rid, request))
    return await _respond(request, body, req, rid, chat=False)
