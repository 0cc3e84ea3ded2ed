"""``loraplex.v1.Inference`` on grpc.aio: converts messages to the service's GenerationRequest and
back. Client cancellation and deadline expiry cancel the handler task, which closes the service's
event stream and frees the engine row at the next step.

Requests are parsed by :func:`strict_parser`: bytes that are not a valid message (a string field
that is not UTF-8) or that carry fields this server's ``loraplex.v1`` does not define are refused
with ``INVALID_ARGUMENT`` (never UNKNOWN, never silently ignored). An unexpected exception is
logged once with the request id and answered ``INTERNAL`` naming that id."""

from __future__ import annotations

import logging
import uuid
from typing import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from loraplex.server.api.errors import grpc_status
from loraplex.server.api.finish import grpc_finish_reason
from loraplex.server.auth.credentials import credential_from_pairs
from loraplex.server.errors import LoraplexError, NotReady, RequestInvalid
from loraplex.server.service import GenerationRequest, GenerationService
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("loraplex.grpc")
finish_reason = grpc_finish_reason  # the one map: server/api/finish.py


def _sampling(message: pb.SamplingParams) -> dict:
    has = message.HasField
    return dict(
        max_tokens=message.max_tokens if has("max_tokens") else None,
        temperature=message.temperature if has("temperature") else None,
        top_p=message.top_p if has("top_p") else None,
        top_k=message.top_k if has("top_k") else None,
        seed=message.seed if has("seed") else None,
        stop=list(message.stop),
        stop_token_ids=list(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
    )


class Refused:
    """What :func:`strict_parser` returns for bytes it will not turn into a request."""

    def __init__(self, message: str) -> None:
        self.message = message


def _unknown_fields(message, prefix: str = "") -> list[str]:
    """Numbers of fields the client sent that our schema does not define (nested too)."""
    name = prefix or message.DESCRIPTOR.name
    found = [f"{name}.#{field.field_number}" for field in UnknownFieldSet(message)]
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        children = value if descriptor.is_repeated else [value]
        for i, child in enumerate(children):
            found += _unknown_fields(child, f"{name}.{descriptor.name}" + (f"[{i}]" if descriptor.is_repeated else ""))
    return found


def strict_parser(cls):
    """A request deserializer that returns :class:`Refused` instead of raising."""

    def parse(data: bytes):
        try:
            message = cls.FromString(data)
        except DecodeError as exc:
            return Refused(f"the request is not a valid {cls.DESCRIPTOR.full_name}: {exc}")
        unknown = _unknown_fields(message)
        if unknown:
            return Refused(f"unrecognized field(s) {', '.join(unknown)}: not defined by this server's {cls.DESCRIPTOR.full_name} (loraplex refuses fields it does not honour)")
        return message

    return parse


def credential_of(context) -> str | None:
    """The API key from the ``authorization`` metadata: ``Bearer <key>``, the rule HTTP uses too
    (``auth.credentials``); a bare key counts as none."""
    return credential_from_pairs(context.invocation_metadata())


def adapter_message(info: dict) -> pb.Adapter:
    return pb.Adapter(
        name=info["name"],
        state=info["state"],
        rank=info.get("rank") or 0,
        target_modules=info.get("target_modules") or [],
        size_bytes=info.get("size_bytes") or 0,
        sha256=info.get("sha256") or "",
        base_fingerprint=info.get("base_fingerprint") or "",
        loaded_at=info.get("loaded_at") or 0.0,
        requests_served=info.get("requests_served") or 0,
        running_requests=info.get("running_requests") or 0,
        last_error=info.get("last_error") or "",
        task=info.get("task") or "",
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, get_service: Callable[[], GenerationService | None]) -> None:
        self._get_service = get_service

    async def _refuse(self, request, context) -> None:
        if isinstance(request, Refused):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    async def _fault(self, exc: BaseException, rid: str, context) -> None:
        log.error("request %s failed: %s: %s", rid, type(exc).__name__, exc, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in request {rid}: {type(exc).__name__} (see the server log)")

    def _service(self) -> GenerationService:
        service = self._get_service()
        if service is None or not service.ready:
            raise NotReady("the server is not ready yet (loading the base model)")
        return service

    def _model(self, service: GenerationService, adapter: str) -> str:
        return adapter if adapter else service.base_name

    def _generate_request(self, service: GenerationService, request: pb.GenerateRequest, context) -> GenerationRequest:
        if request.prompt and request.prompt_token_ids:
            raise RequestInvalid("give prompt or prompt_token_ids, not both", param="prompt")
        common = dict(model=self._model(service, request.adapter), credential=credential_of(context), **_sampling(request.sampling))
        common["request_id"] = request.request_id or f"grpc-{uuid.uuid4().hex}"
        if request.prompt_token_ids:
            return GenerationRequest(prompt_token_ids=list(request.prompt_token_ids), **common)
        return GenerationRequest(prompt=request.prompt, **common)

    def _chat_request(self, service: GenerationService, request: pb.ChatRequest, context) -> GenerationRequest:
        common = dict(model=self._model(service, request.adapter), credential=credential_of(context), **_sampling(request.sampling))
        common["request_id"] = request.request_id or f"grpc-{uuid.uuid4().hex}"
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        return GenerationRequest(messages=messages, **common)

    async def _unary(self, build, request, context) -> pb.GenerateResponse:
        await self._refuse(request, context)
        rid = request.request_id or "(no id)"
        try:
            service = self._service()
            req = build(service, request, context)
            rid = req.request_id
            parts, tokens, last = [], [], None
            async for event in service.generate(req):
                parts.append(event.text)
                tokens.extend(event.token_ids)
                last = event
            return pb.GenerateResponse(
                request_id=req.request_id,
                text="".join(parts),
                token_ids=tokens,
                finish_reason=finish_reason(last.finish_reason if last else "stop"),
                usage=pb.Usage(prompt_tokens=last.prompt_tokens if last else 0, completion_tokens=last.completion_tokens if last else 0),
            )
        except LoraplexError as exc:
            code, message = grpc_status(exc)
            await context.abort(code, message)
        except Exception as exc:  # noqa: BLE001 - the catch-all of one RPC
            await self._fault(exc, rid, context)

    async def _stream(self, build, request, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        await self._refuse(request, context)
        rid = request.request_id or "(no id)"
        try:
            service = self._service()
            req = build(service, request, context)
            rid = req.request_id
            stream = service.generate(req)
            try:
                async for event in stream:
                    message = pb.GenerateStreamResponse(request_id=req.request_id, text=event.text, token_ids=event.token_ids)
                    if event.finish_reason is not None:
                        message.finish_reason = finish_reason(event.finish_reason)
                        message.usage.CopyFrom(pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens))
                    yield message
            finally:
                await stream.aclose()
        except LoraplexError as exc:
            code, message = grpc_status(exc)
            await context.abort(code, message)
        except Exception as exc:  # noqa: BLE001 - the catch-all of one RPC
            await self._fault(exc, rid, context)

    async def Generate(self, request, context):
        return await self._unary(self._generate_request, request, context)

    async def GenerateStream(self, request, context):
        async for message in self._stream(self._generate_request, request, context):
            yield message

    async def Chat(self, request, context):
        return await self._unary(self._chat_request, request, context)

    async def ChatStream(self, request, context):
        async for message in self._stream(self._chat_request, request, context):
            yield message

    async def _admin(self, fn, request, context):
        await self._refuse(request, context)
        try:
            return await fn(self._service())
        except LoraplexError as exc:
            code, message = grpc_status(exc)
            await context.abort(code, message)
        except Exception as exc:  # noqa: BLE001 - the catch-all of one RPC
            await self._fault(exc, "(admin)", context)

    async def ListAdapters(self, request, context):
        async def run(service):
            return pb.ListAdaptersResponse(adapters=[adapter_message(a) for a in await service.adapters(credential_of(context))])

        return await self._admin(run, request, context)

    async def GetAdapter(self, request, context):
        async def run(service):
            return adapter_message(service.describe_adapter(request.name, credential_of(context)))

        return await self._admin(run, request, context)

    async def LoadAdapter(self, request, context):
        async def run(service):
            return adapter_message(await service.load_adapter(request.name, request.path or None, credential_of(context)))

        return await self._admin(run, request, context)

    async def UnloadAdapter(self, request, context):
        async def run(service):
            info = await service.unload_adapter(request.name, credential_of(context))
            status = "unloading" if info["state"] == "resident" else "unloaded"
            return pb.UnloadAdapterResponse(status=status, adapter=adapter_message(info))

        return await self._admin(run, request, context)
