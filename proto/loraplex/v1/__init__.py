"""Generated gRPC stubs for proto/loraplex/v1/inference.proto (package loraplex.v1).

Do not edit: regenerate with `make proto` (grpcio-tools); tests/unit/test_proto_stubs.py fails
when these files are stale.
"""
