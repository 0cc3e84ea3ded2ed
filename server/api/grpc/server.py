"""Build and run the grpc.aio server: Inference + Health (per-service status) + reflection.

Message size limits are explicit: requests up to ``MAX_RECEIVE_BYTES`` (4 MiB), responses up to
``MAX_SEND_BYTES`` (16 MiB); larger messages are refused by gRPC with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.server.api.grpc.servicer import InferenceServicer, strict_parser
from loraplex.v1 import inference_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "loraplex.v1.Inference"
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024


def _add_inference(servicer: InferenceServicer, server) -> None:
    """Like the generated ``add_InferenceServicer_to_server``, with :func:`strict_parser` as the
    request deserializer (malformed bytes and unknown fields become INVALID_ARGUMENT)."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Inference"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=strict_parser(request_cls), response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class GrpcFront:
    """The gRPC server of one loraplex process; health follows the service's readiness."""

    def __init__(self, get_service, host: str, port: int) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ]
        )
        _add_inference(InferenceServicer(get_service), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.address = f"{host}:{port}"
        self.port = self.server.add_insecure_port(self.address)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def stop(self, grace: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)
