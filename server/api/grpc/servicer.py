"""``loraplex.v1.Inference`` on grpc.aio: converts messages to the service's GenerationRequest and
back. Client cancellation and deadline expiry cancel the handler task, which closes the service's
event stream and frees the engine row at the next step.

Requests are parsed by :func:`strict_parser`: bytes that are not a valid message (a string field
that is not UTF-8) or that carry fields this server's ``loraplex.v1`` does not define are refused
with ``INVALID_ARGUMENT`` (never UNKNOWN, never silently ignored). An unexpected exception is
logged once with the request id and answered ``INTERNAL`` naming that id."""

from __future__ import annotations

import json
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
    optional = lambda name: getattr(message, name) if has(name) else None  # noqa: E731
    return dict(
        max_tokens=optional("max_tokens"),
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        top_k=optional("top_k"),
        seed=optional("seed"),
        stop=list(message.stop),
        stop_token_ids=list(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        presence_penalty=optional("presence_penalty"),
        frequency_penalty=optional("frequency_penalty"),
        repetition_penalty=optional("repetition_penalty"),
        logit_bias=dict(message.logit_bias) if message.logit_bias else None,
        min_tokens=optional("min_tokens"),
        n=message.n if has("n") else 1,
        logprobs=optional("logprobs"),
        echo=message.echo,
    )


def _structured(message: pb.StructuredOutput | None) -> dict:
    """StructuredOutput -> the service's structured-output fields (OpenAI / vLLM spelling)."""
    kind = message.WhichOneof("kind") if message is not None else None
    if kind is None:
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}} if message.json_object else {}
    if kind == "json_schema":
        try:
            return {"guided_json": json.loads(message.json_schema)}
        except ValueError as exc:
            raise RequestInvalid(f"structured.json_schema is not valid JSON: {exc}", param="structured.json_schema") from None
    if kind == "regex":
        return {"guided_regex": message.regex}
    if kind == "grammar":
        return {"guided_grammar": message.grammar}
    return {"guided_choice": list(message.choice.values)}


def _token_logprob(scored) -> pb.TokenLogprob:
    out = pb.TokenLogprob(token_id=scored.token_id, token=scored.text, token_bytes=bytes(scored.bytes), top=[_token_logprob(t) for t in scored.top])
    if scored.logprob is not None:
        out.logprob = scored.logprob
    return out


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
        if descriptor.message_type.GetOptions().map_entry:  # a map: its values, when they are messages
            if descriptor.message_type.fields_by_name["value"].message_type is None:
                continue
            children = list(value.values())
        else:
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

    def _common(self, service: GenerationService, request, context) -> dict:
        """The fields Generate and Chat share: model or mix, sampling, structured output."""
        common = dict(model=self._model(service, request.adapter), credential=credential_of(context), **_sampling(request.sampling), **_structured(request.structured if request.HasField("structured") else None))
        if request.adapters:
            common["adapters"] = [{"name": a.name, "weight": a.weight} for a in request.adapters]
        common["request_id"] = request.request_id or f"grpc-{uuid.uuid4().hex}"
        return common

    def _generate_request(self, service: GenerationService, request: pb.GenerateRequest, context) -> GenerationRequest:
        if request.prompt and request.prompt_token_ids:
            raise RequestInvalid("give prompt or prompt_token_ids, not both", param="prompt")
        common = self._common(service, request, context)
        if request.prompt_token_ids:
            return GenerationRequest(prompt_token_ids=list(request.prompt_token_ids), **common)
        return GenerationRequest(prompt=request.prompt, **common)

    def _chat_request(self, service: GenerationService, request: pb.ChatRequest, context) -> GenerationRequest:
        if request.sampling.echo:
            raise RequestInvalid("echo is for Generate (completions) only", param="echo")
        common = self._common(service, request, context)
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        return GenerationRequest(messages=messages, **common)

    async def _unary(self, build, request, context) -> pb.GenerateResponse:
        await self._refuse(request, context)
        rid = request.request_id or "(no id)"
        try:
            service = self._service()
            req = build(service, request, context)
            rid = req.request_id
            choices: dict[int, pb.Choice] = {}
            prompt_tokens = completion_tokens = 0
            async for event in service.generate(req):
                choice = choices.setdefault(event.index, pb.Choice(index=event.index))
                choice.text += event.text
                choice.token_ids.extend(event.token_ids)
                choice.logprobs.extend(_token_logprob(s) for s in event.logprobs or ())
                choice.prompt_logprobs.extend(_token_logprob(s) for s in event.prompt_logprobs or ())
                if event.finish_reason is not None:
                    choice.finish_reason = finish_reason(event.finish_reason)
                prompt_tokens, completion_tokens = event.prompt_tokens, max(completion_tokens, event.total_completion_tokens)
            ordered = [choices[i] for i in sorted(choices)]
            first = ordered[0] if ordered else pb.Choice(finish_reason=finish_reason("stop"))
            return pb.GenerateResponse(
                request_id=req.request_id,
                text=first.text,
                token_ids=first.token_ids,
                finish_reason=first.finish_reason,
                usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
                choices=ordered,
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
                    message = pb.GenerateStreamResponse(
                        request_id=req.request_id,
                        text=event.text,
                        token_ids=event.token_ids,
                        index=event.index,
                        logprobs=[_token_logprob(s) for s in event.logprobs or ()],
                        prompt_logprobs=[_token_logprob(s) for s in event.prompt_logprobs or ()],
                    )
                    if event.finish_reason is not None:
                        message.finish_reason = finish_reason(event.finish_reason)
                        message.usage.CopyFrom(pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.total_completion_tokens))
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

    async def Tokenize(self, request, context):
        async def run(service):
            messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            out = await service.tokenize(model=self._model(service, request.adapter), prompt=None if messages else request.prompt, messages=messages, add_special_tokens=add, credential=credential_of(context))
            return pb.TokenizeResponse(tokens=out["tokens"], count=out["count"], max_model_len=out["max_model_len"])

        return await self._admin(run, request, context)

    async def Detokenize(self, request, context):
        async def run(service):
            out = await service.detokenize(model=self._model(service, request.adapter), tokens=list(request.tokens), credential=credential_of(context))
            return pb.DetokenizeResponse(text=out["prompt"])

        return await self._admin(run, request, context)

    async def UnloadAdapter(self, request, context):
        async def run(service):
            info = await service.unload_adapter(request.name, credential_of(context))
            status = "unloading" if info["state"] == "resident" else "unloaded"
            return pb.UnloadAdapterResponse(status=status, adapter=adapter_message(info))

        return await self._admin(run, request, context)
