"""Build and run the grpc.aio server: Inference + Health (per-service status) + reflection.

Message size limits are explicit: requests up to ``MAX_RECEIVE_BYTES`` (4 MiB), responses up to
``MAX_SEND_BYTES`` (16 MiB); larger messages are refused by gRPC with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.server.api.grpc.servicer import InferenceServicer
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "loraplex.v1.Inference"
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024


class GrpcFront:
    """The gRPC server of one loraplex process; health follows the service's readiness."""

    def __init__(self, get_service, host: str, port: int) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ]
        )
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(get_service), self.server)
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
