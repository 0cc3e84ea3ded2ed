"""The gRPC front: loraplex.v1.Inference, grpc.health.v1.Health and server reflection, served by
the same process, service layer and engine as HTTP. Talks only to the service layer; errors are
mapped in ``loraplex.server.api.errors``."""
