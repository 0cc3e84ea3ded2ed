"""The Python gRPC client is a light module: importing it loads grpcio and the generated stubs,
never torch, transformers or any server module (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
import loraplex.server.grpc_client
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_the_client_loads_no_server_code_and_no_torch():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True).stdout
    modules = set(json.loads(out))
    assert "loraplex.server.grpc_client" in modules and "grpc" in modules  # the probe did import it
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "transformers", "numpy", "onnxruntime", "fastapi"))
    assert heavy == []
    ours = sorted(m for m in modules if m.startswith("loraplex.server."))
    assert ours == ["loraplex.server.grpc_client"]


def test_client_message_limits_match_the_server():
    from loraplex.server.api.grpc.server import MAX_RECEIVE_BYTES, MAX_SEND_BYTES
    from loraplex.server.grpc_client import CLIENT_RECEIVE_BYTES, CLIENT_SEND_BYTES

    assert CLIENT_SEND_BYTES == MAX_RECEIVE_BYTES
    assert CLIENT_RECEIVE_BYTES == MAX_SEND_BYTES
