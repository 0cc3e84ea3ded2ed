"""A small Python client for the loraplex gRPC API (``loraplex.v1.Inference`` + health).

    from loraplex.server.grpc_client import LoraplexGrpcClient
    with LoraplexGrpcClient("127.0.0.1:50051") as client:
        print(client.chat("sentiment", [{"role": "user", "content": "Classify ..."}], max_tokens=8, temperature=0).text)
        for message in client.generate_stream("", "Once upon a time", max_tokens=16):
            print(message.text, end="")

``adapter=""`` is the bare base. Sampling keywords: max_tokens, temperature, top_p, top_k, seed,
stop, stop_token_ids, ignore_eos. Errors raise ``grpc.RpcError`` with the server's status code.

A light module: grpcio and the generated stubs (``loraplex.v1``) only. It imports no server code,
so a client never pulls in torch or the model (an import contract and a test keep it so).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

#: the server's message limits seen from this side (server/api/grpc/server.py; a test keeps them
#: equal): the client may send what the server receives and receive what the server sends.
CLIENT_SEND_BYTES = 4 * 1024 * 1024
CLIENT_RECEIVE_BYTES = 16 * 1024 * 1024


def sampling(**kwargs) -> pb.SamplingParams:
    stop = kwargs.pop("stop", None) or []
    stop_token_ids = kwargs.pop("stop_token_ids", None) or []
    params = pb.SamplingParams(stop=[stop] if isinstance(stop, str) else list(stop), stop_token_ids=list(stop_token_ids))
    params.logit_bias.update({int(k): float(v) for k, v in (kwargs.pop("logit_bias", None) or {}).items()})
    for key, value in kwargs.items():
        if value is not None:
            setattr(params, key, value)
    return params


class LoraplexGrpcClient:
    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = 300.0) -> None:
        self.channel = grpc.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", CLIENT_RECEIVE_BYTES), ("grpc.max_send_message_length", CLIENT_SEND_BYTES)],
        )
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> "LoraplexGrpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _request(self, adapter: str, prompt: str | Sequence[int], request_id: str, kwargs) -> pb.GenerateRequest:
        request = pb.GenerateRequest(adapter=adapter, request_id=request_id, sampling=sampling(**kwargs))
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
        return request

    def generate(self, adapter: str, prompt: str | Sequence[int], *, request_id: str = "", **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(self._request(adapter, prompt, request_id, kwargs), timeout=self.timeout)

    def generate_stream(self, adapter: str, prompt: str | Sequence[int], *, request_id: str = "", **kwargs) -> Iterator[pb.GenerateStreamResponse]:
        return self.stub.GenerateStream(self._request(adapter, prompt, request_id, kwargs), timeout=self.timeout)

    def chat(self, adapter: str, messages: Sequence[dict], *, request_id: str = "", **kwargs) -> pb.GenerateResponse:
        request = pb.ChatRequest(adapter=adapter, request_id=request_id, sampling=sampling(**kwargs),
                                 messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
        return self.stub.Chat(request, timeout=self.timeout)

    def tokenize(self, text: str, *, adapter: str = "", add_special_tokens: bool = True) -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(adapter=adapter, prompt=text, add_special_tokens=add_special_tokens), timeout=self.timeout).tokens)

    def detokenize(self, tokens: Sequence[int], *, adapter: str = "") -> str:
        return self.stub.Detokenize(pb.DetokenizeRequest(adapter=adapter, tokens=list(tokens)), timeout=self.timeout).text

    def list_adapters(self) -> list[pb.Adapter]:
        return list(self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout).adapters)

    def load_adapter(self, name: str, path: str = "") -> pb.Adapter:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=path), timeout=self.timeout)

    def unload_adapter(self, name: str) -> pb.UnloadAdapterResponse:
        return self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=self.timeout)

    def health(self, service: str = "loraplex.v1.Inference") -> str:
        reply = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
