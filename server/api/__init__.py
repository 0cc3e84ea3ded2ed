"""The network fronts (HTTP now, gRPC later). They talk only to the service layer."""
