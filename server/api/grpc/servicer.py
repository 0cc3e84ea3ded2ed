"""``loraplex.v1.Inference`` on grpc.aio: converts messages to the service's GenerationRequest and
back. Client cancellation and deadline expiry cancel the handler task, which closes the service's
event stream and frees the engine row at the next step."""

from __future__ import annotations

from typing import AsyncIterator, Callable

import grpc

from loraplex.server.api.errors import grpc_status
from loraplex.server.errors import LoraplexError, NotReady, RequestInvalid
from loraplex.server.service import GenerationRequest, GenerationService
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "cancelled": pb.FINISH_REASON_CANCELLED}


def finish_reason(name: str | None) -> int:
    if name is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return _FINISH.get(name, pb.FINISH_REASON_CANCELLED)


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


def credential_of(context) -> str | None:
    """The API key from the ``authorization`` metadata ("Bearer <key>" or the bare key)."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            scheme, _, rest = value.partition(" ")
            return rest.strip() if scheme.lower() == "bearer" else value.strip()
    return None


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
        if request.request_id:
            common["request_id"] = request.request_id
        if request.prompt_token_ids:
            return GenerationRequest(prompt_token_ids=list(request.prompt_token_ids), **common)
        return GenerationRequest(prompt=request.prompt, **common)

    def _chat_request(self, service: GenerationService, request: pb.ChatRequest, context) -> GenerationRequest:
        common = dict(model=self._model(service, request.adapter), credential=credential_of(context), **_sampling(request.sampling))
        if request.request_id:
            common["request_id"] = request.request_id
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        return GenerationRequest(messages=messages, **common)

    async def _unary(self, build, request, context) -> pb.GenerateResponse:
        try:
            service = self._service()
            req = build(service, request, context)
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

    async def _stream(self, build, request, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            service = self._service()
            req = build(service, request, context)
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

    async def _admin(self, fn, context):
        try:
            return await fn(self._service())
        except LoraplexError as exc:
            code, message = grpc_status(exc)
            await context.abort(code, message)

    async def ListAdapters(self, request, context):
        async def run(service):
            return pb.ListAdaptersResponse(adapters=[adapter_message(a) for a in service.describe_adapters(credential_of(context))])

        return await self._admin(run, context)

    async def GetAdapter(self, request, context):
        async def run(service):
            return adapter_message(service.describe_adapter(request.name, credential_of(context)))

        return await self._admin(run, context)

    async def LoadAdapter(self, request, context):
        async def run(service):
            return adapter_message(await service.load_adapter(request.name, request.path or None, credential_of(context)))

        return await self._admin(run, context)

    async def UnloadAdapter(self, request, context):
        async def run(service):
            info = await service.unload_adapter(request.name, credential_of(context))
            status = "unloading" if info["state"] == "resident" else "unloaded"
            return pb.UnloadAdapterResponse(status=status, adapter=adapter_message(info))

        return await self._admin(run, context)
