"""The committed gRPC stubs are what `make proto` generates from proto/ (stale stubs fail here),
and the proto passes `buf lint` (STANDARD rules, exceptions documented in proto/buf.yaml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROTO = Path(__file__).resolve().parents[2] / "proto"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def test_committed_stubs_are_current(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTO), f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(PROTO / "loraplex/v1/inference.proto")],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "loraplex/v1" / name).read_bytes()
        assert (PROTO / "loraplex/v1" / name).read_bytes() == fresh, f"proto/loraplex/v1/{name} is stale: run make proto"


def _buf() -> str | None:
    local = Path(__file__).resolve().parents[2] / ".tools/node_modules/.bin/buf"
    return str(local) if local.exists() else shutil.which("buf")


@pytest.mark.skipif(_buf() is None, reason="buf not installed (make test installs @bufbuild/buf from npm into .tools/)")
def test_buf_lint_is_clean():
    result = subprocess.run([_buf(), "lint"], cwd=PROTO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
