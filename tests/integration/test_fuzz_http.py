"""Hostile input (hypothesis-generated bodies, bounded count) against a real server: every
answer is a clean 2xx/4xx with the OpenAI error shape, never a 500, and the server keeps serving."""

from __future__ import annotations

import shutil

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.server_harness import ServerProcess
from tests.oracle import make_random_adapter

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "n", "stream", "ignore_eos", "stream_options"]


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz") / "adapters"
    store.mkdir()
    make_random_adapter(tiny_base, store / "fz", seed=70)
    with ServerProcess(tiny_base, store, "--max-model-len", "64", "--max-tokens-default", "4") as srv:
        yield srv


def _check(reply: httpx.Response) -> None:
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6), model=st.sampled_from(["fz", "tiny", "nope", ""]))
def test_completions_never_500(server, body, model):
    body = {**body, "model": body.get("model", model)}
    if body.get("stream") is True:
        body["stream"] = False  # streaming replies are covered by the SSE tests
    for path in ("/v1/completions", "/v1/chat/completions"):
        _check(httpx.post(server.url + path, json=body, timeout=60))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_garbage_bytes_never_500(server, raw):
    for path in ("/v1/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        _check(httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60))


def test_still_serving_after_the_fuzzing(server):
    reply = httpx.post(server.url + "/v1/completions", json={"model": "fz", "prompt": [1, 2, 3], "max_tokens": 3}, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
