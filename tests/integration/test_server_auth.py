"""API keys on a real server: 401 / 404 / 403 over HTTP, the same as gRPC codes, /v1/models
filtered per key, health and metrics open, revocation without restart, per-key metrics and
rate limits with Retry-After."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import httpx
import pytest

from loraplex.server.auth import KeyFile
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.server_harness import ServerProcess
from tests.oracle import make_random_adapter


@pytest.fixture(scope="module")
def secured(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    store = root / "adapters"
    store.mkdir()
    for i, name in enumerate(["ka", "kb"]):
        make_random_adapter(tiny_base, store / name, seed=40 + i)
    keys = KeyFile(root / "keys.yaml")
    secrets = {
        "admin": keys.add("ops", "admin", ["*"])[0],
        "user": keys.add("team-a", "user", ["ka", "tiny"])[0],
        "limited": keys.add("trial", "user", ["k*"], requests_per_minute=2)[0],
        "doomed": keys.add("leaver", "user", ["*"])[0],
    }
    with ServerProcess(tiny_base, store, "--api-keys-file", str(root / "keys.yaml")) as srv:
        srv.keys, srv.secrets = keys, secrets
        yield srv


def _post(srv, path, body, secret=None):
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)


def _complete(srv, model, secret):
    return _post(srv, "/v1/completions", {"model": model, "prompt": [1, 5, 6], "max_tokens": 2}, secret)


def test_http_authentication_and_per_adapter_access(secured):
    s = secured.secrets
    missing = _complete(secured, "ka", None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    assert _complete(secured, "ka", "lpx-wrong").status_code == 401
    assert _complete(secured, "ka", s["user"]).status_code == 200
    assert _complete(secured, "tiny", s["user"]).status_code == 200
    hidden = _complete(secured, "kb", s["user"])  # exists, but not for this key: looks like it doesn't exist
    unknown = _complete(secured, "nope", s["user"])
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"]["message"].replace("kb", "X") == unknown.json()["error"]["message"].replace("nope", "X")
    headers = {"Authorization": f"Bearer {s['user']}"}
    assert [m["id"] for m in httpx.get(secured.url + "/v1/models", headers=headers).json()["data"]] == ["tiny", "ka"]
    admin_models = httpx.get(secured.url + "/v1/models", headers={"Authorization": f"Bearer {s['admin']}"}).json()["data"]
    assert {m["id"] for m in admin_models} == {"tiny", "ka", "kb"}
    assert httpx.get(secured.url + "/v1/models").status_code == 401


def test_admin_routes_need_the_admin_role(secured):
    s = secured.secrets
    denied = _post(secured, "/v1/load_lora_adapter", {"lora_name": "kb"}, s["user"])
    assert denied.status_code == 403 and "needs role 'admin'" in denied.json()["error"]["message"]
    assert _post(secured, "/v1/load_lora_adapter", {"lora_name": "kb"}, s["admin"]).status_code == 200
    assert _post(secured, "/v1/unload_lora_adapter", {"lora_name": "kb"}, s["admin"]).status_code == 200


def test_health_ready_metrics_stay_open_and_count_per_key(secured):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(secured.url + path).status_code == 200
    metrics = httpx.get(secured.url + "/metrics").text
    assert 'loraplex_key_requests_total{adapter="ka",key="team-a",status="length"}' in metrics
    assert secured.secrets["user"] not in metrics


def test_grpc_codes_match(secured):
    s = secured.secrets

    async def call(secret, adapter, rpc="Generate"):
        metadata = (("authorization", f"Bearer {secret}"),) if secret else None
        async with grpc.aio.insecure_channel(secured.grpc_address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            try:
                if rpc == "Generate":
                    await stub.Generate(pb.GenerateRequest(adapter=adapter, prompt_token_ids=[1, 5], sampling=pb.SamplingParams(max_tokens=2)), metadata=metadata)
                else:
                    await stub.LoadAdapter(pb.LoadAdapterRequest(name=adapter), metadata=metadata)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    assert asyncio.run(call(None, "ka")) == grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(call(s["user"], "ka")) == grpc.StatusCode.OK
    assert asyncio.run(call(s["user"], "kb")) == grpc.StatusCode.NOT_FOUND
    assert asyncio.run(call(s["user"], "kb", "LoadAdapter")) == grpc.StatusCode.PERMISSION_DENIED
    assert asyncio.run(call(s["admin"], "kb", "LoadAdapter")) == grpc.StatusCode.OK


def test_rate_limit_answers_429_with_retry_after(secured):
    s = secured.secrets
    assert _complete(secured, "ka", s["limited"]).status_code == 200
    assert _complete(secured, "ka", s["limited"]).status_code == 200
    third = _complete(secured, "ka", s["limited"])
    assert third.status_code == 429 and 1 <= int(third.headers["retry-after"]) <= 60
    assert "limit of 2 requests per minute" in third.json()["error"]["message"]


def test_revoked_key_stops_working_without_restart(secured):
    s = secured.secrets
    assert _complete(secured, "ka", s["doomed"]).status_code == 200
    secured.keys.revoke("leaver")
    secured.proc.send_signal(signal.SIGHUP)  # or wait: the file's mtime is checked every second
    deadline = time.monotonic() + 10
    while _complete(secured, "ka", s["doomed"]).status_code != 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _complete(secured, "ka", s["doomed"]).status_code == 401
    assert _complete(secured, "ka", s["user"]).status_code == 200  # everyone else keeps working
    assert secured.proc.poll() is None  # SIGHUP reloads, it does not stop the server
